// The TypeScript client of cloudburst-grpc. Functions and DAGs are registered in Python; from
// TypeScript you call them with native values, use the KVS, and wait for stored results.
export { connect, CloudburstClient, type DagArguments, type Options } from "./client.js";
export { CloudburstError, FunctionError, DOMAIN, type Reason } from "./errors.js";
export { ACCEPTED, decode, encode, toValue, type Json, type NativeValue } from "./values.js";
export * as v1 from "./v1.js";
