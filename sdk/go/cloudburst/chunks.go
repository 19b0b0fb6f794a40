package cloudburst

import (
	"context"
	"errors"
	"fmt"
	"io"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

// A value too large for one message moves in chunks (docs/protocol.md): Put writes a value over
// the inline limit with KvsService.PutValueChunks, and Get reads a value the KVS answers as
// chunked with KvsService.GetValueChunks. The limits are the Python SDK's.
const (
	// InlineValueBytes is the largest value Put sends in one message (less when the
	// GetLimits.max_message_bytes of the service it is sent to, less MessageHeadroomBytes, is
	// smaller); a larger one goes in chunks.
	InlineValueBytes = 4 << 20
	// ChunkBytes is the size of the chunks of a value Put sends in chunks.
	ChunkBytes = 1 << 20
	// MessageHeadroomBytes is what a message carries besides a value (key, timestamp, framing):
	// a value sent in one message is at most GetLimits.max_message_bytes less this.
	MessageHeadroomBytes = 64 << 10
	// MaxPayloadBytes is the largest value Get asks the KVS to send in one message (the
	// runtime's default server.max_payload_bytes, as the Python SDK's default): a larger one
	// comes in chunks.
	MaxPayloadBytes = 16 << 20
	// MaxReceiveBytes is the largest message the client's connections take
	// (grpc.MaxCallRecvMsgSize; gRPC-Go's own default is 4 MiB), as the Python SDK's channels:
	// twice MaxPayloadBytes and 1 MiB, so that a result or value up to the cluster's default
	// limit comes through.
	MaxReceiveBytes = 2*MaxPayloadBytes + 1<<20
)

// ReasonPayloadTooLarge is the reason of an *Error for a value over the KVS tier's limit.
const ReasonPayloadTooLarge = "PAYLOAD_TOO_LARGE"

// limits are a service's limits on the values written to it.
type limits struct {
	maxValue int // the largest value a key may hold (GetLimits.max_value_bytes); 0: not said
	inline   int // the largest value a Put sends in one message; larger ones go in chunks
}

// limitsOf are the limits of a service from its GetLimits answer (nil: it gave none).
func limitsOf(answer *cloudburstv1.GetLimitsResponse) limits {
	inline := InlineValueBytes
	if message := int(answer.GetMaxMessageBytes()); message > 0 {
		inline = min(inline, max(message-MessageHeadroomBytes, message/2))
	}
	return limits{maxValue: int(answer.GetMaxValueBytes()), inline: inline}
}

// tooLarge is the error of a value of size bytes over the limit of a key's value.
func tooLarge(key string, size, limit int) error {
	return &Error{
		Code:   codes.ResourceExhausted,
		Reason: ReasonPayloadTooLarge,
		Message: fmt.Sprintf("the value for key %q is %d bytes serialized, over the limit of %d bytes (the KVS tier's max_value_bytes); "+
			"store large data in smaller pieces or raise the limit (kvs.max_value_bytes)", key, size, limit),
		Metadata: map[string]string{"key": key, "size": fmt.Sprint(size), "limit": fmt.Sprint(limit)},
	}
}

// put merges put's last-writer-wins lattice at the KVS; if that is unreachable, through the
// scheduler. The same request goes each time, so a write the KVS applied before its answer was
// lost merges again as the same write (see Client.Put). Each attempt sizes the write for the
// service it goes to: one message, or chunks (PutValueChunks) when the value is over that
// service's inline limit.
func (d *directKvs) put(ctx context.Context, put *cloudburstv1.PutValueRequest) error {
	to := d.routeFor(ctx)
	err := to.put(ctx, put)
	if !to.direct || !lostTransport(err) {
		return err
	}
	d.leave()
	return d.viaProxy().put(ctx, put)
}

// put sends put to the route's service: refused before it is sent when its value is over the
// service's limit, in chunks when it is over the inline limit, else as one op.
func (r route) put(ctx context.Context, put *cloudburstv1.PutValueRequest) error {
	value := put.GetLattice().GetLww().GetValue()
	data := value.GetData()
	if r.limits.maxValue > 0 && len(data) > r.limits.maxValue {
		return tooLarge(put.GetKey(), len(data), r.limits.maxValue)
	}
	if len(data) > r.limits.inline {
		// The first frame is the write without the bytes (a copy: put keeps them for another
		// attempt); the chunks are slices of them.
		header := &cloudburstv1.PutValueRequest{
			Key:       put.GetKey(),
			Keyspace:  put.GetKeyspace(),
			RequestId: put.GetRequestId(),
			Lattice: &cloudburstv1.Lattice{Kind: &cloudburstv1.Lattice_Lww{Lww: &cloudburstv1.LwwLattice{
				Timestamp: put.GetLattice().GetLww().GetTimestamp(),
				Value:     &cloudburstv1.Value{Serializer: value.GetSerializer()},
			}}},
		}
		return putChunks(ctx, r.stub, header, data)
	}
	_, err := send(ctx, r.stub, r.ops, &cloudburstv1.StreamOpsRequest{Op: &cloudburstv1.StreamOpsRequest_Put{Put: put}})
	return err
}

// putChunks sends put (its value without bytes) and then data in ChunkBytes slices (not copies)
// as one PutValueChunks call.
func putChunks(ctx context.Context, stub cloudburstv1.KvsServiceClient, put *cloudburstv1.PutValueRequest, data []byte) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // a call that ends early is given up
	stream, err := stub.PutValueChunks(ctx)
	if err != nil {
		return err
	}
	frames := []*cloudburstv1.PutValueChunksRequest{{Frame: &cloudburstv1.PutValueChunksRequest_Put{Put: put}}}
	for start := 0; start < len(data); start += ChunkBytes {
		chunk := data[start:min(start+ChunkBytes, len(data))]
		frames = append(frames, &cloudburstv1.PutValueChunksRequest{Frame: &cloudburstv1.PutValueChunksRequest_Chunk{Chunk: chunk}})
	}
	for _, frame := range frames {
		if err := stream.Send(frame); err != nil {
			if errors.Is(err, io.EOF) {
				break // the service ended the call: its status comes with the answer
			}
			return err
		}
	}
	_, err = stream.CloseAndRecv()
	return err
}

// getChunks reads a key's lattice with GetValueChunks at the KVS; if that is unreachable,
// through the scheduler. data is the joined chunks (a last-writer-wins value's bytes, or a set's
// encoded SetLattice); found is false when the key does not exist (any more).
func (d *directKvs) getChunks(ctx context.Context, get *cloudburstv1.GetValueRequest) (lattice *cloudburstv1.Lattice, data []byte, found bool, err error) {
	to := d.routeFor(ctx)
	lattice, data, err = getChunks(ctx, to.stub, get)
	if to.direct && lostTransport(err) {
		d.leave()
		lattice, data, err = getChunks(ctx, d.proxy, get)
	}
	return lattice, data, lattice != nil, err
}

// getChunks reads get's key in one GetValueChunks call: the first frame's lattice (nil when the
// key does not exist) and the chunks after it joined, copied once into a buffer of their size
// (the first frame does not say the size).
func getChunks(ctx context.Context, stub cloudburstv1.KvsServiceClient, get *cloudburstv1.GetValueRequest) (*cloudburstv1.Lattice, []byte, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // a call that ends early is given up
	stream, err := stub.GetValueChunks(ctx, &cloudburstv1.GetValueChunksRequest{
		Key: get.GetKey(), Keyspace: get.GetKeyspace(), MaxMessageBytes: get.GetMaxMessageBytes(),
	})
	if err != nil {
		return nil, nil, err
	}
	var lattice *cloudburstv1.Lattice
	var chunks [][]byte
	size := 0
	for {
		frame, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, nil, err
		}
		switch kind := frame.GetFrame().(type) {
		case *cloudburstv1.GetValueChunksResponse_Lattice:
			lattice = kind.Lattice
		case *cloudburstv1.GetValueChunksResponse_Chunk:
			if lattice == nil {
				return nil, nil, status.Errorf(codes.Internal,
					"GetValueChunks of key %q sent a chunk before the lattice; the service breaks the protocol: report it", get.GetKey())
			}
			chunks = append(chunks, kind.Chunk)
			size += len(kind.Chunk)
		}
	}
	if len(chunks) == 1 {
		return lattice, chunks[0], nil
	}
	data := make([]byte, 0, size)
	for _, chunk := range chunks {
		data = append(data, chunk...)
	}
	return lattice, data, nil
}
