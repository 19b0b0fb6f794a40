package cloudburst

import (
	"context"
	"errors"
	"net"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

// testKvs is a KvsService on 127.0.0.1 that counts the unary calls and StreamOps streams and
// frames it receives. A write to "held" waits until its call or stream ends; a frame for "break"
// ends its stream with codes.Unavailable and one for "ends" ends it without a status; one for
// "batch" is answered in a batch; an empty key is refused as the KVS refuses it. With lostAnswers
// every write and delete is applied and then answered with codes.Unavailable, as when the
// connection is lost after the KVS applied it.
type testKvs struct {
	cloudburstv1.UnimplementedKvsServiceServer
	address    string
	streams    bool     // whether GetLimits says that it serves StreamOps
	noStreams  bool     // StreamOps answers codes.Unimplemented
	kvsAddress []string // the addresses GetLimits names

	unary, opened, frames atomic.Int64
	holding               chan struct{}

	maxValue                  uint64       // GetLimits.max_value_bytes; 1 MiB when 0
	maxMessage                uint64       // GetLimits.max_message_bytes and the largest message received; 1 MiB when 0
	lostAnswers               bool         // writes and deletes are applied, then answered codes.Unavailable
	chunkPuts, chunkGets      atomic.Int64 // PutValueChunks and GetValueChunks calls
	largestChunk, putsChunked atomic.Int64 // the largest chunk received, and the chunks of all puts
	server                    *grpc.Server

	mu      sync.Mutex
	values  map[string]*cloudburstv1.Lattice
	puts    []*cloudburstv1.PutValueRequest // every write received, a chunked one with its bytes joined
	deletes []*cloudburstv1.DeleteValueRequest
}

// messageBytes is the test KVS's limit on a message.
func (k *testKvs) messageBytes() uint64 {
	if k.maxMessage == 0 {
		return testMessageBytes
	}
	return k.maxMessage
}

// lost is the answer to a write or delete that was applied: codes.Unavailable with lostAnswers.
func (k *testKvs) lost() error {
	if k.lostAnswers {
		return status.Error(codes.Unavailable, "the connection was lost before the answer")
	}
	return nil
}

func startTestKvs(t *testing.T, kvs *testKvs) *testKvs {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	kvs.address = listener.Addr().String()
	kvs.values = map[string]*cloudburstv1.Lattice{}
	kvs.holding = make(chan struct{}, 16)
	server := grpc.NewServer(grpc.MaxRecvMsgSize(int(kvs.messageBytes()) + MessageHeadroomBytes))
	kvs.server = server
	cloudburstv1.RegisterKvsServiceServer(server, kvs)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	return kvs
}

func (k *testKvs) GetLimits(context.Context, *cloudburstv1.GetLimitsRequest) (*cloudburstv1.GetLimitsResponse, error) {
	maxValue := k.maxValue
	if maxValue == 0 {
		maxValue = testMessageBytes
	}
	return &cloudburstv1.GetLimitsResponse{MaxValueBytes: maxValue, MaxMessageBytes: k.messageBytes(), KvsAddresses: k.kvsAddress, ServesOpStreams: k.streams}, nil
}

func refusedKey() error {
	st, _ := status.New(codes.InvalidArgument, "a key must not be empty: name the object").
		WithDetails(&errdetails.ErrorInfo{Domain: Domain, Reason: ReasonInvalidArgument, Metadata: map[string]string{"field": "key"}})
	return st.Err()
}

func (k *testKvs) get(request *cloudburstv1.GetValueRequest) (*cloudburstv1.GetValueResponse, error) {
	if request.GetKey() == "" {
		return nil, refusedKey()
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	lattice, found := k.values[request.GetKey()]
	if uint64(proto.Size(lattice)) > k.messageBytes() {
		return &cloudburstv1.GetValueResponse{Found: true, Chunked: true}, nil
	}
	return &cloudburstv1.GetValueResponse{Found: found, Lattice: lattice}, nil
}

func (k *testKvs) put(ctx context.Context, request *cloudburstv1.PutValueRequest) (*cloudburstv1.PutValueResponse, error) {
	if request.GetKey() == "" {
		return nil, refusedKey()
	}
	if request.GetKey() == "held" {
		k.holding <- struct{}{}
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.values[request.GetKey()] = request.GetLattice()
	k.puts = append(k.puts, request)
	if err := k.lost(); err != nil {
		return nil, err
	}
	return &cloudburstv1.PutValueResponse{}, nil
}

func (k *testKvs) delete(request *cloudburstv1.DeleteValueRequest) (*cloudburstv1.DeleteValueResponse, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	_, existed := k.values[request.GetKey()]
	delete(k.values, request.GetKey())
	k.deletes = append(k.deletes, request)
	if err := k.lost(); err != nil {
		return nil, err
	}
	return &cloudburstv1.DeleteValueResponse{Existed: existed}, nil
}

func (k *testKvs) GetValue(_ context.Context, request *cloudburstv1.GetValueRequest) (*cloudburstv1.GetValueResponse, error) {
	k.unary.Add(1)
	return k.get(request)
}

func (k *testKvs) PutValue(ctx context.Context, request *cloudburstv1.PutValueRequest) (*cloudburstv1.PutValueResponse, error) {
	k.unary.Add(1)
	return k.put(ctx, request)
}

func (k *testKvs) DeleteValue(_ context.Context, request *cloudburstv1.DeleteValueRequest) (*cloudburstv1.DeleteValueResponse, error) {
	k.unary.Add(1)
	return k.delete(request)
}

func (k *testKvs) StreamOps(stream grpc.BidiStreamingServer[cloudburstv1.StreamOpsRequest, cloudburstv1.StreamOpsResponse]) error {
	k.opened.Add(1)
	if k.noStreams {
		return status.Error(codes.Unimplemented, "a scheduler's KvsService forwards no StreamOps")
	}
	var sending sync.Mutex
	var serving sync.WaitGroup
	defer serving.Wait()
	ctx, cancel := context.WithCancel(stream.Context()) // the held ops end with the stream
	defer cancel()
	for {
		frame, err := stream.Recv()
		if err != nil {
			return nil
		}
		k.frames.Add(1)
		key := frame.GetGet().GetKey() + frame.GetPut().GetKey() + frame.GetDelete().GetKey()
		switch key {
		case "break":
			return status.Error(codes.Unavailable, "the KVS is shutting down")
		case "ends":
			return nil
		}
		serving.Add(1)
		go func() {
			defer serving.Done()
			answer := &cloudburstv1.StreamOpsResponse{Sequence: frame.GetSequence()}
			var err error
			switch op := frame.GetOp().(type) {
			case *cloudburstv1.StreamOpsRequest_Get:
				var response *cloudburstv1.GetValueResponse
				response, err = k.get(op.Get)
				answer.Result = &cloudburstv1.StreamOpsResponse_Get{Get: response}
			case *cloudburstv1.StreamOpsRequest_Put:
				var response *cloudburstv1.PutValueResponse
				response, err = k.put(ctx, op.Put)
				answer.Result = &cloudburstv1.StreamOpsResponse_Put{Put: response}
			case *cloudburstv1.StreamOpsRequest_Delete:
				var response *cloudburstv1.DeleteValueResponse
				response, err = k.delete(op.Delete)
				answer.Result = &cloudburstv1.StreamOpsResponse_Delete{Delete: response}
			}
			if err != nil {
				answer.Result = &cloudburstv1.StreamOpsResponse_Error{Error: callErrorOf(err)}
			}
			switch key {
			case "batch":
				answer = &cloudburstv1.StreamOpsResponse{Batch: []*cloudburstv1.StreamOpsResponse{answer}}
			case "wrongkind": // a KVS that breaks the protocol: a put's result, whatever the op
				answer.Result = &cloudburstv1.StreamOpsResponse_Put{Put: &cloudburstv1.PutValueResponse{}}
			case "noresult":
				answer.Result = nil
			}
			if ctx.Err() != nil {
				return // the stream ended: no answer
			}
			sending.Lock()
			defer sending.Unlock()
			_ = stream.Send(answer)
		}()
	}
}

// callErrorOf is the CallError of a status error, as the KVS answers a frame.
func callErrorOf(err error) *cloudburstv1.CallError {
	st := status.Convert(err)
	callError := &cloudburstv1.CallError{Code: int32(st.Code()), Message: st.Message()}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			callError.Reason = cloudburstv1.ErrorReason(cloudburstv1.ErrorReason_value["ERROR_REASON_"+info.GetReason()])
			callError.Metadata = info.GetMetadata()
		}
	}
	return callError
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func dialTest(t *testing.T, address string, direct DirectKvs) *Client {
	t.Helper()
	client, err := DialWithOptions(address, Options{DirectKvs: direct})
	if err != nil {
		t.Fatal(err)
	}
	return client
}

// waitGoroutines waits until no more goroutines run than before, within 10 seconds.
func waitGoroutines(t *testing.T, before int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines ran before the client, %d after Close:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestPutsGetsAndDeletesAtTheKvsGoAsFramesOfOneStream(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{streams: true})
	scheduler := startTestKvs(t, &testKvs{kvsAddress: []string{kvs.address}})
	ctx := testContext(t)
	before := runtime.NumGoroutine()
	client := dialTest(t, scheduler.address, DirectKvsDefault)
	for _, key := range []string{"a", "b", "c"} {
		if err := client.Put(ctx, key, key+"!"); err != nil {
			t.Fatal(err)
		}
	}
	if client.KvsAddress() != kvs.address {
		t.Fatalf("objects go to %q, want the KVS at %s", client.KvsAddress(), kvs.address)
	}
	var got string
	if result, found, err := client.Get(ctx, "b"); err != nil || !found || result.Decode(&got) != nil || got != "b!" {
		t.Fatalf("Get(b) = %v %v %v", result, found, err)
	}
	if _, found, err := client.Get(ctx, "none"); err != nil || found {
		t.Fatalf("Get(none) found %v, %v", found, err)
	}
	for _, want := range []bool{true, false} {
		if existed, err := client.Delete(ctx, "a"); err != nil || existed != want {
			t.Fatalf("Delete(a) = %v, %v; want %v", existed, err, want)
		}
	}
	// A value over MaxStreamedPutBytes goes in a unary call, holding up no small op.
	large := strings.Repeat("x", MaxStreamedPutBytes+1)
	if err := client.Put(ctx, "large", large); err != nil {
		t.Fatal(err)
	}
	if result, _, err := client.Get(ctx, "large"); err != nil || result.Decode(&got) != nil || got != large {
		t.Fatalf("Get(large): %v", err)
	}
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	if kvs.opened.Load() != 1 || kvs.frames.Load() != 8 || kvs.unary.Load() != 1 {
		t.Fatalf("the KVS got %d streams with %d frames and %d unary calls; want 1 stream of 8 frames and the large put's unary call",
			kvs.opened.Load(), kvs.frames.Load(), kvs.unary.Load())
	}
	if scheduler.opened.Load() != 0 || scheduler.unary.Load() != 0 {
		t.Fatal("ops went to the scheduler")
	}
	waitGoroutines(t, before)
}

func TestOnlyAnAddressThatServesStreamsAndTheSwitchGetStreams(t *testing.T) {
	serve := startTestKvs(t, &testKvs{streams: true}) // as `cbgrpc serve` answers
	proxy := startTestKvs(t, &testKvs{})              // as a scheduler's proxy answers
	ctx := testContext(t)
	use := func(address string) {
		client := dialTest(t, address, DirectKvsOff)
		defer client.Close()
		if err := client.Put(ctx, "k", 1); err != nil {
			t.Fatal(err)
		}
		if _, found, err := client.Get(ctx, "k"); err != nil || !found {
			t.Fatalf("Get(k) found %v, %v", found, err)
		}
		if existed, err := client.Delete(ctx, "k"); err != nil || !existed {
			t.Fatalf("Delete(k) = %v, %v", existed, err)
		}
	}
	use(serve.address)
	use(proxy.address)
	if serve.opened.Load() != 1 || serve.frames.Load() != 3 || serve.unary.Load() != 0 {
		t.Fatalf("`serve` got %d streams, %d frames, %d unary calls; want its ops as 3 frames of 1 stream", serve.opened.Load(), serve.frames.Load(), serve.unary.Load())
	}
	if proxy.opened.Load() != 0 || proxy.unary.Load() != 3 {
		t.Fatalf("the proxy got %d streams and %d unary calls; want 3 unary calls", proxy.opened.Load(), proxy.unary.Load())
	}
	t.Setenv(StreamEnv, "0")
	use(serve.address)
	if serve.opened.Load() != 1 || serve.unary.Load() != 3 {
		t.Fatalf("with %s=0 `serve` got %d streams and %d unary calls; want 3 unary calls", StreamEnv, serve.opened.Load()-1, serve.unary.Load())
	}
}

func TestAStreamedOpFailsWithTheErrorOfItsUnaryCall(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{streams: true})
	ctx := testContext(t)
	refusals := func() []error {
		client := dialTest(t, kvs.address, DirectKvsOff)
		defer client.Close()
		err := client.Put(ctx, "", 1)
		_, _, getErr := client.Get(ctx, "")
		return []error{err, getErr}
	}
	streamed := refusals()
	if kvs.opened.Load() != 1 || kvs.unary.Load() != 0 {
		t.Fatalf("the refused ops made %d streams and %d unary calls; want them on 1 stream", kvs.opened.Load(), kvs.unary.Load())
	}
	t.Setenv(StreamEnv, "0")
	unaryErrors := refusals()
	if kvs.unary.Load() != 2 {
		t.Fatalf("with %s=0 the KVS got %d unary calls, want 2", StreamEnv, kvs.unary.Load())
	}
	for i := range streamed {
		var typed *Error
		if !errors.As(streamed[i], &typed) || typed.Reason != ReasonInvalidArgument || typed.Metadata["field"] != "key" {
			t.Errorf("a refused streamed op gave %#v; want an *Error with the KVS's reason and metadata", streamed[i])
		}
		if !reflect.DeepEqual(streamed[i], unaryErrors[i]) {
			t.Errorf("streamed: %#v, unary: %#v; want the same error", streamed[i], unaryErrors[i])
		}
	}
}

func TestADeadlineEndsAWaitingOpAndTheStreamGoesOn(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{streams: true})
	client := dialTest(t, kvs.address, DirectKvsOff)
	defer client.Close()
	ctx := testContext(t)
	if err := client.Put(ctx, "k", 1); err != nil { // the stream is open
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	started := time.Now()
	err := client.Put(short, "held", 1)
	var typed *Error
	if !errors.As(err, &typed) || typed.Code != codes.DeadlineExceeded || typed.Message != "context deadline exceeded" {
		t.Fatalf("a put past its deadline gave %v; want DeadlineExceeded as from its unary call", err)
	}
	if waited := time.Since(started); waited > 5*time.Second {
		t.Fatalf("the op ended %v after its 300ms deadline", waited)
	}
	<-kvs.holding // the KVS still has it
	cancelled, cancelNow := context.WithCancel(ctx)
	cancelNow()
	if err := client.Put(cancelled, "k", 2); !errors.As(err, &typed) || typed.Code != codes.Canceled {
		t.Fatalf("a put with a cancelled context gave %v; want Canceled", err)
	}
	if _, found, err := client.Get(ctx, "k"); err != nil || !found {
		t.Fatalf("the next op found %v, %v", found, err)
	}
	if kvs.opened.Load() != 1 || kvs.unary.Load() != 0 {
		t.Fatalf("the KVS got %d streams and %d unary calls; want every op on one stream", kvs.opened.Load(), kvs.unary.Load())
	}
}

func TestABrokenStreamFailsItsOpsWithUnavailableAndReopens(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{streams: true})
	client := dialTest(t, kvs.address, DirectKvsOff)
	defer client.Close()
	ctx := testContext(t)
	for round, breaker := range []string{"break", "ends"} {
		held := make(chan error, 1)
		go func() { held <- client.Put(ctx, "held", 1) }()
		<-kvs.holding
		err := client.Put(ctx, breaker, 1)
		var typed *Error
		if !errors.As(err, &typed) || typed.Code != codes.Unavailable {
			t.Fatalf("the op that broke the stream gave %v; want Unavailable", err)
		}
		if err := <-held; !errors.As(err, &typed) || typed.Code != codes.Unavailable {
			t.Fatalf("the op waiting on the broken stream gave %v; want Unavailable", err)
		}
		if err := client.Put(ctx, "after", round); err != nil {
			t.Fatalf("the op after the break: %v", err)
		}
		if kvs.opened.Load() != int64(round+2) || kvs.unary.Load() != 0 {
			t.Fatalf("the KVS got %d streams and %d unary calls; want a new stream after each break", kvs.opened.Load(), kvs.unary.Load())
		}
	}
}

func TestCloseFailsTheOpsItDidNotAnswerAndLeavesNoGoroutine(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{streams: true})
	ctx := testContext(t)
	before := runtime.NumGoroutine()
	client := dialTest(t, kvs.address, DirectKvsOff)
	if err := client.Put(ctx, "k", 1); err != nil {
		t.Fatal(err)
	}
	held := make(chan error, 1)
	go func() { held <- client.Put(ctx, "held", 1) }()
	<-kvs.holding
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	var typed *Error
	if err := <-held; !errors.As(err, &typed) || typed.Code != codes.Unavailable {
		t.Fatalf("the op in flight at Close gave %v; want Unavailable", err)
	}
	if kvs.opened.Load() != 1 {
		t.Fatalf("the KVS got %d streams, want 1", kvs.opened.Load())
	}
	waitGoroutines(t, before)
}

func TestAServiceWithoutStreamOpsGetsUnaryCalls(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{streams: true, noStreams: true})
	client := dialTest(t, kvs.address, DirectKvsOff)
	defer client.Close()
	ctx := testContext(t)
	for range 3 {
		if err := client.Put(ctx, "k", 1); err != nil {
			t.Fatal(err)
		}
		if _, found, err := client.Get(ctx, "k"); err != nil || !found {
			t.Fatalf("Get(k) found %v, %v", found, err)
		}
	}
	if kvs.opened.Load() != 1 || kvs.unary.Load() != 6 {
		t.Fatalf("the service got %d streams and %d unary calls; want 1 refused stream, then unary calls", kvs.opened.Load(), kvs.unary.Load())
	}
}

func TestBatchedAnswersThatWereNotAskedForAreRefused(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{streams: true})
	client := dialTest(t, kvs.address, DirectKvsOff)
	defer client.Close()
	ctx := testContext(t)
	err := client.Put(ctx, "batch", 1)
	var typed *Error
	if !errors.As(err, &typed) || typed.Code != codes.Internal || !strings.Contains(typed.Message, "reads_batches") {
		t.Fatalf("an answer in a batch gave %v; want Internal naming reads_batches", err)
	}
	if err := client.Put(ctx, "k", 1); err != nil || kvs.opened.Load() != 2 {
		t.Fatalf("the next op: %v, on stream %d; want it on a new stream", err, kvs.opened.Load())
	}
}

func TestAnAnswerOfTheWrongKindIsAProtocolError(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{streams: true})
	client := dialTest(t, kvs.address, DirectKvsOff)
	defer client.Close()
	ctx := testContext(t)
	if err := client.Put(ctx, "wrongkind", 1); err != nil {
		t.Fatalf("a put answered with a put result: %v", err)
	}
	_, _, err := client.Get(ctx, "wrongkind")
	var typed *Error
	want := "answered the get of sequence 2 on a StreamOps stream with a put result, not a get result or an error"
	if !errors.As(err, &typed) || typed.Code != codes.Internal || !strings.Contains(typed.Message, want) {
		t.Fatalf("a get answered with a put result gave %v; want Internal saying %q", err, want)
	}
	_, err = client.Delete(ctx, "noresult")
	if !errors.As(err, &typed) || typed.Code != codes.Internal || !strings.Contains(typed.Message, "delete of sequence 3 on a StreamOps stream with no result") {
		t.Fatalf("a delete answered with no result gave %v; want Internal naming no result", err)
	}
	if kvs.unary.Load() != 0 || kvs.opened.Load() != 2 {
		t.Fatalf("%d unary calls, %d streams; want no op asked again, and a new stream after the first failure", kvs.unary.Load(), kvs.opened.Load())
	}
	if err := client.Put(ctx, "k", 1); err != nil || kvs.opened.Load() != 3 {
		t.Fatalf("the next op: %v, on stream %d; want it on the third stream", err, kvs.opened.Load())
	}
}
