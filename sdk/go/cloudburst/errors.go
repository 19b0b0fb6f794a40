package cloudburst

import (
	"errors"
	"fmt"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

// Domain is the google.rpc.ErrorInfo domain of cloudburst-grpc's errors.
const Domain = "cloudburst.v1"

// Reasons of Error (the ErrorReason enum without its ERROR_REASON_ prefix); docs/protocol.md
// lists which RPC answers which.
const (
	ReasonFunctionNotFound    = "FUNCTION_NOT_FOUND"
	ReasonDagNotFound         = "DAG_NOT_FOUND"
	ReasonKeyNotFound         = "KEY_NOT_FOUND"
	ReasonInvalidArgument     = "INVALID_ARGUMENT"
	ReasonInvalidDag          = "INVALID_DAG"
	ReasonSerializationFailed = "SERIALIZATION_FAILED"
	ReasonDeadlineExceeded    = "DEADLINE_EXCEEDED"
	ReasonNoExecutor          = "NO_EXECUTOR"
	ReasonProtocolMismatch    = "PROTOCOL_MISMATCH"
)

// Error is an error of the runtime (not of user code): a gRPC status code with the reason from
// its google.rpc.ErrorInfo detail. Match it with errors.As and compare Reason.
type Error struct {
	// Code is the gRPC status code.
	Code codes.Code
	// Reason is the machine-readable reason, such as ReasonDagNotFound; empty when the server sent none.
	Reason string
	// Message says what was wrong and what to do.
	Message string
	// Metadata names the offending identifiers, such as the DAG or key.
	Metadata map[string]string
}

func (e *Error) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("cloudburst: %s: %s", e.Code, e.Message)
	}
	return fmt.Sprintf("cloudburst: %s (%s): %s", e.Reason, e.Code, e.Message)
}

// FunctionError is an exception raised by a Python function; it is the call's result, not an
// RPC error.
type FunctionError struct {
	// Type is the exception's qualified type name, such as "ValueError".
	Type string
	// Message is str(exception).
	Message string
	// Traceback is the Python traceback where it was raised.
	Traceback string
	// Function is the registered name of the function that raised.
	Function string
}

func (e *FunctionError) Error() string {
	return fmt.Sprintf("cloudburst: function %q raised %s: %s", e.Function, e.Type, e.Message)
}

func functionError(failure *cloudburstv1.Failure) error {
	// The runtime stores its own errors (such as a function deleted before its call ran) as
	// failures of type cloudburst.errors.<REASON> without a traceback.
	if reason, ok := strings.CutPrefix(failure.GetType(), "cloudburst.errors."); ok && failure.GetTraceback() == "" {
		return &Error{Code: codes.Unknown, Reason: reason, Message: failure.GetMessage()}
	}
	return &FunctionError{
		Type:      failure.GetType(),
		Message:   failure.GetMessage(),
		Traceback: failure.GetTraceback(),
		Function:  failure.GetFunctionName(),
	}
}

func failureFromBytes(data []byte) error {
	failure := &cloudburstv1.Failure{}
	if err := proto.Unmarshal(data, failure); err != nil {
		return &Error{Code: codes.Internal, Reason: "INTERNAL", Message: "an unreadable failure: " + err.Error()}
	}
	return functionError(failure)
}

func errorFromCallError(callError *cloudburstv1.CallError) error {
	reason := strings.TrimPrefix(callError.GetReason().String(), "ERROR_REASON_")
	if reason == "UNSPECIFIED" {
		reason = ""
	}
	return &Error{
		Code:     codes.Code(callError.GetCode()),
		Reason:   reason,
		Message:  callError.GetMessage(),
		Metadata: callError.GetMetadata(),
	}
}

// errorFromRPC converts a gRPC error into an *Error carrying its ErrorInfo reason.
func errorFromRPC(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	converted := &Error{Code: st.Code(), Message: st.Message()}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.GetDomain() == Domain {
			converted.Reason = info.GetReason()
			converted.Metadata = info.GetMetadata()
		}
	}
	return converted
}

// ReasonOf returns the reason of err when it is (or wraps) an *Error, and "" otherwise.
func ReasonOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}
