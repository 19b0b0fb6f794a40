package cloudburst

import (
	"errors"
	"reflect"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

func TestEncodePicksTheSerializerByType(t *testing.T) {
	cases := []struct {
		in   any
		kind cloudburstv1.Serializer
		data string
	}{
		{"é", cloudburstv1.Serializer_SERIALIZER_STRING, "é"},
		{[]byte{0, 1}, cloudburstv1.Serializer_SERIALIZER_BYTES, "\x00\x01"},
		{map[string]any{"a": []int{1}}, cloudburstv1.Serializer_SERIALIZER_JSON, `{"a":[1]}`},
		{nil, cloudburstv1.Serializer_SERIALIZER_JSON, "null"},
	}
	for _, c := range cases {
		value, err := Encode(c.in)
		if err != nil {
			t.Fatalf("Encode(%v): %v", c.in, err)
		}
		if value.GetSerializer() != c.kind || string(value.GetData()) != c.data {
			t.Errorf("Encode(%v) = %s %q, want %s %q", c.in, value.GetSerializer(), value.GetData(), c.kind, c.data)
		}
	}
	if _, err := Encode(make(chan int)); err == nil {
		t.Error("Encode(chan) succeeded; want an error")
	}
}

func TestResultDecodesEachReadableSerializer(t *testing.T) {
	var n int
	if err := (&Result{Value: &cloudburstv1.Value{Data: []byte("16"), Serializer: cloudburstv1.Serializer_SERIALIZER_JSON}}).Decode(&n); err != nil || n != 16 {
		t.Fatalf("JSON decode = %d, %v", n, err)
	}
	var s string
	if err := (&Result{Value: &cloudburstv1.Value{Data: []byte("hi"), Serializer: cloudburstv1.Serializer_SERIALIZER_STRING}}).Decode(&s); err != nil || s != "hi" {
		t.Fatalf("STRING decode = %q, %v", s, err)
	}
	got, err := (&Result{Value: &cloudburstv1.Value{Data: []byte(`{"a":9007199254740993}`), Serializer: cloudburstv1.Serializer_SERIALIZER_JSON}}).Any()
	if err != nil || got.(map[string]any)["a"].(interface{ String() string }).String() != "9007199254740993" {
		t.Fatalf("Any kept %v, %v; want the exact integer", got, err)
	}
	pickled := &Result{Value: &cloudburstv1.Value{Data: []byte{0x80}, Serializer: cloudburstv1.Serializer_SERIALIZER_CLOUDPICKLE}}
	if err := pickled.Decode(&s); err == nil {
		t.Fatal("decoding a pickle succeeded; want an error that says to return JSON")
	}
}

func TestOutcomesBecomeResultsOrTypedErrors(t *testing.T) {
	failure := &cloudburstv1.Failure{Type: "ValueError", Message: "bad", Traceback: "tb", FunctionName: "f"}
	_, err := resultOf(&cloudburstv1.Outcome{Result: &cloudburstv1.Outcome_Failure{Failure: failure}})
	var fnErr *FunctionError
	if !errors.As(err, &fnErr) || fnErr.Type != "ValueError" || fnErr.Function != "f" {
		t.Fatalf("failure outcome gave %v", err)
	}
	stored, _ := proto.Marshal(&cloudburstv1.Failure{Type: "cloudburst.errors.FUNCTION_NOT_FOUND", Message: "gone"})
	_, err = resultOf(&cloudburstv1.Outcome{Result: &cloudburstv1.Outcome_Value{Value: &cloudburstv1.Value{Data: stored, Serializer: cloudburstv1.Serializer_SERIALIZER_FAILURE}}})
	if ReasonOf(err) != ReasonFunctionNotFound {
		t.Fatalf("a stored runtime error gave %v", err)
	}
	callError := &cloudburstv1.CallError{Code: int32(codes.InvalidArgument), Reason: cloudburstv1.ErrorReason_ERROR_REASON_SERIALIZATION_FAILED, Message: "set"}
	_, err = resultOf(&cloudburstv1.Outcome{Result: &cloudburstv1.Outcome_Error{Error: callError}})
	var typed *Error
	if !errors.As(err, &typed) || typed.Reason != ReasonSerializationFailed || typed.Code != codes.InvalidArgument {
		t.Fatalf("error outcome gave %v", err)
	}
}

func TestRPCErrorsCarryTheErrorInfoReason(t *testing.T) {
	st, _ := status.New(codes.NotFound, "DAG 'x' is not registered").WithDetails(
		&errdetails.ErrorInfo{Reason: ReasonDagNotFound, Domain: Domain, Metadata: map[string]string{"dag": "x"}})
	err := errorFromRPC(st.Err())
	var typed *Error
	if !errors.As(err, &typed) {
		t.Fatalf("got %T, want *Error", err)
	}
	want := &Error{Code: codes.NotFound, Reason: ReasonDagNotFound, Message: "DAG 'x' is not registered", Metadata: map[string]string{"dag": "x"}}
	if !reflect.DeepEqual(typed, want) {
		t.Fatalf("got %+v, want %+v", typed, want)
	}
	other, _ := status.New(codes.NotFound, "m").WithDetails(&errdetails.ErrorInfo{Reason: "X", Domain: "elsewhere"})
	if ReasonOf(errorFromRPC(other.Err())) != "" {
		t.Fatal("a reason from another domain was taken")
	}
}
