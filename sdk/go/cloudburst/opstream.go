package cloudburst

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

// StreamEnv, set to 0, false, no or off, keeps the client's KVS ops on unary calls rather than
// on one KvsService.StreamOps stream per connection, as for the Python SDK.
const StreamEnv = "CLOUDBURST_KVS_STREAM"

// MaxStreamedPutBytes is the largest value a Put sends on the stream of small ops. A stream sends
// its messages in order, so a larger value would hold up the small ops behind it: it goes in a
// unary call, which is a stream of its own.
const MaxStreamedPutBytes = 64 << 10

// streamWanted says whether getenv lets the client stream its KVS ops.
func streamWanted(getenv func(string) string) bool {
	switch strings.ToLower(strings.TrimSpace(getenv(StreamEnv))) {
	case "0", "false", "no", "off":
		return false
	}
	return true
}

// errFallback says that an op goes in a unary call: the service has no StreamOps.
var errFallback = errors.New("cloudburst: the service has no StreamOps")

// opResult is how a streamed op ended.
type opResult struct {
	answer *cloudburstv1.StreamOpsResponse
	err    error
}

// pendingOp is an op sent on a stream and not answered yet.
type pendingOp struct {
	answer chan opResult
	kind   string // "get", "put" or "delete": the result its answer must carry, unless an error
}

// opKind names the op a frame carries, as its answer's result names it.
func opKind(frame *cloudburstv1.StreamOpsRequest) string {
	switch frame.GetOp().(type) {
	case *cloudburstv1.StreamOpsRequest_Get:
		return "get"
	case *cloudburstv1.StreamOpsRequest_Put:
		return "put"
	case *cloudburstv1.StreamOpsRequest_Delete:
		return "delete"
	}
	return "unknown op"
}

// resultKind names the result an answer carries ("" for none).
func resultKind(answer *cloudburstv1.StreamOpsResponse) string {
	switch answer.GetResult().(type) {
	case *cloudburstv1.StreamOpsResponse_Get:
		return "get"
	case *cloudburstv1.StreamOpsResponse_Put:
		return "put"
	case *cloudburstv1.StreamOpsResponse_Delete:
		return "delete"
	case *cloudburstv1.StreamOpsResponse_Error:
		return "error"
	}
	return ""
}

// opStream sends small KVS ops (reads, writes, deletes) as frames of one StreamOps stream of a
// connection, each with its own sequence and deadline, and matches the answers to them by
// sequence. The stream opens with the first op, and again with the first op after it broke. An
// op ends as its unary call would: with the call's answer or error (from the answer's CallError),
// with the context's error when its context ends first, and with codes.Unavailable when the
// stream breaks before answering it. A service that answers the stream with codes.Unimplemented
// (a scheduler's proxy) gets those ops, and all later ones, as unary calls.
type opStream struct {
	stub cloudburstv1.KvsServiceClient
	name string // where the ops go, for errors

	opening chan struct{} // holds a token while a stream opens

	mu        sync.Mutex
	live      *liveStream // nil before the first op, after a break and once closed
	sequence  uint64
	available bool // false once the service answered that it has no StreamOps
	closed    bool
	running   sync.WaitGroup // the goroutines of the streams
}

// liveStream is one opened StreamOps stream: a goroutine writes its frames, another reads its
// answers.
type liveStream struct {
	client  grpc.BidiStreamingClient[cloudburstv1.StreamOpsRequest, cloudburstv1.StreamOpsResponse]
	cancel  context.CancelFunc
	done    <-chan struct{}
	pending map[uint64]pendingOp // the ops sent and not answered
	outbox  []*cloudburstv1.StreamOpsRequest
	wake    chan struct{}
}

func newOpStream(stub cloudburstv1.KvsServiceClient, name string) *opStream {
	return &opStream{stub: stub, name: name, available: true, opening: make(chan struct{}, 1)}
}

// usable says whether ops still go on the stream (else as unary calls).
func (s *opStream) usable() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.available && !s.closed
}

// request sends op's frame (given a sequence and ctx's deadline) and returns its answer. It returns
// errFallback when the op must go as a unary call instead; other errors are gRPC status errors,
// as the unary call would return them.
func (s *opStream) request(ctx context.Context, op *cloudburstv1.StreamOpsRequest) (*cloudburstv1.StreamOpsResponse, error) {
	if err := ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	live, err := s.stream(ctx)
	if err != nil {
		return nil, err
	}
	answer := make(chan opResult, 1)
	s.mu.Lock()
	if s.live != live { // it broke (or closed) since: its ops already ended
		s.mu.Unlock()
		if !s.usable() {
			return nil, errFallback
		}
		return nil, s.brokenError()
	}
	s.sequence++
	sequence := s.sequence
	// A frame of its own: a frame of a stream that broke may still be in its writer's hands.
	frame := &cloudburstv1.StreamOpsRequest{Sequence: sequence, Op: op.Op}
	if deadline, ok := ctx.Deadline(); ok {
		frame.Timeout = durationpb.New(max(time.Until(deadline), 0))
	}
	live.pending[sequence] = pendingOp{answer: answer, kind: opKind(frame)}
	live.outbox = append(live.outbox, frame)
	s.mu.Unlock()
	select {
	case live.wake <- struct{}{}:
	default:
	}
	select {
	case result := <-answer:
		return result.answer, result.err
	case <-ctx.Done():
		s.mu.Lock()
		delete(live.pending, sequence) // its late answer is dropped
		s.mu.Unlock()
		select {
		case result := <-answer: // it was answered just now
			return result.answer, result.err
		default:
		}
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

// stream is the open stream, opened now if there is none. An error is the op's: errFallback
// when ops go as unary calls, or the status of a stream that could not be opened.
func (s *opStream) stream(ctx context.Context) (*liveStream, error) {
	select { // an op that waits for another to open the stream still ends with its context
	case s.opening <- struct{}{}:
		defer func() { <-s.opening }()
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	s.mu.Lock()
	live, available, closed := s.live, s.available, s.closed
	s.mu.Unlock()
	if closed || !available {
		return nil, errFallback
	}
	if live != nil {
		return live, nil
	}
	streamCtx, cancel := context.WithCancel(context.Background())
	// An op whose context ends while the stream opens (a connection still being made) ends
	// then; the stream it was opening is given up.
	stop := context.AfterFunc(ctx, cancel)
	client, err := s.stub.StreamOps(streamCtx)
	stopped := stop()
	if err != nil || !stopped {
		cancel()
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, status.FromContextError(ctxErr).Err()
		}
		return nil, err
	}
	live = &liveStream{
		client:  client,
		cancel:  cancel,
		done:    streamCtx.Done(),
		pending: map[uint64]pendingOp{},
		wake:    make(chan struct{}, 1),
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		cancel()
		return nil, errFallback
	}
	s.live = live
	s.running.Add(2)
	s.mu.Unlock()
	go s.write(live)
	go s.read(live)
	return live, nil
}

// write sends the frames of live's ops as they come.
func (s *opStream) write(live *liveStream) {
	defer s.running.Done()
	for {
		select {
		case <-live.wake:
		case <-live.done:
			return
		}
		for {
			s.mu.Lock()
			frames := live.outbox
			live.outbox = nil
			s.mu.Unlock()
			if len(frames) == 0 {
				break
			}
			for _, frame := range frames {
				if err := live.client.Send(frame); err != nil {
					// The stream ended: its status comes to the reader, which ends the ops.
					return
				}
			}
		}
	}
}

// read hands each answer to its op until the stream ends, then ends the ops it did not answer.
func (s *opStream) read(live *liveStream) {
	defer s.running.Done()
	for {
		answer, err := live.client.Recv()
		if err != nil {
			s.ended(live, err)
			return
		}
		if len(answer.GetBatch()) > 0 {
			// This client does not set reads_batches, so a batch breaks the protocol.
			live.cancel()
			s.ended(live, status.Errorf(codes.Internal,
				"%s answered with a batch of %d answers on a StreamOps stream that did not ask for batches (reads_batches unset); the service breaks the protocol: report it",
				s.name, len(answer.GetBatch())))
			return
		}
		s.mu.Lock()
		waiting, ok := live.pending[answer.GetSequence()]
		came := resultKind(answer)
		if ok && came != "error" && came != waiting.kind {
			// Taking it for a miss, or asking again elsewhere, would hide a KVS that answers
			// wrongly: the op fails, with every other op of the stream.
			s.mu.Unlock()
			if came == "" {
				came = "no result"
			} else {
				came = "a " + came + " result"
			}
			live.cancel()
			s.ended(live, status.Errorf(codes.Internal,
				"%s answered the %s of sequence %d on a StreamOps stream with %s, not a %s result or an error; the service breaks the protocol: report it",
				s.name, waiting.kind, answer.GetSequence(), came, waiting.kind))
			return
		}
		delete(live.pending, answer.GetSequence())
		s.mu.Unlock()
		if !ok {
			continue // its op gave up (deadline, cancelled)
		}
		if callError := answer.GetError(); callError != nil {
			waiting.answer <- opResult{err: statusFromCallError(callError)}
		} else {
			waiting.answer <- opResult{answer: answer}
		}
	}
}

// ended fails the ops live did not answer, as their unary calls would have failed.
func (s *opStream) ended(live *liveStream, err error) {
	s.mu.Lock()
	if s.live == live {
		s.live = nil
	}
	code := status.Code(err)
	if code == codes.Unimplemented {
		s.available = false // a scheduler's proxy: unary calls from now on
	}
	closing := s.closed
	pending := live.pending
	live.pending = map[uint64]pendingOp{}
	live.outbox = nil
	s.mu.Unlock()
	live.cancel()
	var failure error
	switch {
	case code == codes.Unimplemented:
		failure = errFallback
	case errors.Is(err, io.EOF) || code == codes.Canceled || closing:
		// The service (or this client, closing) ended the stream: as for a call to a
		// service that is going away.
		failure = s.brokenError()
	default:
		failure = err
	}
	for _, waiting := range pending {
		waiting.answer <- opResult{err: failure}
	}
}

// brokenError is the error of an op whose stream ended before answering it.
func (s *opStream) brokenError() error {
	return status.Errorf(codes.Unavailable,
		"the stream of KVS ops to %s ended before it answered; the service may be restarting or unreachable: try again",
		s.name)
}

// close ends the stream (the ops it did not answer fail with codes.Unavailable) and waits for
// its goroutines; later ops go as unary calls.
func (s *opStream) close() {
	s.mu.Lock()
	s.closed = true
	live := s.live
	s.mu.Unlock()
	if live != nil {
		live.cancel()
	}
	s.running.Wait()
}

// statusFromCallError is the status error the unary call would have ended with.
func statusFromCallError(callError *cloudburstv1.CallError) error {
	st := status.New(codes.Code(callError.GetCode()), callError.GetMessage())
	if reason := strings.TrimPrefix(callError.GetReason().String(), "ERROR_REASON_"); reason != "UNSPECIFIED" {
		info := &errdetails.ErrorInfo{Domain: Domain, Reason: reason, Metadata: callError.GetMetadata()}
		if detailed, err := st.WithDetails(info); err == nil {
			st = detailed
		}
	}
	return st.Err()
}

// name of an op's target, for the errors of its stream.
func streamName(target string) string {
	return fmt.Sprintf("the KVS at %s", target)
}
