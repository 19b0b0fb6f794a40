package cloudburst

import (
	"context"
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
type directKvs struct {
	wanted      bool
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
	inUse   bool                          // whether calls go there now
}

// stubFor returns the stub KVS calls go to now, and whether it is the KVS itself. The first call
// asks the scheduler (GetLimits) where the KVS is, and tries that address.
func (d *directKvs) stubFor(ctx context.Context) (cloudburstv1.KvsServiceClient, bool) {
	if !d.wanted {
		return d.proxy, false
	}
	d.resolve(ctx)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.inUse {
		return d.stub, true
	}
	return d.proxy, false
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
	for _, address := range limits.GetKvsAddresses() {
		conn, err := grpc.NewClient(address, d.dialOptions...)
		if err != nil {
			continue
		}
		stub := cloudburstv1.NewKvsServiceClient(conn)
		probe, cancel := context.WithTimeout(ctx, DirectKvsProbeTimeout)
		_, err = stub.GetLimits(probe, &cloudburstv1.GetLimitsRequest{})
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
		d.mu.Unlock()
		return
	}
}

// call runs an idempotent KVS operation at the KVS; if that is unreachable, through the
// scheduler.
func (d *directKvs) call(ctx context.Context, operation func(cloudburstv1.KvsServiceClient) error) error {
	stub, direct := d.stubFor(ctx)
	err := operation(stub)
	if !direct || !lostTransport(err) {
		return err
	}
	d.leave()
	return operation(d.proxy)
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
	defer d.mu.Unlock()
	if d.conn != nil {
		return d.conn.Close()
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
