package cloudburst

import (
	"bytes"
	"encoding/json"
	"fmt"

	"google.golang.org/grpc/codes"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

// Encode turns a Go value into a Value: a string as STRING, a []byte as BYTES, anything else as
// JSON (encoding/json). Python functions receive them as str, bytes and the JSON's natural value.
func Encode(value any) (*cloudburstv1.Value, error) {
	switch v := value.(type) {
	case string:
		return &cloudburstv1.Value{Data: []byte(v), Serializer: cloudburstv1.Serializer_SERIALIZER_STRING}, nil
	case []byte:
		return &cloudburstv1.Value{Data: v, Serializer: cloudburstv1.Serializer_SERIALIZER_BYTES}, nil
	}
	data, err := json.Marshal(value)
	if err != nil {
		return nil, fmt.Errorf("cloudburst: cannot encode a %T as JSON: %w", value, err)
	}
	return &cloudburstv1.Value{Data: data, Serializer: cloudburstv1.Serializer_SERIALIZER_JSON}, nil
}

// Result is a value returned by a function, a DAG or the KVS.
type Result struct {
	// Value is the value as it travelled.
	Value *cloudburstv1.Value
}

// Decode stores the result in the value pointed to by out: JSON as encoding/json decodes it,
// a STRING into a *string (or as a JSON string), BYTES into a *[]byte.
func (r *Result) Decode(out any) error {
	data, kind := r.Value.GetData(), r.Value.GetSerializer()
	switch kind {
	case cloudburstv1.Serializer_SERIALIZER_JSON:
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("cloudburst: cannot decode the JSON result into %T: %w", out, err)
		}
		return nil
	case cloudburstv1.Serializer_SERIALIZER_STRING:
		switch p := out.(type) {
		case *string:
			*p = string(data)
			return nil
		case *any:
			*p = string(data)
			return nil
		}
		return fmt.Errorf("cloudburst: a STRING result decodes into *string or *any, not %T", out)
	case cloudburstv1.Serializer_SERIALIZER_BYTES:
		switch p := out.(type) {
		case *[]byte:
			*p = bytes.Clone(data)
			return nil
		case *any:
			*p = bytes.Clone(data)
			return nil
		}
		return fmt.Errorf("cloudburst: a BYTES result decodes into *[]byte or *any, not %T", out)
	}
	return fmt.Errorf("cloudburst: cannot read a %s value in Go; return JSON-representable values "+
		"from functions called from other languages", kind)
}

// Any decodes the result into a native value: JSON as encoding/json gives it (numbers as
// json.Number, to keep integers exact), a string, or a []byte.
func (r *Result) Any() (any, error) {
	if r.Value.GetSerializer() == cloudburstv1.Serializer_SERIALIZER_JSON {
		decoder := json.NewDecoder(bytes.NewReader(r.Value.GetData()))
		decoder.UseNumber()
		var out any
		if err := decoder.Decode(&out); err != nil {
			return nil, fmt.Errorf("cloudburst: cannot decode the JSON result: %w", err)
		}
		return out, nil
	}
	var out any
	err := r.Decode(&out)
	return out, err
}

func resultOf(outcome *cloudburstv1.Outcome) (*Result, error) {
	switch kind := outcome.GetResult().(type) {
	case *cloudburstv1.Outcome_Value:
		if kind.Value.GetSerializer() == cloudburstv1.Serializer_SERIALIZER_FAILURE {
			return nil, failureFromBytes(kind.Value.GetData())
		}
		return &Result{Value: kind.Value}, nil
	case *cloudburstv1.Outcome_Failure:
		return nil, functionError(kind.Failure)
	case *cloudburstv1.Outcome_Error:
		return nil, errorFromCallError(kind.Error)
	}
	return nil, &Error{Code: codes.Internal, Reason: "INTERNAL", Message: "the scheduler answered an empty outcome"}
}
