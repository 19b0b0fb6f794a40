package cloudburst

import (
	"bytes"
	"context"
	"testing"

	"google.golang.org/protobuf/proto"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

// recorded is what a test KVS received: its writes and deletes.
func (k *testKvs) recorded() ([]*cloudburstv1.PutValueRequest, []*cloudburstv1.DeleteValueRequest) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]*cloudburstv1.PutValueRequest(nil), k.puts...), append([]*cloudburstv1.DeleteValueRequest(nil), k.deletes...)
}

func TestAWriteRetriedThroughTheSchedulerIsTheSameWrite(t *testing.T) {
	// The KVS applies each write and delete, then answers codes.Unavailable: the client sends it
	// again through the scheduler.
	kvs := startTestKvs(t, &testKvs{streams: true, lostAnswers: true, maxValue: 8 << 20})
	scheduler := startTestKvs(t, &testKvs{kvsAddress: []string{kvs.address}, maxValue: 8 << 20})
	ctx := testContext(t)
	ids := map[string]bool{}
	for _, write := range []struct {
		name string
		run  func(context.Context, *Client) error
	}{
		{"a small value (a frame of the stream)", func(ctx context.Context, c *Client) error { return c.Put(ctx, "small", "x") }},
		{"a large value (unary)", func(ctx context.Context, c *Client) error { return c.Put(ctx, "large", randomBytes(300<<10)) }},
		{"a value in chunks", func(ctx context.Context, c *Client) error { return c.Put(ctx, "chunked", randomBytes(2<<20)) }},
		{"a delete", func(ctx context.Context, c *Client) error { _, err := c.Delete(ctx, "small"); return err }},
	} {
		// A client of its own: after the lost answer the client stays with the scheduler.
		client := dialTest(t, scheduler.address, DirectKvsOn)
		earlier, earlierDeletes := kvs.recorded()
		putsBefore, deletesBefore := len(earlier), len(earlierDeletes)
		if err := write.run(ctx, client); err != nil {
			t.Fatalf("%s: %v", write.name, err)
		}
		if client.KvsAddress() != "" {
			t.Fatalf("%s: the client still calls the KVS directly after it answered codes.Unavailable", write.name)
		}
		client.Close()
		direct, directDeletes := kvs.recorded()
		proxied, proxiedDeletes := scheduler.recorded()
		direct, directDeletes = direct[putsBefore:], directDeletes[deletesBefore:]
		var first, retry string
		if len(directDeletes) > 0 {
			if len(direct) != 0 || len(directDeletes) != 1 || len(proxiedDeletes) != 1 {
				t.Fatalf("%s: the KVS got %d deletes and the scheduler %d; want 1 each", write.name, len(directDeletes), len(proxiedDeletes))
			}
			first, retry = directDeletes[0].GetRequestId(), proxiedDeletes[0].GetRequestId()
			scheduler.mu.Lock()
			scheduler.deletes = nil
			scheduler.mu.Unlock()
		} else {
			if len(direct) != 1 || len(proxied) != 1 {
				t.Fatalf("%s: the KVS got %d writes and the scheduler %d; want 1 each", write.name, len(direct), len(proxied))
			}
			if !proto.Equal(direct[0].GetLattice(), proxied[0].GetLattice()) {
				t.Fatalf("%s: the retry sent another lattice: %v, then %v", write.name,
					direct[0].GetLattice().GetLww().GetTimestamp(), proxied[0].GetLattice().GetLww().GetTimestamp())
			}
			if stamp := direct[0].GetLattice().GetLww().GetTimestamp(); stamp.GetTimeNs() == 0 || stamp.GetWriterId() == "" {
				t.Fatalf("%s: the write is not stamped (%v): the KVS would stamp each attempt anew", write.name, stamp)
			}
			first, retry = direct[0].GetRequestId(), proxied[0].GetRequestId()
			scheduler.mu.Lock()
			scheduler.puts = nil
			scheduler.mu.Unlock()
		}
		if first == "" || first != retry {
			t.Fatalf("%s: request ids %q, then %q; want one id for both attempts", write.name, first, retry)
		}
		if ids[first] {
			t.Fatalf("%s: request id %q was used by an earlier write", write.name, first)
		}
		ids[first] = true
	}
}

func TestEachWriteIsSizedForTheServiceItGoesTo(t *testing.T) {
	// The KVS takes messages of 1 MiB, the scheduler of 8 MiB: a direct write of 2 MiB goes in
	// chunks.
	kvs := startTestKvs(t, &testKvs{streams: true, maxValue: 16 << 20})
	scheduler := startTestKvs(t, &testKvs{kvsAddress: []string{kvs.address}, maxValue: 16 << 20, maxMessage: 8 << 20})
	ctx := testContext(t)
	client := dialTest(t, scheduler.address, DirectKvsOn)
	defer client.Close()
	value := randomBytes(2 << 20)
	if err := client.Put(ctx, "large", value); err != nil {
		t.Fatalf("a direct Put of 2 MiB to a KVS that takes messages of 1 MiB: %v", err)
	}
	if client.KvsAddress() != kvs.address || kvs.chunkPuts.Load() != 1 {
		t.Fatalf("objects go to %q, and the KVS got %d chunked puts; want %s and 1", client.KvsAddress(), kvs.chunkPuts.Load(), kvs.address)
	}
	var got []byte
	if result, _, err := client.Get(ctx, "large"); err != nil || result.Decode(&got) != nil || !bytes.Equal(got, value) {
		t.Fatalf("Get(large): %v", err)
	}

	// The other way round: the KVS takes 8 MiB, the scheduler 1 MiB. A direct write of 2 MiB
	// goes in one message; once the KVS is lost, through the scheduler, in chunks.
	kvs = startTestKvs(t, &testKvs{streams: true, maxValue: 16 << 20, maxMessage: 8 << 20})
	scheduler = startTestKvs(t, &testKvs{kvsAddress: []string{kvs.address}, maxValue: 16 << 20})
	other := dialTest(t, scheduler.address, DirectKvsOn)
	defer other.Close()
	if err := other.Put(ctx, "large", value); err != nil {
		t.Fatal(err)
	}
	if other.KvsAddress() != kvs.address || kvs.chunkPuts.Load() != 0 || kvs.unary.Load() != 1 {
		t.Fatalf("objects go to %q; the KVS got %d chunked puts and %d unary calls; want %s, 0 and 1",
			other.KvsAddress(), kvs.chunkPuts.Load(), kvs.unary.Load(), kvs.address)
	}
	kvs.server.Stop()
	if err := other.Put(ctx, "large", value); err != nil {
		t.Fatal(err)
	}
	if other.KvsAddress() != "" || scheduler.chunkPuts.Load() != 1 {
		t.Fatalf("objects go to %q; the scheduler got %d chunked puts; want through the scheduler and 1", other.KvsAddress(), scheduler.chunkPuts.Load())
	}
}
