// Package cloudburst is a thin, idiomatic Go client for cloudburst-grpc.
//
// Functions and DAGs are written and registered in Python; from Go you call them with native
// values and read native values back, read and write the KVS, and wait for stored results.
// Values travel as JSON (strings as STRING and []byte as BYTES), so they read the same in Python
// and in Go. The generated stubs are in the v1 subpackage for anything this layer does not cover.
// docs/protocol.md in the repository describes the wire protocol.
package cloudburst

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

// Accepted is the serializers this client reads results in, in order of preference: a string
// result comes as STRING, bytes as BYTES, anything else as JSON.
var Accepted = []cloudburstv1.Serializer{
	cloudburstv1.Serializer_SERIALIZER_JSON,
	cloudburstv1.Serializer_SERIALIZER_STRING,
	cloudburstv1.Serializer_SERIALIZER_BYTES,
}

// Client talks to one scheduler (or a load balancer in front of several). It is safe for
// concurrent use.
type Client struct {
	conn     *grpc.ClientConn
	kvs      *directKvs
	clock    *lwwClock
	security security
	refusals *refusals
	// Scheduler is the generated SchedulerService stub, for calls this layer does not wrap.
	Scheduler cloudburstv1.SchedulerServiceClient
	// Kvs is the generated KvsService stub at the scheduler, which forwards to the KVS tier.
	Kvs cloudburstv1.KvsServiceClient
}

// Options configure a Client made with DialWithOptions.
//
// The security settings (Token and the TLS ones) that are empty come from CLOUDBURST_TOKEN,
// CLOUDBURST_TLS_CA, CLOUDBURST_TLS_CERT, CLOUDBURST_TLS_KEY and CLOUDBURST_TLS_SERVER_NAME, as
// for the Python SDK; any of them but the server name makes the connections use TLS. Without any
// (and without DialOptions) the connections are plaintext, which suits loopback and trusted
// networks.
type Options struct {
	// Token is a bearer token (from `cbgrpc token ROLE`) sent with every call as
	// "authorization: Bearer <token>"; its role decides what the client may do. It asks for TLS
	// (trusting the system's roots unless TLSCA is given): a token is never sent in plaintext.
	// A scheduler refuses a token it does not know with codes.Unauthenticated, and a call its
	// role may not make with codes.PermissionDenied, each as an *Error with the server's reason.
	Token string
	// TLSCA is a PEM CA bundle the servers' certificates must chain to; the system's roots
	// when empty.
	TLSCA string
	// TLSCert is a PEM client certificate signed by the cluster's CA, to authenticate with
	// instead of a token (with TLSKey). One that has expired or is not valid yet makes Dial fail
	// with an *Error (codes.Unauthenticated) that names the file and the date; one a server
	// refuses in the TLS handshake fails calls with an *Error (codes.Unauthenticated) that names
	// the server and the file and says why, as far as the client can tell.
	TLSCert string
	// TLSKey is the PEM key of TLSCert.
	TLSKey string
	// TLSServerName is the name the servers' certificates must carry, when not the host dialled.
	TLSServerName string
	// DialOptions are passed to grpc.NewClient for the scheduler's connection and for the KVS's,
	// after the client's own (keepalive, connection timeout, MaxReceiveBytes, the TLS and token
	// of the settings above), which they may override: grpc.WithTransportCredentials gives TLS
	// configured otherwise. A smaller grpc.MaxCallRecvMsgSize than MaxReceiveBytes fails reads
	// of the values and results that do not fit it.
	DialOptions []grpc.DialOption
	// DirectKvs says whether Put and Get go to the KVS itself when the scheduler names its
	// address (a cluster's scheduler does): one network hop instead of two. When that address
	// does not answer, within DirectKvsProbeTimeout of the first KVS call or later, objects go
	// through the scheduler, and the KVS is tried again now and then. With TLS only a client
	// that shows a certificate goes direct (the KVS takes no tokens): a client with only a token
	// stays with the scheduler, as with the Python SDK. The default is on unless
	// CLOUDBURST_DIRECT_KVS=0.
	DirectKvs DirectKvs
}

// Dial connects to a scheduler at address ("host:port"). Without options, and without the
// environment variables of Options (CLOUDBURST_TOKEN, CLOUDBURST_TLS_*), the connection is
// plaintext, which suits loopback and trusted networks. It is DialWithOptions with only
// DialOptions set.
func Dial(address string, opts ...grpc.DialOption) (*Client, error) {
	return DialWithOptions(address, Options{DialOptions: opts})
}

// DialWithOptions connects to a scheduler at address ("host:port"). The connection pings the
// scheduler when it has read nothing for KeepaliveTime and gives it up (its calls end with
// UNAVAILABLE) when a ping goes unanswered for PingTimeout: a hung scheduler fails calls within
// seconds instead of at their deadlines. An invalid CLOUDBURST_PING_TIMEOUT_SECONDS is an error,
// as are TLS files that cannot be used and a client certificate out of its validity dates.
func DialWithOptions(address string, options Options) (*Client, error) {
	opts, err := transportOptions(os.Getenv)
	if err != nil {
		return nil, err
	}
	settings := resolveSecurity(options, os.Getenv)
	refusals := newRefusals()
	secure, err := settings.dialOptions(time.Now(), refusals)
	if err != nil {
		return nil, err
	}
	opts = append(opts, secure...)
	if len(secure) == 0 && len(options.DialOptions) == 0 {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	opts = append(opts, options.DialOptions...)
	conn, err := grpc.NewClient(address, opts...)
	if err != nil {
		if settings.token != "" && strings.Contains(err.Error(), "transport level security") {
			return nil, fmt.Errorf("cloudburst: a token (Options.Token or %s) is sent only over TLS, and the dial options given make the connection to %q plaintext", TokenEnv, address)
		}
		return nil, fmt.Errorf("cloudburst: cannot connect to %q: %w", address, err)
	}
	proxy := cloudburstv1.NewKvsServiceClient(conn)
	return &Client{
		conn:     conn,
		security: settings,
		refusals: refusals,
		kvs: &directKvs{
			wanted:      directKvsWanted(options.DirectKvs, os.Getenv),
			streams:     streamWanted(os.Getenv),
			target:      address,
			dialOptions: opts,
			proxy:       proxy,
			closed:      make(chan struct{}),
			// Until a service answers GetLimits: InlineValueBytes, and no limit on a value.
			directLimits: limitsOf(nil),
			proxyLimits:  limitsOf(nil),
		},
		clock:     newLwwClock(),
		Scheduler: cloudburstv1.NewSchedulerServiceClient(conn),
		Kvs:       proxy,
	}, nil
}

// rpcError is errorFromRPC(err), but codes.Unauthenticated, saying why, when a server refused
// the client certificate in the TLS handshake.
func (c *Client) rpcError(err error) error {
	return c.security.certificateRefused(errorFromRPC(err), c.refusals, time.Now())
}

// KvsAddress is the address of the KVS that Put and Get go to directly; "" while they go
// through the scheduler (before the first of them, too).
func (c *Client) KvsAddress() string {
	return c.kvs.current()
}

// Close closes the connections.
func (c *Client) Close() error {
	kvsErr := c.kvs.close()
	if err := c.conn.Close(); err != nil {
		return err
	}
	return kvsErr
}

// CallFunction calls a registered function with args and waits for its result. A function that
// raises returns a *FunctionError; a runtime error returns an *Error.
func (c *Client) CallFunction(ctx context.Context, name string, args ...any) (*Result, error) {
	arguments, err := encodeArguments(args, name)
	if err != nil {
		return nil, err
	}
	response, err := c.Scheduler.CallFunction(ctx, &cloudburstv1.CallFunctionRequest{
		Name:              name,
		Arguments:         arguments,
		DirectResponse:    true,
		AcceptSerializers: Accepted,
	})
	if err != nil {
		return nil, c.rpcError(err)
	}
	return resultOf(response.GetOutcome())
}

// CallDag calls a registered DAG and waits for its sink's result. args maps a function of the
// DAG to its arguments (passed before the results of its upstream functions).
func (c *Client) CallDag(ctx context.Context, name string, args map[string][]any) (*Result, error) {
	request, err := dagRequest(name, args)
	if err != nil {
		return nil, err
	}
	request.DirectResponse = true
	response, err := c.Scheduler.CallDag(ctx, request)
	if err != nil {
		return nil, c.rpcError(err)
	}
	return resultOf(response.GetOutcome())
}

// StartDag calls a DAG without waiting: its result is stored, and the returned response key
// reads it with WaitResult. A result nobody reads expires after the scheduler's result time-to-live.
func (c *Client) StartDag(ctx context.Context, name string, args map[string][]any) (string, error) {
	request, err := dagRequest(name, args)
	if err != nil {
		return "", err
	}
	response, err := c.Scheduler.CallDag(ctx, request)
	if err != nil {
		return "", c.rpcError(err)
	}
	return response.GetResponseKey(), nil
}

// WaitResult waits (until ctx is done) for the result stored under a response key. With
// release, the stored result is deleted once read.
func (c *Client) WaitResult(ctx context.Context, responseKey string, release bool) (*Result, error) {
	response, err := c.Scheduler.GetResult(ctx, &cloudburstv1.GetResultRequest{
		ResponseKey: responseKey,
		Release:     release,
	})
	if err != nil {
		return nil, c.rpcError(err)
	}
	return resultOf(response.GetOutcome())
}

// Put stores value under a user key (last writer wins).
//
// The write is stamped once, here, with this client's last-writer-wins timestamp (wall-clock
// nanoseconds, strictly increasing per Client, and a random writer id), and given a random
// request id (PutValueRequest.request_id). A direct write that finds the KVS unreachable is sent
// again through the scheduler as the same request: the same lattice and the same request id.
// Merging the same lattice again changes nothing, so a first attempt that the KVS applied before
// its answer was lost and the retry together store the value once, with one timestamp: the retry
// cannot overwrite a newer write made in between. A KVS with a memory or SQLite store also
// remembers the last 4096 request ids of puts and deletes (with their key; in memory, so not
// across a restart) and applies no retry again (a retried Delete answers as its first attempt did);
// one with a Valkey store keeps no ids and relies on the merge alone. A KVS refuses a write
// stamped more than kvs.max_clock_skew_seconds ahead of its own clock: keep the client's clock
// in sync (NTP).
//
// Put, Get and Delete go as frames of one KvsService.StreamOps stream of the connection where
// the service serves it (the KVS itself; not a scheduler's proxy), and end as their unary calls
// would; a value over MaxStreamedPutBytes, and every op when StreamEnv is 0, goes in a unary call.
//
// A value over InlineValueBytes (or over the message limit of the service the write goes to, the
// KVS or the scheduler, from its own GetLimits answer, when that is smaller) goes in ChunkBytes
// chunks with KvsService.PutValueChunks; one over that service's limit on a value
// (GetLimits.max_value_bytes) is refused before it is sent, with an *Error whose Reason is
// ReasonPayloadTooLarge.
func (c *Client) Put(ctx context.Context, key string, value any) error {
	encoded, err := Encode(value)
	if err != nil {
		return err
	}
	request := &cloudburstv1.PutValueRequest{
		Key:      key,
		Keyspace: cloudburstv1.Keyspace_KEYSPACE_USER,
		Lattice: &cloudburstv1.Lattice{Kind: &cloudburstv1.Lattice_Lww{Lww: &cloudburstv1.LwwLattice{
			Timestamp: c.clock.now(),
			Value:     encoded,
		}}},
		RequestId:   newRequestID(),
		OmitLattice: true,
	}
	return c.rpcError(c.kvs.put(ctx, request))
}

// Get reads the value stored under a user key; found is false when there is none. A value
// written by Python must be JSON, a string or bytes to be read here (see docs/protocol.md).
//
// A value too large for one message (over MaxPayloadBytes or the KVS's own limit: the KVS
// answers it as chunked) is read in chunks with KvsService.GetValueChunks.
func (c *Client) Get(ctx context.Context, key string) (result *Result, found bool, err error) {
	request := &cloudburstv1.GetValueRequest{
		Key: key, Keyspace: cloudburstv1.Keyspace_KEYSPACE_USER, MaxMessageBytes: MaxPayloadBytes,
	}
	answer, err := c.kvs.op(ctx, &cloudburstv1.StreamOpsRequest{Op: &cloudburstv1.StreamOpsRequest_Get{Get: request}})
	if err != nil {
		return nil, false, c.rpcError(err)
	}
	response := answer.GetGet()
	if !response.GetFound() {
		return nil, false, nil
	}
	if !response.GetChunked() {
		lww := response.GetLattice().GetLww()
		if lww == nil {
			return nil, true, notLww(key, response.GetLattice(), false)
		}
		return &Result{Value: lww.GetValue()}, true, nil
	}
	lattice, data, found, err := c.kvs.getChunks(ctx, request)
	if err != nil {
		return nil, false, c.rpcError(err)
	}
	if !found { // deleted since it was read
		return nil, false, nil
	}
	lww := lattice.GetLww()
	if lww == nil {
		return nil, true, notLww(key, lattice, true)
	}
	value := lww.GetValue()
	if value == nil {
		value = &cloudburstv1.Value{}
	}
	value.Data = data
	return &Result{Value: value}, true, nil
}

// notLww is the error of Get for a key whose lattice is not a last-writer-wins value.
func notLww(key string, lattice *cloudburstv1.Lattice, chunked bool) error {
	if lattice.GetSet() == nil {
		return fmt.Errorf("cloudburst: the KVS answered key %q as found without a lattice this client reads; it may be newer than this client: update the client", key)
	}
	if chunked {
		return fmt.Errorf("cloudburst: key %q holds a set lattice, too large for one message; read it with the Kvs stub's GetValueChunks (its chunks joined are the encoded SetLattice)", key)
	}
	return fmt.Errorf("cloudburst: key %q holds a set lattice; read it with the Kvs stub", key)
}

// Delete deletes the value stored under a user key; existed says whether there was one.
//
// The delete carries a random request id (DeleteValueRequest.request_id), sent again with it when
// a direct delete finds the KVS unreachable and goes through the scheduler. A KVS with a memory
// or SQLite store that applied the first attempt answers the retry with its answer instead of
// deleting again, so the retry cannot delete a value written in between (see Put for how long
// ids are remembered); one with a Valkey store deletes again, and then answers existed false
// unless the key was written in between.
func (c *Client) Delete(ctx context.Context, key string) (existed bool, err error) {
	request := &cloudburstv1.DeleteValueRequest{Key: key, Keyspace: cloudburstv1.Keyspace_KEYSPACE_USER, RequestId: newRequestID()}
	answer, err := c.kvs.op(ctx, &cloudburstv1.StreamOpsRequest{Op: &cloudburstv1.StreamOpsRequest_Delete{Delete: request}})
	if err != nil {
		return false, c.rpcError(err)
	}
	return answer.GetDelete().GetExisted(), nil
}

func dagRequest(name string, args map[string][]any) (*cloudburstv1.CallDagRequest, error) {
	request := &cloudburstv1.CallDagRequest{
		Name:              name,
		FunctionArguments: map[string]*cloudburstv1.ArgumentList{},
		AcceptSerializers: Accepted,
	}
	for function, values := range args {
		arguments, err := encodeArguments(values, function)
		if err != nil {
			return nil, err
		}
		request.FunctionArguments[function] = &cloudburstv1.ArgumentList{Arguments: arguments}
	}
	return request, nil
}

func encodeArguments(args []any, function string) ([]*cloudburstv1.Argument, error) {
	arguments := make([]*cloudburstv1.Argument, 0, len(args))
	for index, arg := range args {
		value, err := Encode(arg)
		if err != nil {
			return nil, fmt.Errorf("cloudburst: argument %d of %q: %w", index+1, function, err)
		}
		arguments = append(arguments, &cloudburstv1.Argument{Kind: &cloudburstv1.Argument_Value{Value: value}})
	}
	return arguments, nil
}
