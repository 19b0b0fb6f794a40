// What every connection of the client agrees on with the servers: keepalive pings and bounded
// connection attempts, the same values the Python SDK and cbgrpc use.
import * as net from "node:net";
import type { Duplex } from "node:stream";
import { Code } from "@connectrpc/connect";
import type { Http2SessionOptions } from "@connectrpc/connect-node";
import { CloudburstError } from "./errors.js";

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

/** The options of a gRPC transport (HTTP/2) to a peer at a URL of this scheme. */
export function transportOptions(
  scheme: "http" | "https",
  env: Environment = process.env,
): Http2SessionOptions & { nodeOptions?: { createConnection: (authority: URL) => Duplex } } {
  const keepalive: Http2SessionOptions = {
    pingIntervalMs: KEEPALIVE_MS,
    pingTimeoutMs: pingTimeoutMs(env),
    pingIdleConnection: true,
  };
  // Node's own TLS connection is kept for https; its connection attempts are bounded by the
  // operating system only.
  return scheme === "http" ? { ...keepalive, nodeOptions: { createConnection: connectWithin } } : keepalive;
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
