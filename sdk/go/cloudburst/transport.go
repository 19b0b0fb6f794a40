package cloudburst

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/keepalive"
)

// KeepaliveTime is how long a connection may go without reading anything before it pings its
// peer. The Python SDK pings every second, but grpc-go raises any client interval below 10 s to
// 10 s (with a warning), so this client uses the smallest interval grpc-go allows.
const KeepaliveTime = 10 * time.Second

// DefaultPingTimeout is how long a ping may go unanswered before the peer is taken for lost and
// every call on the connection ends with UNAVAILABLE: a hung scheduler (SIGSTOP, a stalled VM)
// keeps its connections open, and this is how a caller waiting on it learns that it will not
// answer. PingTimeoutEnv replaces it.
const DefaultPingTimeout = 2 * time.Second

// PingTimeoutEnv is the environment variable that replaces DefaultPingTimeout, in seconds, as
// it does for the Python SDK and cbgrpc: a longer timeout keeps large transfers on slow links
// up, at the cost of noticing hung peers later.
const PingTimeoutEnv = "CLOUDBURST_PING_TIMEOUT_SECONDS"

// ConnectTimeout is how long a new connection may take to be answered: the kernel accepts
// connections for a hung process, which then never answers them.
const ConnectTimeout = 3 * time.Second

// MaxReconnectBackoff is the longest wait between two attempts to reconnect to a lost peer
// (grpc-go's own default grows to 120 s).
const MaxReconnectBackoff = 5 * time.Second

// PingTimeout is how long a ping may go unanswered: PingTimeoutEnv as getenv reads it, else
// DefaultPingTimeout. A value that is not a positive number of seconds below a day is an error
// that names the variable.
func PingTimeout(getenv func(string) string) (time.Duration, error) {
	raw := strings.TrimSpace(getenv(PingTimeoutEnv))
	if raw == "" {
		return DefaultPingTimeout, nil
	}
	seconds, err := strconv.ParseFloat(raw, 64)
	if err != nil || !(seconds > 0 && seconds < 86_400) {
		return 0, fmt.Errorf("cloudburst: %s must be a positive number of seconds (below a day), not %q", PingTimeoutEnv, raw)
	}
	return max(time.Duration(seconds*float64(time.Second)), time.Millisecond), nil
}

// ProtocolVersion is the version of cloudburst-grpc's wire protocol this client speaks: the
// PROTOCOL_VERSION of sdk/python/cloudburst/protocol.py, of the same release (a test checks that
// they agree). Every call names it in the user agent, as ProtocolToken; a server of a release that
// speaks another version refuses the call with FAILED_PRECONDITION, reason
// ReasonProtocolMismatch, instead of misreading it (docs/protocol.md#versions).
const ProtocolVersion = 2

// ProtocolToken is the user agent product token that carries ProtocolVersion.
var ProtocolToken = fmt.Sprintf("cloudburst-protocol/%d", ProtocolVersion)

// transportOptions are the dial options every connection of a client starts with: keepalive
// pings, also without calls (the scheduler permits them every 0.5 s), bounded connection
// attempts, and the protocol version in the user agent.
func transportOptions(getenv func(string) string) ([]grpc.DialOption, error) {
	timeout, err := PingTimeout(getenv)
	if err != nil {
		return nil, err
	}
	connect := backoff.DefaultConfig
	connect.MaxDelay = MaxReconnectBackoff
	return []grpc.DialOption{
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time:                KeepaliveTime,
			Timeout:             timeout,
			PermitWithoutStream: true,
		}),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: connect, MinConnectTimeout: ConnectTimeout}),
		grpc.WithUserAgent(ProtocolToken),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxReceiveBytes)),
	}, nil
}

// directKvsEnv is the environment variable that turns direct KVS access off (0, false, no, off).
const directKvsEnv = "CLOUDBURST_DIRECT_KVS"

func directKvsWanted(mode DirectKvs, getenv func(string) string) bool {
	switch mode {
	case DirectKvsOn:
		return true
	case DirectKvsOff:
		return false
	}
	switch strings.ToLower(strings.TrimSpace(getenv(directKvsEnv))) {
	case "0", "false", "no", "off":
		return false
	}
	return true
}
