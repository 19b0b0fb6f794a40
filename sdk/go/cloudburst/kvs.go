package cloudburst

import (
	"context"
	"fmt"
	"sync"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

// DirectKvs says whether Put and Get read and write objects at the KVS itself.
type DirectKvs int

const (
	// DirectKvsDefault goes to the KVS directly unless CLOUDBURST_DIRECT_KVS is 0, false, no
	// or off.
	DirectKvsDefault DirectKvs = iota
	// DirectKvsOn goes to the KVS directly whatever the environment says.
	DirectKvsOn
	// DirectKvsOff always goes through the scheduler.
	DirectKvsOff
)

// DirectKvsProbeTimeout is how long a KVS address the scheduler names may take to answer before
// objects go through the scheduler instead.
const DirectKvsProbeTimeout = 2 * time.Second

// The pause before a lost KVS address is tried again, doubling after each failure up to the
// longest. Variables so that this package's tests can shorten them.
var (
	directRetry    = 5 * time.Second
	directRetryMax = 120 * time.Second
)

// directKvs routes KVS calls: to the KVS the scheduler names when it answers, else through the
// scheduler, whose KvsService forwards to the KVS tier (two hops instead of one). A direct call
// that finds the KVS unreachable is made again through the scheduler, which then serves every
// KVS call until the KVS answers again.
//
// Small ops (GetValue, PutValue, DeleteValue) go as frames of one StreamOps stream per connection
// (see opStream) where the service streams them: at the KVS itself, and at the address the client
// connected to when its GetLimits answer sets serves_op_streams (`cbgrpc serve`); a scheduler's
// proxy clears it and gets unary calls.
type directKvs struct {
	wanted      bool
	streams     bool   // CLOUDBURST_KVS_STREAM lets ops go on streams
	target      string // the address the client connected to
	dialOptions []grpc.DialOption
	proxy       cloudburstv1.KvsServiceClient
	closed      chan struct{}
	closeOnce   sync.Once

	// resolving is held while the scheduler is asked where the KVS is (once it answered).
	resolving sync.Mutex
	resolved  bool

	mu      sync.Mutex
	address string                        // the KVS dialled directly; "" before one answered
	conn    *grpc.ClientConn              // its connection
	stub    cloudburstv1.KvsServiceClient // its stub
	ops     *opStream                     // its stream of ops; nil without streams
	inUse   bool                          // whether calls go there now

	proxyOps *opStream // the stream of ops at target, when it serves them; else nil

	// The limits of each service, from its own GetLimits answer: a write is sized for the
	// service that receives it.
	directLimits limits // the KVS dialled directly
	proxyLimits  limits // the address the client connected to (a scheduler's proxy)
}

// route is where a KVS call goes: a stub, its stream of ops (nil: ops go as unary calls), whether
// it is the KVS itself, and that service's limits.
type route struct {
	stub   cloudburstv1.KvsServiceClient
	ops    *opStream
	direct bool
	limits limits
}

// routeFor returns where KVS calls go now. The first call asks the scheduler (GetLimits) where
// the KVS is, and tries that address.
func (d *directKvs) routeFor(ctx context.Context) route {
	d.resolve(ctx)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.inUse {
		return route{stub: d.stub, ops: d.ops, direct: true, limits: d.directLimits}
	}
	return d.proxyRoute()
}

// proxyRoute is the route through the address the client connected to; d.mu is held.
func (d *directKvs) proxyRoute() route {
	return route{stub: d.proxy, ops: d.proxyOps, limits: d.proxyLimits}
}

// viaProxy is the route through the address the client connected to, for a call made again
// there after the KVS was found unreachable.
func (d *directKvs) viaProxy() route {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.proxyRoute()
}

func (d *directKvs) resolve(ctx context.Context) {
	d.resolving.Lock()
	defer d.resolving.Unlock()
	if d.resolved {
		return
	}
	limits, err := d.proxy.GetLimits(ctx, &cloudburstv1.GetLimitsRequest{})
	if err != nil {
		// A scheduler that cannot be reached (or not before the call's deadline) is asked
		// again by the next call; one that answered with an error names no KVS.
		d.resolved = !askAgain(err)
		return
	}
	d.resolved = true
	d.mu.Lock()
	d.proxyLimits = limitsOf(limits)
	if d.streams && limits.GetServesOpStreams() {
		d.proxyOps = newOpStream(d.proxy, streamName(d.target))
	}
	d.mu.Unlock()
	if !d.wanted {
		return
	}
	for _, address := range limits.GetKvsAddresses() {
		conn, err := grpc.NewClient(address, d.dialOptions...)
		if err != nil {
			continue
		}
		stub := cloudburstv1.NewKvsServiceClient(conn)
		probe, cancel := context.WithTimeout(ctx, DirectKvsProbeTimeout)
		own, err := stub.GetLimits(probe, &cloudburstv1.GetLimitsRequest{})
		cancel()
		if err != nil {
			// Unreachable, or (with TLS) it refused this client: the KVS's port asks for a
			// client certificate, so a client with a token stays with the scheduler.
			conn.Close()
			if ctx.Err() != nil {
				d.resolved = false // the caller's deadline, not the KVS, ended the probe
				return
			}
			continue
		}
		d.mu.Lock()
		d.address, d.conn, d.stub, d.inUse = address, conn, stub, true
		d.directLimits = limitsOf(own)
		if d.streams {
			d.ops = newOpStream(stub, streamName(address))
		}
		d.mu.Unlock()
		return
	}
}

// op runs an idempotent KVS op (a read, write or delete) at the KVS; if that is unreachable,
// through the scheduler. Its answer is the unary call's, in a StreamOpsResponse.
func (d *directKvs) op(ctx context.Context, op *cloudburstv1.StreamOpsRequest) (*cloudburstv1.StreamOpsResponse, error) {
	to := d.routeFor(ctx)
	answer, err := send(ctx, to.stub, to.ops, op)
	if !to.direct || !lostTransport(err) {
		return answer, err
	}
	d.leave()
	to = d.viaProxy()
	return send(ctx, to.stub, to.ops, op)
}

// send runs op on the stream ops when there is one and the op fits it, else in a unary call.
func send(ctx context.Context, stub cloudburstv1.KvsServiceClient, ops *opStream, op *cloudburstv1.StreamOpsRequest) (*cloudburstv1.StreamOpsResponse, error) {
	if ops != nil && len(op.GetPut().GetLattice().GetLww().GetValue().GetData()) <= MaxStreamedPutBytes {
		answer, err := ops.request(ctx, op)
		if err != errFallback {
			return answer, err
		}
	}
	return unary(ctx, stub, op)
}

// unary runs op in its unary call.
func unary(ctx context.Context, stub cloudburstv1.KvsServiceClient, op *cloudburstv1.StreamOpsRequest) (*cloudburstv1.StreamOpsResponse, error) {
	switch kind := op.GetOp().(type) {
	case *cloudburstv1.StreamOpsRequest_Get:
		response, err := stub.GetValue(ctx, kind.Get)
		return &cloudburstv1.StreamOpsResponse{Result: &cloudburstv1.StreamOpsResponse_Get{Get: response}}, err
	case *cloudburstv1.StreamOpsRequest_Put:
		response, err := stub.PutValue(ctx, kind.Put)
		return &cloudburstv1.StreamOpsResponse{Result: &cloudburstv1.StreamOpsResponse_Put{Put: response}}, err
	case *cloudburstv1.StreamOpsRequest_Delete:
		response, err := stub.DeleteValue(ctx, kind.Delete)
		return &cloudburstv1.StreamOpsResponse{Result: &cloudburstv1.StreamOpsResponse_Delete{Delete: response}}, err
	}
	return nil, fmt.Errorf("cloudburst: a KVS op must be a get, put or delete, not %T", op.GetOp())
}

// leave sends KVS calls through the scheduler until the KVS answers directly again.
func (d *directKvs) leave() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.inUse {
		return
	}
	d.inUse = false
	go d.comeBack()
}

// comeBack tries the KVS's address now and then and uses it again once it answers.
func (d *directKvs) comeBack() {
	delay := directRetry
	for {
		timer := time.NewTimer(delay)
		select {
		case <-d.closed:
			timer.Stop()
			return
		case <-timer.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), delay)
		_, err := d.stub.GetLimits(ctx, &cloudburstv1.GetLimitsRequest{})
		cancel()
		if err == nil {
			d.mu.Lock()
			d.inUse = true
			d.mu.Unlock()
			return
		}
		delay = min(delay*2, directRetryMax)
	}
}

// current is the address of the KVS that calls go to directly; "" while they go through the
// scheduler.
func (d *directKvs) current() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.inUse {
		return d.address
	}
	return ""
}

func (d *directKvs) close() error {
	d.closeOnce.Do(func() { close(d.closed) })
	d.mu.Lock()
	ops, proxyOps, conn := d.ops, d.proxyOps, d.conn
	d.mu.Unlock()
	for _, stream := range []*opStream{ops, proxyOps} {
		if stream != nil {
			stream.close()
		}
	}
	if conn != nil {
		return conn.Close()
	}
	return nil
}

// askAgain says whether err leaves the question open: the call did not reach the service, or
// ran out of time or was cancelled before it answered.
func askAgain(err error) bool {
	code := status.Code(err)
	return lostTransport(err) || code == codes.DeadlineExceeded || code == codes.Canceled
}

// lostTransport says whether err is UNAVAILABLE from the transport (the service could not be
// reached), not an error a service answered with a reason of its own.
func lostTransport(err error) bool {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.Unavailable {
		return false
	}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.GetDomain() == Domain {
			return false
		}
	}
	return true
}
