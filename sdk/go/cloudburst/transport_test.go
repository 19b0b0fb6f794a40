package cloudburst

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func env(values map[string]string) func(string) string {
	return func(name string) string { return values[name] }
}

func TestThePingTimeoutIsTheDefaultUnlessTheEnvironmentSetsIt(t *testing.T) {
	cases := map[string]time.Duration{
		"":    DefaultPingTimeout,
		" ":   DefaultPingTimeout,
		"30":  30 * time.Second,
		"0.5": 500 * time.Millisecond,
	}
	for raw, want := range cases {
		got, err := PingTimeout(env(map[string]string{PingTimeoutEnv: raw}))
		if err != nil || got != want {
			t.Errorf("PingTimeout(%q) = %v, %v; want %v", raw, got, err, want)
		}
	}
}

func TestAMalformedPingTimeoutIsRefusedWithItsName(t *testing.T) {
	for _, raw := range []string{"soon", "0", "-1", "86400", "NaN", "inf"} {
		_, err := PingTimeout(env(map[string]string{PingTimeoutEnv: raw}))
		if err == nil || !strings.Contains(err.Error(), PingTimeoutEnv) {
			t.Errorf("PingTimeout(%q) gave %v; want an error naming %s", raw, err, PingTimeoutEnv)
		}
	}
	client, err := DialWithOptions("127.0.0.1:1", Options{})
	if err != nil {
		t.Fatalf("DialWithOptions with the default ping timeout: %v", err)
	}
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	t.Setenv(PingTimeoutEnv, "soon")
	if _, err := DialWithOptions("127.0.0.1:1", Options{}); err == nil || !strings.Contains(err.Error(), PingTimeoutEnv) {
		t.Fatalf("DialWithOptions gave %v; want an error naming %s", err, PingTimeoutEnv)
	}
}

func TestDirectKvsIsOnUnlessTurnedOff(t *testing.T) {
	for _, off := range []string{"0", "false", " No ", "OFF"} {
		if directKvsWanted(DirectKvsDefault, env(map[string]string{directKvsEnv: off})) {
			t.Errorf("%s=%q left direct KVS access on", directKvsEnv, off)
		}
		if !directKvsWanted(DirectKvsOn, env(map[string]string{directKvsEnv: off})) {
			t.Errorf("DirectKvsOn with %s=%q turned it off", directKvsEnv, off)
		}
	}
	for _, on := range []string{"", "1", "true", "yes"} {
		if !directKvsWanted(DirectKvsDefault, env(map[string]string{directKvsEnv: on})) {
			t.Errorf("%s=%q turned direct KVS access off", directKvsEnv, on)
		}
	}
	if directKvsWanted(DirectKvsOff, env(nil)) {
		t.Error("DirectKvsOff left direct KVS access on")
	}
}

func TestOnlyAnUnreachableServiceSendsObjectsThroughTheScheduler(t *testing.T) {
	answered, err := status.New(codes.Unavailable, "no executor").WithDetails(&errdetails.ErrorInfo{Domain: Domain, Reason: ReasonNoExecutor})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		err  error
		lost bool
	}{
		{status.Error(codes.Unavailable, "connection refused"), true},
		{answered.Err(), false},
		{status.Error(codes.NotFound, "no such key"), false},
		{status.Error(codes.DeadlineExceeded, "too slow"), false},
		{errors.New("not a status"), false},
		{nil, false},
	}
	for _, c := range cases {
		if got := lostTransport(c.err); got != c.lost {
			t.Errorf("lostTransport(%v) = %v, want %v", c.err, got, c.lost)
		}
	}
	// Where the KVS is stays an open question when the scheduler's answer never came.
	for _, code := range []codes.Code{codes.Unavailable, codes.DeadlineExceeded, codes.Canceled} {
		if !askAgain(status.Error(code, "no answer")) {
			t.Errorf("askAgain(%s) = false, want true", code)
		}
	}
	if askAgain(status.Error(codes.Unimplemented, "no GetLimits")) {
		t.Error("askAgain(Unimplemented) = true, want false")
	}
}

// userAgentRecorder is a health server that records the user agent of each call it answers.
type userAgentRecorder struct {
	grpc_health_v1.UnimplementedHealthServer
	agents chan string
}

func (r *userAgentRecorder) Check(ctx context.Context, _ *grpc_health_v1.HealthCheckRequest) (*grpc_health_v1.HealthCheckResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	r.agents <- strings.Join(md.Get("user-agent"), " ")
	return &grpc_health_v1.HealthCheckResponse{Status: grpc_health_v1.HealthCheckResponse_SERVING}, nil
}

func TestEveryCallNamesTheProtocolVersionInItsUserAgent(t *testing.T) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	recorder := &userAgentRecorder{agents: make(chan string, 1)}
	grpc_health_v1.RegisterHealthServer(server, recorder)
	go func() { _ = server.Serve(listener) }()
	defer server.Stop()

	opts, err := transportOptions(env(nil))
	if err != nil {
		t.Fatal(err)
	}
	opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	conn, err := grpc.NewClient(listener.Addr().String(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := grpc_health_v1.NewHealthClient(conn).Check(ctx, &grpc_health_v1.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	agent := <-recorder.agents
	if !strings.HasPrefix(agent, fmt.Sprintf("cloudburst-protocol/%d ", ProtocolVersion)) {
		t.Fatalf("user agent %q does not start with the protocol token", agent)
	}
}
