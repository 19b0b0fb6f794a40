// What every connection of the client agrees on with the servers: keepalive pings and bounded
// connection attempts, the same values the Python SDK and cbgrpc use.
import * as net from "node:net";
import * as tlsSockets from "node:tls";
import type { Duplex } from "node:stream";
import { Code, ConnectError, type Interceptor, type Transport } from "@connectrpc/connect";
import * as http2 from "node:http2";
import { createGrpcTransport, Http2SessionManager, type Http2SessionOptions } from "@connectrpc/connect-node";
import { CloudburstError } from "./errors.js";
import { certificateRefusal, refusedCertificate, type Tls } from "./tls.js";

/** Milliseconds between keepalive pings on every connection, idle or not (servers permit them). */
export const KEEPALIVE_MS = 1_000;

/**
 * Milliseconds a ping may go unanswered before the peer is taken for lost and every call on the
 * connection rejects with UNAVAILABLE: a hung scheduler (SIGSTOP, a stalled VM) keeps its
 * connections open, and this is how a caller waiting on it learns that it will not answer.
 */
export const KEEPALIVE_TIMEOUT_MS = 2_000;

/**
 * The environment variable that replaces KEEPALIVE_TIMEOUT_MS (in seconds), as it does for the
 * Python SDK and cbgrpc: a longer timeout keeps large transfers on slow links up, at the cost of
 * noticing hung peers later.
 */
export const PING_TIMEOUT_ENV = "CLOUDBURST_PING_TIMEOUT_SECONDS";

/**
 * The version of cloudburst-grpc's wire protocol this client speaks: the PROTOCOL_VERSION of
 * sdk/python/cloudburst/protocol.py, of the same release (a test checks that they agree). Every
 * call names it in its user agent; a server of a release that speaks another version refuses the
 * call with FAILED_PRECONDITION, reason PROTOCOL_MISMATCH, instead of misreading it
 * (docs/protocol.md#versions).
 */
export const PROTOCOL_VERSION = 2;

/** The user agent product token that carries PROTOCOL_VERSION. */
export const PROTOCOL_TOKEN = `cloudburst-protocol/${PROTOCOL_VERSION}`;

/** Milliseconds a new plaintext connection may take to be established. */
export const CONNECT_TIMEOUT_MS = 3_000;

/** The environment a process sees (process.env's type). */
export type Environment = Readonly<Record<string, string | undefined>>;

/**
 * Milliseconds a ping may go unanswered: PING_TIMEOUT_ENV if set, else KEEPALIVE_TIMEOUT_MS.
 * Throws a CloudburstError (INVALID_ARGUMENT) that names the variable when it is not a positive
 * number of seconds below a day.
 */
export function pingTimeoutMs(env: Environment = process.env): number {
  const raw = (env[PING_TIMEOUT_ENV] ?? "").trim();
  if (raw === "") {
    return KEEPALIVE_TIMEOUT_MS;
  }
  const seconds = /^[+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(raw) ? Number(raw) : Number.NaN;
  if (!(seconds > 0 && seconds < 86_400)) {
    throw new CloudburstError(
      Code.InvalidArgument,
      "INVALID_ARGUMENT",
      `${PING_TIMEOUT_ENV} must be a positive number of seconds (below a day), not ${JSON.stringify(raw)}`,
    );
  }
  return Math.max(Math.floor(seconds * 1000), 1);
}

/**
 * The options of a gRPC transport (HTTP/2) to a peer at a URL of this scheme, with tls for https
 * (whose token, if any, goes with every call).
 */
export function transportOptions(
  scheme: "http" | "https",
  env: Environment = process.env,
  tls?: Tls,
): Http2SessionOptions & {
  nodeOptions: { createConnection: (authority: URL) => Duplex };
  interceptors: Interceptor[];
} {
  const keepalive: Http2SessionOptions = {
    pingIntervalMs: KEEPALIVE_MS,
    pingTimeoutMs: pingTimeoutMs(env),
    pingIdleConnection: true,
  };
  if (scheme === "http") {
    return {
      ...keepalive,
      interceptors: [protocolVersion(), transportErrors()],
      nodeOptions: { createConnection: connectWithin },
    };
  }
  const refusals = new Refusals();
  const interceptors = [protocolVersion(), transportErrors(tls, refusals)];
  if (tls?.token !== undefined) {
    interceptors.unshift(bearerToken(tls.token));
  }
  return {
    ...keepalive,
    interceptors,
    nodeOptions: { createConnection: (authority) => connectTlsWithin(authority, tls, refusals) },
  };
}

/**
 * An interceptor that names PROTOCOL_VERSION in the user agent of every call, before the agent
 * connect-node sets (a header, set when the call starts; nothing per message).
 */
export function protocolVersion(): Interceptor {
  return (next) => (request) => {
    const agent = request.header.get("user-agent");
    request.header.set("user-agent", agent ? `${PROTOCOL_TOKEN} ${agent}` : PROTOCOL_TOKEN);
    return next(request);
  };
}

/**
 * An interceptor that sends token with every call as `authorization: Bearer <token>`, the header
 * the Python SDK sends and the servers read. The client adds it only to TLS transports.
 */
export function bearerToken(token: string): Interceptor {
  return (next) => (request) => {
    request.header.set("authorization", `Bearer ${token}`);
    return next(request);
  };
}

/**
 * The last TLS alert with which a server refused this client's certificate, on any connection
 * of a transport: the alert ends the connection, while its calls only see their streams
 * cancelled.
 */
export class Refusals {
  /** The alert, and when it came (performance.now()). */
  last: { error: Error; at: number } | undefined;

  /** The refusal that came since `since` (performance.now()), if any. */
  since(since: number): Error | undefined {
    return this.last !== undefined && this.last.at >= since ? this.last.error : undefined;
  }
}

/** A TLS connection (HTTP/2 by ALPN) that fails as ETIMEDOUT if not made in time. */
function connectTlsWithin(authority: URL, tls: Tls | undefined, refusals: Refusals): Duplex {
  const host = authority.hostname.replace(/^\[(.*)\]$/, "$1");
  const options: tlsSockets.ConnectionOptions = {
    host,
    port: Number(authority.port || 443),
    ALPNProtocols: ["h2"],
  };
  if (tls?.ca !== undefined) options.ca = tls.ca;
  if (tls?.cert !== undefined) options.cert = tls.cert;
  if (tls?.key !== undefined) options.key = tls.key;
  const servername = tls?.servername ?? (net.isIP(host) === 0 ? host : undefined);
  if (servername !== undefined) options.servername = servername;
  const socket = tlsSockets.connect(options);
  if (tls?.cert !== undefined) {
    // A TLS 1.3 server that refuses the client's certificate closes the connection right after
    // the handshake, without an alert Node reports: a gRPC server that accepts it sends its
    // HTTP/2 settings first, so a close before any byte came means a refusal.
    let handshaken = false;
    socket.once("secureConnect", () => {
      handshaken = true;
    });
    const closed = (): void => {
      if (handshaken && socket.bytesRead === 0) {
        const error = new Error("the server closed the connection right after the TLS handshake");
        refusals.last = { error, at: performance.now() };
      }
    };
    // At the server's end of the stream already, before the calls on the connection fail.
    socket.once("end", closed);
    socket.once("close", closed);
  }
  socket.on("error", (error) => {
    if (refusedCertificate(error)) {
      refusals.last = { error, at: performance.now() };
    }
  });
  socket.setTimeout(CONNECT_TIMEOUT_MS, () => {
    const error = new Error(`no TLS connection to ${authority.host} within ${CONNECT_TIMEOUT_MS} ms`);
    socket.destroy(Object.assign(error, { code: "ETIMEDOUT" }));
  });
  socket.once("secureConnect", () => socket.setTimeout(0));
  return socket;
}

/**
 * An interceptor that gives transport failures the codes the client's callers act on: a
 * connection lost mid-call (the peer died: reset, which connect-node reports as ABORTED, or
 * closed, which it reports as CANCELED) becomes UNAVAILABLE, so that a call falls back as for a
 * refused connection; a server certificate the client does not trust becomes UNAVAILABLE too,
 * saying so (connect-node: INTERNAL); a TLS handshake in which the server refused the client's certificate becomes
 * UNAUTHENTICATED, saying why. A server's own ABORTED or CANCELLED status, a call its caller
 * cancelled, and every other error, are kept.
 */
export function transportErrors(tls?: Tls, refusals?: Refusals): Interceptor {
  return (next) => async (request) => {
    const where = new URL(request.url).host;
    const started = performance.now();
    const convert = (err: unknown): unknown =>
      certificateRefusal(
        untrustedServer(resetAsUnavailable(err, request.signal.aborted), where),
        tls,
        where,
        refusals?.since(started),
      );
    let response;
    try {
      response = await next(request);
    } catch (err) {
      throw convert(err);
    }
    if (!response.stream) {
      return response;
    }
    const messages = response.message;
    return {
      ...response,
      message: (async function* () {
        try {
          yield* messages;
        } catch (err) {
          throw convert(err);
        }
      })(),
    };
  };
}

/** Node's codes of a server certificate that this client does not trust (for the name dialled). */
const UNTRUSTED = new Set([
  "ERR_TLS_CERT_ALTNAME_INVALID",
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  "UNABLE_TO_GET_ISSUER_CERT",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
  "SELF_SIGNED_CERT_IN_CHAIN",
  "DEPTH_ZERO_SELF_SIGNED_CERT",
  "CERT_HAS_EXPIRED",
  "CERT_NOT_YET_VALID",
  "CERT_SIGNATURE_FAILURE",
]);

/**
 * err as UNAVAILABLE, saying so, when the client did not trust the server's certificate (which
 * connect-node reports as INTERNAL): the server cannot be used, as gRPC's other clients say.
 */
export function untrustedServer(err: unknown, where: string): unknown {
  if (!(err instanceof ConnectError) || err.code !== Code.Internal) {
    return err;
  }
  for (let e: unknown = err.cause, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && UNTRUSTED.has(code)) {
      return new ConnectError(
        `the certificate of the server at ${where} is not trusted (${code}): ${err.rawMessage}; ` +
          "check tlsCa (CLOUDBURST_TLS_CA) and tlsServerName (CLOUDBURST_TLS_SERVER_NAME)",
        Code.Unavailable,
        err.metadata,
        undefined,
        err.cause,
      );
    }
  }
  return err;
}

/** Node's codes of a connection that its peer reset. */
const RESETS = new Set(["ECONNRESET", "EPIPE"]);

/** What connect-node reports for a stream that ended with its connection: an HTTP/2 CANCEL. */
const STREAM_CANCELLED = "http/2 stream closed with error code CANCEL";

/**
 * err as UNAVAILABLE when the call's connection was lost under it: connect-node's ABORTED for a
 * connection the peer reset (ECONNRESET, EPIPE), or its CANCELED for a stream that ended with
 * its connection while the caller had not cancelled it (callerCancelled: the call's signal
 * aborted). Anything a server answered (an ABORTED or CANCELLED status of its own) stays as it is.
 */
export function resetAsUnavailable(err: unknown, callerCancelled = false): unknown {
  if (!(err instanceof ConnectError)) {
    return err;
  }
  let lost = err.code === Code.Canceled && !callerCancelled && err.rawMessage.startsWith(STREAM_CANCELLED);
  for (let e: unknown = err.cause, depth = 0; !lost && e instanceof Error && depth < 8; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    lost = err.code === Code.Aborted && typeof code === "string" && RESETS.has(code);
  }
  if (!lost) {
    return err;
  }
  return new ConnectError(
    `the connection to the server was lost mid-call (reset or closed: the server went away): ${err.rawMessage}`,
    Code.Unavailable,
    err.metadata,
    undefined,
    err.cause ?? err,
  );
}

/** A TCP connection to authority that fails (as ETIMEDOUT: UNAVAILABLE) if not made in time. */
function connectWithin(authority: URL): Duplex {
  const host = authority.hostname.replace(/^\[(.*)\]$/, "$1");
  const socket = net.connect({ host, port: Number(authority.port || 80) });
  socket.setTimeout(CONNECT_TIMEOUT_MS, () => {
    const error = new Error(`no connection to ${authority.host} within ${CONNECT_TIMEOUT_MS} ms`);
    socket.destroy(Object.assign(error, { code: "ETIMEDOUT" }));
  });
  socket.once("connect", () => socket.setTimeout(0));
  return socket;
}

/**
 * A gRPC transport (HTTP/2) to baseUrl with options of transportOptions(): every transport of the
 * client is made here. Its connections are connect-node's, each kept listening for its 'error'
 * event for as long as it lives: a connection given up (an unanswered ping, a reset) fails its
 * calls with that error (UNAVAILABLE), and must not also throw it out of the process. connect-node
 * stops listening once it replaces a connection, which it may do before the connection reports
 * its end: the next call after a ping timeout (say, an op after its GetLimits failed) would then
 * leave the error unhandled, and Node would exit.
 */
export function grpcTransport(baseUrl: string, options: ReturnType<typeof transportOptions>): Transport {
  const manager = new Http2SessionManager(
    baseUrl,
    {
      pingIntervalMs: options.pingIntervalMs,
      pingTimeoutMs: options.pingTimeoutMs,
      pingIdleConnection: options.pingIdleConnection,
    },
    options.nodeOptions,
  );
  // Every connection carries a call (request) before it can be given up: that is where it is seen.
  const sessionManager = {
    authority: manager.authority,
    async request(...args: Parameters<Http2SessionManager["request"]>): Promise<http2.ClientHttp2Stream> {
      const stream = await manager.request(...args);
      const session = stream.session;
      if (session !== undefined && !session.listeners("error").includes(endedConnection)) {
        session.on("error", endedConnection);
      }
      return stream;
    },
    notifyResponseByteRead: (stream: http2.ClientHttp2Stream) => manager.notifyResponseByteRead(stream),
  };
  return createGrpcTransport({ ...options, baseUrl, sessionManager });
}

/** The error of a connection given up: its calls fail with it; nothing else is to be done. */
function endedConnection(): void {}
