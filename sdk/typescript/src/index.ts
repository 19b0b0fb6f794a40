// The TypeScript client of cloudburst-grpc. Functions and DAGs are registered in Python; from
// TypeScript you call them with native values, use the KVS, and wait for stored results.
export {
  connect,
  CloudburstClient,
  type ClientOptions,
  type ConnectOptions,
  type DagArguments,
  type Options,
} from "./client.js";
export { DIRECT_KVS_ENV } from "./direct.js";
export { KVS_STREAM_ENV, MAX_STREAMED_PUT_BYTES } from "./opstream.js";
export {
  bearerToken,
  grpcTransport,
  KEEPALIVE_MS,
  KEEPALIVE_TIMEOUT_MS,
  PING_TIMEOUT_ENV,
  pingTimeoutMs,
  PROTOCOL_TOKEN,
  PROTOCOL_VERSION,
  protocolVersion,
  resetAsUnavailable,
  transportErrors,
  transportOptions,
} from "./transport.js";
export { TLS_ENV, TOKEN_ENV, tlsSettings, type Tls, type TlsSettings } from "./tls.js";
export { CloudburstError, FunctionError, DOMAIN, type Reason } from "./errors.js";
export { ACCEPTED, decode, encode, toValue, type Json, type NativeValue } from "./values.js";
export * as v1 from "./v1.js";
