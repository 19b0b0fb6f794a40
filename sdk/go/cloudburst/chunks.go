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
	// InlineValueBytes is the largest value Put sends in one message (less when the KVS tier's
	// GetLimits.max_message_bytes, less MessageHeadroomBytes, is smaller); a larger one goes in
	// chunks.
	InlineValueBytes = 4 << 20
	// ChunkBytes is the size of the chunks of a value Put sends in chunks.
	ChunkBytes = 1 << 20
	// MessageHeadroomBytes is what a message carries besides a value (key, timestamp, framing):
	// a value sent in one message is at most GetLimits.max_message_bytes less this.
	MessageHeadroomBytes = 64 << 10
)

// ReasonPayloadTooLarge is the reason of an *Error for a value over the KVS tier's limit.
const ReasonPayloadTooLarge = "PAYLOAD_TOO_LARGE"

// valueLimits is the largest value a key may hold (0: not said) and the largest value a Put
// sends in one message, from the KVS tier's limits.
func valueLimits(limits *cloudburstv1.GetLimitsResponse) (maxValue, inline int) {
	inline = InlineValueBytes
	if message := int(limits.GetMaxMessageBytes()); message > 0 {
		inline = min(inline, max(message-MessageHeadroomBytes, message/2))
	}
	return int(limits.GetMaxValueBytes()), inline
}

// limits is the largest value a key may hold (0 while unknown) and the largest value a Put
// sends in one message.
func (d *directKvs) limits(ctx context.Context) (maxValue, inline int) {
	d.resolve(ctx)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.inline == 0 {
		return d.maxValue, InlineValueBytes
	}
	return d.maxValue, d.inline
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

// putChunks merges put's last-writer-wins value, whose bytes are data, at the KVS; if that is
// unreachable, through the scheduler (whose KvsService forwards PutValueChunks).
func (d *directKvs) putChunks(ctx context.Context, put *cloudburstv1.PutValueRequest, data []byte) error {
	stub, _, direct := d.stubFor(ctx)
	err := putChunks(ctx, stub, put, data)
	if !direct || !lostTransport(err) {
		return err
	}
	d.leave()
	return putChunks(ctx, d.proxy, put, data)
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
	stub, _, direct := d.stubFor(ctx)
	lattice, data, err = getChunks(ctx, stub, get)
	if direct && lostTransport(err) {
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
	stream, err := stub.GetValueChunks(ctx, &cloudburstv1.GetValueChunksRequest{Key: get.GetKey(), Keyspace: get.GetKeyspace()})
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
