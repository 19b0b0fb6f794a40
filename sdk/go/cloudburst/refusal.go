package cloudburst

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
)

// A server that refuses the client's certificate ends the TLS handshake, and grpc-go fails the
// call with codes.Unavailable and a message such as "error reading server preface: EOF". The
// client records such refusals as its connections see them and turns the calls they fail into
// codes.Unauthenticated, saying why, as the Python SDK and the TypeScript client do.

// refusedAlerts are the texts of the TLS alerts with which a server refuses a client certificate
// (Go's tls package reports them as "remote error: tls: <text>"). A TLS 1.2 server sends one
// during the handshake; a TLS 1.3 server, after it, on the first read.
var refusedAlerts = []string{
	"tls: bad certificate",
	"tls: unsupported certificate",
	"tls: certificate revoked",
	"tls: expired certificate",
	"tls: unknown certificate",
	"tls: unknown certificate authority",
	"tls: access denied",
	"tls: certificate required",
}

// refusalAlert says whether err is a TLS alert of the server that refuses the client certificate.
func refusalAlert(err error) bool {
	var opErr *net.OpError
	if !errors.As(err, &opErr) || opErr.Op != "remote error" || opErr.Err == nil {
		return false
	}
	text := opErr.Err.Error()
	for _, alert := range refusedAlerts {
		if text == alert {
			return true
		}
	}
	return false
}

// refusal is how a server refused the client certificate: where, and the words that grpc-go's
// messages about the failed connections contain (a refused connection may fail on a read and on
// a write at once, and grpc-go reports either).
type refusal struct {
	authority string
	markers   []string
}

// maxMarkers bounds the words kept of a server's refusals.
const maxMarkers = 8

// refusals holds, for each server address, the latest refusals of the client certificate; a
// server that answers after a handshake is taken off.
type refusals struct {
	mu     sync.Mutex
	latest map[string]refusal
}

func newRefusals() *refusals {
	return &refusals{latest: map[string]refusal{}}
}

func (r *refusals) record(authority, marker string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	markers := append(r.latest[authority].markers, marker)
	if len(markers) > maxMarkers {
		markers = markers[len(markers)-maxMarkers:]
	}
	r.latest[authority] = refusal{authority: authority, markers: markers}
}

func (r *refusals) clear(authority string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.latest, authority)
}

// matching is the refusal whose words message (grpc-go's, of a failed call) contains.
func (r *refusals) matching(message string) (refusal, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, found := range r.latest {
		for _, marker := range found.markers {
			if strings.Contains(message, marker) {
				return found, true
			}
		}
	}
	return refusal{}, false
}

// refusalWatch is TLS transport credentials that record the handshakes in which the server
// refuses the client certificate.
type refusalWatch struct {
	credentials.TransportCredentials
	refusals *refusals
}

// ClientHandshake implements credentials.TransportCredentials.
func (w *refusalWatch) ClientHandshake(ctx context.Context, authority string, rawConn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := w.TransportCredentials.ClientHandshake(ctx, authority, rawConn)
	if err != nil {
		if refusalAlert(err) {
			w.refusals.record(authority, "handshake failed: "+err.Error())
		}
		return conn, info, err
	}
	tls13 := false
	if tlsInfo, ok := info.(credentials.TLSInfo); ok {
		tls13 = tlsInfo.State.Version == tls.VersionTLS13
	}
	return &watchedConn{Conn: conn, authority: authority, tls13: tls13, refusals: w.refusals}, info, nil
}

// Clone implements credentials.TransportCredentials.
func (w *refusalWatch) Clone() credentials.TransportCredentials {
	return &refusalWatch{TransportCredentials: w.TransportCredentials.Clone(), refusals: w.refusals}
}

// watchedConn is a connection after a TLS handshake in which the client showed its certificate.
// A TLS 1.3 server checks that certificate after the handshake: it refuses it with an alert, or
// (gRPC's C core) by closing the connection before sending anything, which the client sees as
// the end of the connection on its first read or as a broken pipe on a write. Either, before the
// server sent anything, is recorded as a refusal; a first read that brings data clears the
// server of refusals.
type watchedConn struct {
	net.Conn
	authority string
	tls13     bool
	refusals  *refusals
	once      sync.Once
	spoke     atomic.Bool
}

func (c *watchedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.once.Do(func() {
		switch {
		case n > 0:
			c.spoke.Store(true)
			c.refusals.clear(c.authority)
		case refusalAlert(err) || c.closedByServer(err):
			c.refusals.record(c.authority, "error reading server preface: "+err.Error())
		}
	})
	return n, err
}

func (c *watchedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if err != nil && !c.spoke.Load() && (refusalAlert(err) || c.closedByServer(err)) {
		c.refusals.record(c.authority, err.Error())
	}
	return n, err
}

// closedByServer says whether err is the server's end of a TLS 1.3 connection.
func (c *watchedConn) closedByServer(err error) bool {
	return c.tls13 && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE))
}

// certificateRefused is err (of a call, converted by errorFromRPC) as codes.Unauthenticated
// when it is codes.Unavailable because a server refused the client certificate in the TLS
// handshake: it names the server and the certificate and says why, as far as the client can
// tell, in the Python SDK's words. Other errors come back as they are.
func (s security) certificateRefused(err error, refusals *refusals, now time.Time) error {
	var converted *Error
	if s.cert == "" || refusals == nil || !errors.As(err, &converted) || converted.Code != codes.Unavailable {
		return err
	}
	found, ok := refusals.matching(converted.Message)
	if !ok {
		return err
	}
	return &Error{
		Code: codes.Unauthenticated,
		Message: fmt.Sprintf("the server at %s refused this client's certificate %s in the TLS handshake: %s; %s (gRPC's last error: %s)",
			found.authority, s.cert, s.certificateProblem(now), certificateAdvice, converted.Message),
	}
}

// certificateProblem says why a server may refuse the client certificate, as far as the client
// can tell: it is not signed by the CA in the CA file, it is out of its validity dates, or it is
// not for client authentication; else that its CA is not one the server trusts for clients.
func (s security) certificateProblem(now time.Time) string {
	const unknown = "it is not signed by a CA the server trusts for clients"
	cert, err := readCertificate(s.cert)
	if err != nil {
		return unknown
	}
	if s.ca != "" {
		if cas, err := readCertificates(s.ca); err == nil && len(cas) > 0 {
			signed := false
			for _, ca := range cas {
				if cert.CheckSignatureFrom(ca) == nil {
					signed = true
					break
				}
			}
			if !signed {
				return fmt.Sprintf("the client certificate %s is not signed by the CA in %s (it names issuer %s), so a server of that CA refuses it",
					s.cert, s.ca, cert.Issuer.String())
			}
		}
	}
	if problem := validityProblem(cert, s.cert, now); problem != "" {
		return problem
	}
	if !clientUsage(cert) {
		return fmt.Sprintf("the client certificate %s is not for client authentication (its extended key usage lacks clientAuth)", s.cert)
	}
	return unknown
}

// clientUsage says whether cert may authenticate a client: it names no extended key usage, or
// names client authentication (or any usage) among them.
func clientUsage(cert *x509.Certificate) bool {
	if len(cert.ExtKeyUsage) == 0 && len(cert.UnknownExtKeyUsage) == 0 {
		return true
	}
	for _, usage := range cert.ExtKeyUsage {
		if usage == x509.ExtKeyUsageClientAuth || usage == x509.ExtKeyUsageAny {
			return true
		}
	}
	return false
}

func readCertificate(path string) (*x509.Certificate, error) {
	certs, err := readCertificates(path)
	if err != nil {
		return nil, err
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s holds no certificate", path)
	}
	return certs[0], nil
}

// readCertificates are the certificates of the PEM file path.
func readCertificates(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return certs, nil
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, cert)
	}
}
