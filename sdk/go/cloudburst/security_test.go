package cloudburst

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	cloudburstv1 "cloudburst-grpc/sdk/go/cloudburst/v1"
)

// testCA issues certificates for the tests, written as PEM files in dir.
type testCA struct {
	t    *testing.T
	dir  string
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T) *testCA {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	ca := &testCA{t: t, dir: t.TempDir(), cert: cert, key: key}
	ca.write("ca.pem", "CERTIFICATE", der)
	return ca
}

func (ca *testCA) write(name, kind string, der []byte) string {
	path := filepath.Join(ca.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		ca.t.Fatal(err)
	}
	return path
}

// issue writes a certificate valid from notBefore to notAfter (for 127.0.0.1 when server) and
// its key; it returns their paths.
func (ca *testCA) issue(name string, server bool, notBefore, notAfter time.Time) (certFile, keyFile string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		ca.t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		template.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		template.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		ca.t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		ca.t.Fatal(err)
	}
	return ca.write(name+".pem", "CERTIFICATE", der), ca.write(name+"-key.pem", "PRIVATE KEY", keyDER)
}

// recordingKvs answers GetLimits and GetValue (and, when it says it serves them, the gets of
// StreamOps streams) and records the authorization metadata of each call.
type recordingKvs struct {
	cloudburstv1.UnimplementedKvsServiceServer
	streams bool
	mu      sync.Mutex
	seen    []string
}

func (k *recordingKvs) record(ctx context.Context) {
	values := metadata.ValueFromIncomingContext(ctx, "authorization")
	k.mu.Lock()
	defer k.mu.Unlock()
	k.seen = append(k.seen, strings.Join(values, ","))
}

func (k *recordingKvs) GetLimits(ctx context.Context, _ *cloudburstv1.GetLimitsRequest) (*cloudburstv1.GetLimitsResponse, error) {
	k.record(ctx)
	return &cloudburstv1.GetLimitsResponse{ServesOpStreams: k.streams}, nil
}

func (k *recordingKvs) StreamOps(stream grpc.BidiStreamingServer[cloudburstv1.StreamOpsRequest, cloudburstv1.StreamOpsResponse]) error {
	k.record(stream.Context())
	for {
		frame, err := stream.Recv()
		if err != nil {
			return nil
		}
		answer := &cloudburstv1.StreamOpsResponse{Sequence: frame.GetSequence()}
		if frame.GetGet().GetKey() == "refuse" {
			answer.Result = &cloudburstv1.StreamOpsResponse_Error{Error: &cloudburstv1.CallError{Code: int32(codes.Unauthenticated), Message: "the bearer token is not valid"}}
		} else {
			answer.Result = &cloudburstv1.StreamOpsResponse_Get{Get: &cloudburstv1.GetValueResponse{}}
		}
		if err := stream.Send(answer); err != nil {
			return nil
		}
	}
}

func (k *recordingKvs) GetValue(ctx context.Context, request *cloudburstv1.GetValueRequest) (*cloudburstv1.GetValueResponse, error) {
	k.record(ctx)
	if request.GetKey() == "refuse" {
		return nil, status.Error(codes.Unauthenticated, "the bearer token is not valid")
	}
	return &cloudburstv1.GetValueResponse{Found: false}, nil
}

func (k *recordingKvs) calls() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]string(nil), k.seen...)
}

// serveTLS starts a real gRPC server with TLS on 127.0.0.1 port 0; it stops when the test ends.
func serveTLS(t *testing.T, ca *testCA, kvs *recordingKvs) string {
	certFile, keyFile := ca.issue("server", true, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{pair}})))
	cloudburstv1.RegisterKvsServiceServer(server, kvs)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	return listener.Addr().String()
}

func clearSecurityEnvironment(t *testing.T) {
	for _, variable := range []string{TokenEnv, TLSCAEnv, TLSCertEnv, TLSKeyEnv, TLSServerNameEnv} {
		t.Setenv(variable, "")
	}
}

func TestATokenGoesWithEveryCallOverTLS(t *testing.T) {
	clearSecurityEnvironment(t)
	ca := newTestCA(t)
	kvs := &recordingKvs{}
	address := serveTLS(t, ca, kvs)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	byOption, err := DialWithOptions(address, Options{TLSCA: filepath.Join(ca.dir, "ca.pem"), Token: "cbt_option", DirectKvs: DirectKvsOff})
	if err != nil {
		t.Fatal(err)
	}
	defer byOption.Close()
	if _, found, err := byOption.Get(ctx, "k"); err != nil || found {
		t.Fatalf("Get = %v, %v", found, err)
	}
	// A refusal keeps the server's code and reason.
	_, _, err = byOption.Get(ctx, "refuse")
	var refused *Error
	if !errors.As(err, &refused) || refused.Code != codes.Unauthenticated || refused.Message != "the bearer token is not valid" {
		t.Fatalf("a refused token gave %v", err)
	}

	t.Setenv(TLSCAEnv, filepath.Join(ca.dir, "ca.pem"))
	t.Setenv(TokenEnv, " cbt_env ")
	byEnvironment, err := DialWithOptions(address, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer byEnvironment.Close()
	if _, _, err := byEnvironment.Get(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	t.Setenv(TokenEnv, "")
	without, err := DialWithOptions(address, Options{DirectKvs: DirectKvsOff})
	if err != nil {
		t.Fatal(err)
	}
	defer without.Close()
	if _, _, err := without.Get(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	// Each client asked the server for its limits first (GetLimits: where the KVS is, whether
	// it serves op streams), with its token too.
	want := []string{"Bearer cbt_option", "Bearer cbt_option", "Bearer cbt_option", "Bearer cbt_env", "Bearer cbt_env", "", ""}
	if got := kvs.calls(); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("the server saw authorization %q; want %q", got, want)
	}
}

func TestTheStreamOfOpsGoesOverTLSWithTheToken(t *testing.T) {
	clearSecurityEnvironment(t)
	ca := newTestCA(t)
	kvs := &recordingKvs{streams: true}
	address := serveTLS(t, ca, kvs)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	client, err := DialWithOptions(address, Options{TLSCA: filepath.Join(ca.dir, "ca.pem"), Token: "cbt_stream", DirectKvs: DirectKvsOff})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	for range 2 {
		if _, found, err := client.Get(ctx, "k"); err != nil || found {
			t.Fatalf("Get = %v, %v", found, err)
		}
	}
	_, _, err = client.Get(ctx, "refuse")
	var refused *Error
	if !errors.As(err, &refused) || refused.Code != codes.Unauthenticated || refused.Message != "the bearer token is not valid" {
		t.Fatalf("a refused op gave %v", err)
	}
	// GetLimits, then one stream for the three gets, with the token.
	want := []string{"Bearer cbt_stream", "Bearer cbt_stream"}
	if got := kvs.calls(); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("the server saw authorization %q; want %q", got, want)
	}
}

func TestATokenIsNeverSentInPlaintext(t *testing.T) {
	clearSecurityEnvironment(t)
	settings := resolveSecurity(Options{}, env(map[string]string{TokenEnv: "cbt_secret"}))
	if !settings.tls() || settings.token != "cbt_secret" {
		t.Fatalf("a token alone gave %+v; want TLS with the token", settings)
	}
	if resolveSecurity(Options{TLSServerName: "scheduler.example"}, env(nil)).tls() {
		t.Fatal("a server name alone asked for TLS")
	}
	if got := resolveSecurity(Options{Token: "cbt_option"}, env(map[string]string{TokenEnv: "cbt_env"})).token; got != "cbt_option" {
		t.Fatalf("the option gave way to the environment: %q", got)
	}
	_, err := DialWithOptions("127.0.0.1:1", Options{Token: "cbt_secret", DialOptions: []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}})
	if err == nil || !strings.Contains(err.Error(), "sent only over TLS") || strings.Contains(err.Error(), "cbt_secret") {
		t.Fatalf("a token with plaintext dial options gave %v", err)
	}
}

func TestAClientCertificateOutOfItsDatesIsRefusedBeforeConnecting(t *testing.T) {
	clearSecurityEnvironment(t)
	ca := newTestCA(t)
	expiredCert, expiredKey := ca.issue("expired", false, time.Now().Add(-48*time.Hour), time.Date(2020, 3, 4, 5, 6, 0, 0, time.UTC))
	_, err := DialWithOptions("127.0.0.1:1", Options{TLSCert: expiredCert, TLSKey: expiredKey})
	var refused *Error
	if !errors.As(err, &refused) || refused.Code != codes.Unauthenticated {
		t.Fatalf("an expired certificate gave %v; want an Unauthenticated *Error", err)
	}
	want := "the client certificate " + expiredCert + " expired on 2020-03-04 05:06 UTC; servers refuse it in the TLS handshake: " + certificateAdvice
	if refused.Message != want {
		t.Fatalf("message %q; want %q", refused.Message, want)
	}
	futureCert, futureKey := ca.issue("future", false, time.Date(2999, 1, 2, 3, 4, 0, 0, time.UTC), time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC))
	t.Setenv(TLSCertEnv, futureCert)
	t.Setenv(TLSKeyEnv, futureKey)
	_, err = DialWithOptions("127.0.0.1:1", Options{})
	if !errors.As(err, &refused) || !strings.Contains(refused.Message, "is not valid before 2999-01-02 03:04 UTC") {
		t.Fatalf("a certificate not valid yet gave %v", err)
	}
	validCert, validKey := ca.issue("valid", false, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	client, err := DialWithOptions("127.0.0.1:1", Options{TLSCert: validCert, TLSKey: validKey})
	if err != nil {
		t.Fatalf("a valid certificate gave %v", err)
	}
	client.Close()
}

func TestUnusableTLSFilesAreRefusedWithTheirNames(t *testing.T) {
	clearSecurityEnvironment(t)
	ca := newTestCA(t)
	certFile, keyFile := ca.issue("client", false, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	_, otherKey := ca.issue("other", false, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	missing := filepath.Join(ca.dir, "missing.pem")
	cases := []struct {
		options Options
		want    string
	}{
		{Options{TLSCert: certFile}, "a client certificate needs its key"},
		{Options{TLSCA: missing}, "cannot read TLS file " + missing + ": no such file or directory"},
		{Options{TLSCA: keyFile}, keyFile + " holds no PEM certificate"},
		{Options{TLSCert: certFile, TLSKey: otherKey}, "the client certificate " + certFile + " and the key " + otherKey + " cannot be used together"},
	}
	for _, c := range cases {
		if _, err := DialWithOptions("127.0.0.1:1", c.options); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v gave %v; want %q", c.options, err, c.want)
		}
	}
}

// serveTLSForClients starts a real gRPC server with TLS on 127.0.0.1 port 0 that requires client
// certificates signed by ca, with TLS versions up to maxVersion (0: the newest); it stops when
// the test ends.
func serveTLSForClients(t *testing.T, ca *testCA, kvs *recordingKvs, maxVersion uint16) string {
	certFile, keyFile := ca.issue("server", true, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	clients := x509.NewCertPool()
	clients.AddCert(ca.cert)
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{pair},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    clients,
		MaxVersion:   maxVersion,
	})))
	cloudburstv1.RegisterKvsServiceServer(server, kvs)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	return listener.Addr().String()
}

// serveClosingTLS accepts TLS 1.3 connections on 127.0.0.1 port 0 and closes each right after
// the handshake without a word, as gRPC's C core does when it refuses a client certificate; it
// stops when the test ends.
func serveClosingTLS(t *testing.T, ca *testCA) string {
	certFile, keyFile := ca.issue("server", true, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	listener, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{pair},
		ClientAuth:   tls.RequireAnyClientCert,
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			_ = conn.(*tls.Conn).Handshake()
			_ = conn.Close()
		}
	}()
	t.Cleanup(func() {
		_ = listener.Close()
		<-done
	})
	return listener.Addr().String()
}

// getWith dials address with options and returns the error of a Get.
func getWith(t *testing.T, address string, options Options) error {
	t.Helper()
	options.DirectKvs = DirectKvsOff
	client, err := DialWithOptions(address, options)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, _, err = client.Get(ctx, "k")
	return err
}

func TestAClientCertificateTheServerRefusesIsUnauthenticatedSayingWhy(t *testing.T) {
	clearSecurityEnvironment(t)
	ca := newTestCA(t)
	caFile := filepath.Join(ca.dir, "ca.pem")
	other := newTestCA(t)
	otherCert, otherKey := other.issue("client-other", false, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	goodCert, goodKey := ca.issue("client", false, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	serverCert, serverKey := ca.issue("not-a-client", true, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	kvs := &recordingKvs{}
	cases := []struct {
		name, address, cert, key, want string
	}{
		// TLS 1.3: the server refuses after the handshake, with an alert on the first read.
		{"another CA", serveTLSForClients(t, ca, kvs, 0), otherCert, otherKey,
			"the client certificate " + otherCert + " is not signed by the CA in " + caFile + " (it names issuer CN=test CA), so a server of that CA refuses it; " + certificateAdvice},
		// TLS 1.2: the server refuses in the handshake itself.
		{"another CA over TLS 1.2", serveTLSForClients(t, ca, kvs, tls.VersionTLS12), otherCert, otherKey,
			"is not signed by the CA in " + caFile},
		// gRPC's C core closes the connection after the handshake without an alert.
		{"a closed connection", serveClosingTLS(t, ca), otherCert, otherKey,
			"is not signed by the CA in " + caFile},
		{"a certificate not for clients", serveTLSForClients(t, ca, kvs, 0), serverCert, serverKey,
			"the client certificate " + serverCert + " is not for client authentication"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for attempt := 1; attempt <= 2; attempt++ { // the first call dials; the second finds the refusal
				err := getWith(t, c.address, Options{TLSCA: caFile, TLSCert: c.cert, TLSKey: c.key})
				var refused *Error
				if !errors.As(err, &refused) || refused.Code != codes.Unauthenticated {
					t.Fatalf("call %d gave %v; want an Unauthenticated *Error", attempt, err)
				}
				prefix := "the server at " + c.address + " refused this client's certificate " + c.cert + " in the TLS handshake: "
				if !strings.HasPrefix(refused.Message, prefix) || !strings.Contains(refused.Message, c.want) {
					t.Fatalf("message %q; want %q ... %q", refused.Message, prefix, c.want)
				}
			}
		})
	}
	if calls := kvs.calls(); len(calls) != 0 {
		t.Fatalf("refused clients reached the server: %q", calls)
	}

	// A certificate of the server's CA still works, on both TLS versions.
	for _, maxVersion := range []uint16{0, tls.VersionTLS12} {
		if err := getWith(t, serveTLSForClients(t, ca, kvs, maxVersion), Options{TLSCA: caFile, TLSCert: goodCert, TLSKey: goodKey}); err != nil {
			t.Fatalf("a certificate of the server's CA gave %v", err)
		}
	}
}

func TestWithoutARefusalTheErrorsStayAsTheyWere(t *testing.T) {
	clearSecurityEnvironment(t)
	ca := newTestCA(t)
	caFile := filepath.Join(ca.dir, "ca.pem")
	certFile, keyFile := ca.issue("client", false, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	// Nothing listens at a port of a closed listener.
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	unreachable := listener.Addr().String()
	_ = listener.Close()
	var failed *Error
	err = getWith(t, unreachable, Options{TLSCA: caFile, TLSCert: certFile, TLSKey: keyFile})
	if !errors.As(err, &failed) || failed.Code != codes.Unavailable || strings.Contains(failed.Message, "refused this client's certificate") {
		t.Fatalf("an unreachable server gave %v; want Unavailable", err)
	}
	// Without a client certificate, a server that demands one fails the call as grpc-go does
	// ("certificate required", or a broken pipe when the client writes first).
	err = getWith(t, serveTLSForClients(t, ca, &recordingKvs{}, 0), Options{TLSCA: caFile})
	if !errors.As(err, &failed) || failed.Code != codes.Unavailable || strings.Contains(failed.Message, "refused this client's certificate") {
		t.Fatalf("a server demanding a certificate the client has not gave %v; want grpc-go's Unavailable", err)
	}
}

func TestACertificateExpiredSinceDialingIsNamedSo(t *testing.T) {
	ca := newTestCA(t)
	certFile, keyFile := ca.issue("client", false, time.Now().Add(-time.Hour), time.Date(2030, 5, 6, 7, 8, 0, 0, time.UTC))
	settings := security{ca: filepath.Join(ca.dir, "ca.pem"), cert: certFile, key: keyFile}
	want := "the client certificate " + certFile + " expired on 2030-05-06 07:08 UTC"
	if got := settings.certificateProblem(time.Date(2031, 1, 1, 0, 0, 0, 0, time.UTC)); got != want {
		t.Fatalf("problem %q; want %q", got, want)
	}
	if got := settings.certificateProblem(time.Now()); got != "it is not signed by a CA the server trusts for clients" {
		t.Fatalf("a valid certificate of the CA gave %q", got)
	}
}
