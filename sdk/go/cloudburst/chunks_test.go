package cloudburst

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

// testMessageBytes is the test KVS's limit on a message (GetLimits.max_message_bytes): it
// receives no larger message, and answers GetValue of a larger lattice as chunked.
const testMessageBytes = 1 << 20

// testChunkBytes is the size of the chunks the test KVS sends.
const testChunkBytes = 300 << 10

// PutValueChunks stores the value sent in chunks; a put to "held" waits until its call ends.
func (k *testKvs) PutValueChunks(stream grpc.ClientStreamingServer[cloudburstv1.PutValueChunksRequest, cloudburstv1.PutValueChunksResponse]) error {
	k.chunkPuts.Add(1)
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	put := first.GetPut()
	if put == nil || put.GetLattice().GetLww() == nil || len(put.GetLattice().GetLww().GetValue().GetData()) != 0 {
		return status.Error(codes.InvalidArgument, "the first frame must be the put of a last-writer-wins value without its bytes")
	}
	if put.GetKey() == "held" {
		k.holding <- struct{}{}
		<-stream.Context().Done()
		return status.FromContextError(stream.Context().Err()).Err()
	}
	var data []byte
	for {
		frame, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		chunk := frame.GetChunk()
		if frame.GetPut() != nil {
			return status.Error(codes.InvalidArgument, "after the put, frames are chunks")
		}
		k.putsChunked.Add(1)
		if int64(len(chunk)) > k.largestChunk.Load() {
			k.largestChunk.Store(int64(len(chunk)))
		}
		data = append(data, chunk...)
	}
	lattice := put.GetLattice()
	lattice.GetLww().GetValue().Data = data
	k.mu.Lock()
	k.values[put.GetKey()] = lattice
	k.puts = append(k.puts, put)
	k.mu.Unlock()
	if err := k.lost(); err != nil {
		return err
	}
	return stream.SendAndClose(&cloudburstv1.PutValueChunksResponse{Size: uint64(len(data))})
}

// GetValueChunks sends a stored lattice in chunks: the lattice without its bytes, then the
// bytes. A read of "held" stops after its first chunk until its call ends.
func (k *testKvs) GetValueChunks(request *cloudburstv1.GetValueChunksRequest, stream grpc.ServerStreamingServer[cloudburstv1.GetValueChunksResponse]) error {
	k.chunkGets.Add(1)
	k.mu.Lock()
	stored, found := k.values[request.GetKey()]
	k.mu.Unlock()
	if !found {
		return nil
	}
	var header *cloudburstv1.Lattice
	var data []byte
	if lww := stored.GetLww(); lww != nil {
		header = &cloudburstv1.Lattice{Kind: &cloudburstv1.Lattice_Lww{Lww: &cloudburstv1.LwwLattice{
			Timestamp: lww.GetTimestamp(),
			Value:     &cloudburstv1.Value{Serializer: lww.GetValue().GetSerializer()},
		}}}
		data = lww.GetValue().GetData()
	} else {
		header = &cloudburstv1.Lattice{Kind: &cloudburstv1.Lattice_Set{Set: &cloudburstv1.SetLattice{}}}
		var err error
		if data, err = proto.Marshal(stored.GetSet()); err != nil {
			return err
		}
	}
	if err := stream.Send(&cloudburstv1.GetValueChunksResponse{Frame: &cloudburstv1.GetValueChunksResponse_Lattice{Lattice: header}}); err != nil {
		return err
	}
	for start := 0; start < len(data); start += testChunkBytes {
		chunk := data[start:min(start+testChunkBytes, len(data))]
		if err := stream.Send(&cloudburstv1.GetValueChunksResponse{Frame: &cloudburstv1.GetValueChunksResponse_Chunk{Chunk: chunk}}); err != nil {
			return err
		}
		if request.GetKey() == "held" {
			k.holding <- struct{}{}
			<-stream.Context().Done()
			return status.FromContextError(stream.Context().Err()).Err()
		}
	}
	return nil
}

// randomBytes is size bytes of a fixed pseudo-random sequence.
func randomBytes(size int) []byte {
	data := make([]byte, size)
	source := rand.NewChaCha8([32]byte{7})
	_, _ = source.Read(data)
	return data
}

func TestAValueOverTheMessageLimitIsWrittenAndReadInChunks(t *testing.T) {
	for _, direct := range []DirectKvs{DirectKvsOn, DirectKvsOff} {
		kvs := startTestKvs(t, &testKvs{streams: true, maxValue: 8 << 20})
		scheduler := startTestKvs(t, &testKvs{kvsAddress: []string{kvs.address}, maxValue: 8 << 20})
		ctx := testContext(t)
		before := runtime.NumGoroutine()
		client := dialTest(t, scheduler.address, direct)
		target := kvs
		if direct == DirectKvsOff {
			target = scheduler
		}
		value := randomBytes(3<<20 + 12345)
		if err := client.Put(ctx, "large", value); err != nil {
			t.Fatal(err)
		}
		if target.chunkPuts.Load() != 1 || target.putsChunked.Load() != 4 || target.largestChunk.Load() != ChunkBytes {
			t.Fatalf("the KVS got %d chunked puts of %d chunks, the largest of %d bytes; want 1 of 4 chunks of at most %d bytes",
				target.chunkPuts.Load(), target.putsChunked.Load(), target.largestChunk.Load(), ChunkBytes)
		}
		result, found, err := client.Get(ctx, "large")
		if err != nil || !found {
			t.Fatalf("Get(large) = %v, %v", found, err)
		}
		var got []byte
		if err := result.Decode(&got); err != nil || !bytes.Equal(got, value) {
			t.Fatalf("Get(large) read %d bytes (%v), not the %d written", len(got), err, len(value))
		}
		if target.chunkGets.Load() != 1 {
			t.Fatalf("the KVS got %d GetValueChunks calls, want 1", target.chunkGets.Load())
		}
		// A small value still goes in one message.
		if err := client.Put(ctx, "small", "x"); err != nil {
			t.Fatal(err)
		}
		var small string
		if result, _, err := client.Get(ctx, "small"); err != nil || result.Decode(&small) != nil || small != "x" {
			t.Fatalf("Get(small) = %v, %v", small, err)
		}
		if target.chunkPuts.Load() != 1 || target.chunkGets.Load() != 1 {
			t.Fatal("a small value moved in chunks")
		}
		if err := client.Close(); err != nil {
			t.Fatal(err)
		}
		waitGoroutines(t, before)
	}
}

func TestAValueOverTheLimitIsRefusedBeforeItIsSent(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{maxValue: 2 << 20})
	ctx := testContext(t)
	client := dialTest(t, kvs.address, DirectKvsOff)
	defer client.Close()
	err := client.Put(ctx, "big", randomBytes(2<<20+1))
	var typed *Error
	if !errors.As(err, &typed) || typed.Reason != ReasonPayloadTooLarge || typed.Code != codes.ResourceExhausted {
		t.Fatalf("Put of a value over the limit: %v; want a PAYLOAD_TOO_LARGE *Error", err)
	}
	for _, want := range []string{`"big"`, "2097153 bytes", "limit of 2097152 bytes", "smaller pieces", "kvs.max_value_bytes"} {
		if !strings.Contains(typed.Message, want) {
			t.Errorf("the error %q does not say %q", typed.Message, want)
		}
	}
	if kvs.chunkPuts.Load() != 0 || kvs.unary.Load() != 0 || kvs.frames.Load() != 0 {
		t.Fatal("the refused value was sent")
	}
	// A value of the limit is stored.
	if err := client.Put(ctx, "big", randomBytes(2<<20)); err != nil {
		t.Fatal(err)
	}
}

func TestALargeSetIsNamedAsSuch(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{})
	ctx := testContext(t)
	client := dialTest(t, kvs.address, DirectKvsOff)
	defer client.Close()
	large := &cloudburstv1.Lattice{Kind: &cloudburstv1.Lattice_Set{Set: &cloudburstv1.SetLattice{Values: []*cloudburstv1.Value{{Data: randomBytes(testMessageBytes)}}}}}
	small := &cloudburstv1.Lattice{Kind: &cloudburstv1.Lattice_Set{Set: &cloudburstv1.SetLattice{Values: []*cloudburstv1.Value{{Data: []byte("a")}}}}}
	kvs.mu.Lock()
	kvs.values["large"], kvs.values["small"] = large, small
	kvs.mu.Unlock()
	_, found, err := client.Get(ctx, "large")
	if !found || err == nil || !strings.Contains(err.Error(), "holds a set lattice, too large for one message") || !strings.Contains(err.Error(), "GetValueChunks") {
		t.Fatalf("Get of a large set: %v, %v", found, err)
	}
	_, found, err = client.Get(ctx, "small")
	if !found || err == nil || !strings.Contains(err.Error(), "holds a set lattice;") {
		t.Fatalf("Get of a small set: %v, %v", found, err)
	}
}

func TestAChunkedWriteGoesThroughTheSchedulerWhenTheKvsIsLost(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{maxValue: 8 << 20})
	scheduler := startTestKvs(t, &testKvs{kvsAddress: []string{kvs.address}, maxValue: 8 << 20})
	ctx := testContext(t)
	client := dialTest(t, scheduler.address, DirectKvsOn)
	defer client.Close()
	if err := client.Put(ctx, "small", "x"); err != nil || client.KvsAddress() != kvs.address {
		t.Fatalf("Put(small): %v; objects go to %q, want %s", err, client.KvsAddress(), kvs.address)
	}
	kvs.server.Stop()
	value := randomBytes(2 << 20)
	if err := client.Put(ctx, "large", value); err != nil {
		t.Fatal(err)
	}
	if scheduler.chunkPuts.Load() != 1 || client.KvsAddress() != "" {
		t.Fatalf("the scheduler got %d chunked puts (want 1); objects go to %q", scheduler.chunkPuts.Load(), client.KvsAddress())
	}
	var got []byte
	if result, _, err := client.Get(ctx, "large"); err != nil || result.Decode(&got) != nil || !bytes.Equal(got, value) {
		t.Fatalf("Get(large): %v", err)
	}
	if scheduler.chunkGets.Load() != 1 {
		t.Fatalf("the scheduler got %d GetValueChunks calls, want 1", scheduler.chunkGets.Load())
	}
}

func TestADeadlineEndsAChunkedTransferAndLeavesNoGoroutine(t *testing.T) {
	kvs := startTestKvs(t, &testKvs{maxValue: 8 << 20})
	kvs.values["held"] = &cloudburstv1.Lattice{Kind: &cloudburstv1.Lattice_Lww{Lww: &cloudburstv1.LwwLattice{
		Value: &cloudburstv1.Value{Serializer: cloudburstv1.Serializer_SERIALIZER_BYTES, Data: randomBytes(2 << 20)},
	}}}
	before := runtime.NumGoroutine()
	client := dialTest(t, kvs.address, DirectKvsOff)
	for _, transfer := range []func(context.Context) error{
		func(ctx context.Context) error { _, _, err := client.Get(ctx, "held"); return err },
		func(ctx context.Context) error { return client.Put(ctx, "held", randomBytes(3<<20)) },
	} {
		ctx, cancel := context.WithTimeout(testContext(t), 300*time.Millisecond)
		start := time.Now()
		err := transfer(ctx)
		cancel()
		if status.Code(err) != codes.DeadlineExceeded && !errors.Is(err, context.DeadlineExceeded) {
			var typed *Error
			if !errors.As(err, &typed) || typed.Code != codes.DeadlineExceeded {
				t.Fatalf("a held transfer ended with %v, want DeadlineExceeded", err)
			}
		}
		if elapsed := time.Since(start); elapsed > 10*time.Second {
			t.Fatalf("a held transfer took %v past its deadline of 300ms", elapsed)
		}
		select {
		case <-kvs.holding: // the KVS held it: the deadline, not an error, ended it
		default:
			t.Fatal("the transfer did not reach the KVS")
		}
	}
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	waitGoroutines(t, before)
}
