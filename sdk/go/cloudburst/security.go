package cloudburst

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
)

// The environment variables that fill the security settings Options leaves empty, as they do for
// the Python SDK and the TypeScript client: a program written for an open server runs unchanged
// against a secured one.
const (
	// TokenEnv gives the bearer token.
	TokenEnv = "CLOUDBURST_TOKEN"
	// TLSCAEnv gives the PEM CA bundle the servers' certificates must chain to.
	TLSCAEnv = "CLOUDBURST_TLS_CA"
	// TLSCertEnv gives the PEM client certificate.
	TLSCertEnv = "CLOUDBURST_TLS_CERT"
	// TLSKeyEnv gives the PEM key of the client certificate.
	TLSKeyEnv = "CLOUDBURST_TLS_KEY"
	// TLSServerNameEnv gives the name the servers' certificates must carry.
	TLSServerNameEnv = "CLOUDBURST_TLS_SERVER_NAME"
)

// certificateAdvice says what to do about a client certificate the servers refuse, in the words
// of the Python SDK.
const certificateAdvice = "use a client certificate issued by the cluster's CA and still valid " +
	"(`cbgrpc certs DIR --client ROLE` issues one), or a token"

// security is what secures a connection: the settings of Options, else of the environment.
type security struct {
	ca, cert, key, serverName, token string
}

func resolveSecurity(options Options, getenv func(string) string) security {
	pick := func(given, variable string) string {
		if value := strings.TrimSpace(given); value != "" {
			return value
		}
		return strings.TrimSpace(getenv(variable))
	}
	return security{
		ca:         pick(options.TLSCA, TLSCAEnv),
		cert:       pick(options.TLSCert, TLSCertEnv),
		key:        pick(options.TLSKey, TLSKeyEnv),
		serverName: pick(options.TLSServerName, TLSServerNameEnv),
		token:      pick(options.Token, TokenEnv),
	}
}

// tls says whether the connection uses TLS: any setting but the server name asks for it (a token
// too, as with the Python SDK: it is sent only over TLS).
func (s security) tls() bool {
	return s.ca != "" || s.cert != "" || s.key != "" || s.token != ""
}

// dialOptions are the transport credentials (TLS) and, with a token, the per-call credentials
// that send it; none for plaintext. A client certificate out of its validity dates at now is an
// *Error with codes.Unauthenticated, as the servers would refuse it in the handshake.
// A handshake in which a server refuses the client certificate is recorded in refusals.
func (s security) dialOptions(now time.Time, refusals *refusals) ([]grpc.DialOption, error) {
	if !s.tls() {
		return nil, nil
	}
	if (s.cert == "") != (s.key == "") {
		return nil, errors.New("cloudburst: a client certificate needs its key: give both " +
			"(TLSCert and TLSKey, or " + TLSCertEnv + " and " + TLSKeyEnv + ") or neither")
	}
	config := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: s.serverName}
	if s.ca != "" {
		pem, err := readTLSFile(s.ca)
		if err != nil {
			return nil, err
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("cloudburst: %s holds no PEM certificate to trust", s.ca)
		}
		config.RootCAs = roots
	}
	if s.cert != "" {
		certPEM, err := readTLSFile(s.cert)
		if err != nil {
			return nil, err
		}
		keyPEM, err := readTLSFile(s.key)
		if err != nil {
			return nil, err
		}
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, fmt.Errorf("cloudburst: the client certificate %s and the key %s cannot be used together: %w", s.cert, s.key, err)
		}
		leaf, err := x509.ParseCertificate(pair.Certificate[0])
		if err != nil {
			return nil, fmt.Errorf("cloudburst: %s is not a readable certificate: %w", s.cert, err)
		}
		if problem := validityProblem(leaf, s.cert, now); problem != "" {
			return nil, &Error{
				Code:    codes.Unauthenticated,
				Message: problem + "; servers refuse it in the TLS handshake: " + certificateAdvice,
			}
		}
		config.Certificates = []tls.Certificate{pair}
	}
	var transport credentials.TransportCredentials = credentials.NewTLS(config)
	if s.cert != "" {
		transport = &refusalWatch{TransportCredentials: transport, refusals: refusals}
	}
	options := []grpc.DialOption{grpc.WithTransportCredentials(transport)}
	if s.token != "" {
		options = append(options, grpc.WithPerRPCCredentials(bearerToken(s.token)))
	}
	return options, nil
}

func readTLSFile(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		var pathErr *fs.PathError
		if errors.As(err, &pathErr) {
			err = pathErr.Err
		}
		return nil, fmt.Errorf("cloudburst: cannot read TLS file %s: %w", path, err)
	}
	return data, nil
}

// validityProblem says why cert (read from file) is not valid at now, expired or not valid yet,
// as the Python SDK says it; "" when it is valid.
func validityProblem(cert *x509.Certificate, file string, now time.Time) string {
	const minute = "2006-01-02 15:04"
	if cert.NotAfter.Before(now) {
		return fmt.Sprintf("the client certificate %s expired on %s UTC", file, cert.NotAfter.UTC().Format(minute))
	}
	if cert.NotBefore.After(now) {
		return fmt.Sprintf("the client certificate %s is not valid before %s UTC", file, cert.NotBefore.UTC().Format(minute))
	}
	return ""
}

// bearerToken sends a token with every call as "authorization: Bearer <token>", the metadata the
// Python SDK sends and the servers read; only over TLS.
type bearerToken string

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (t bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials: a token never goes in
// plaintext.
func (bearerToken) RequireTransportSecurity() bool {
	return true
}
