// Typed errors: runtime errors carry the google.rpc.ErrorInfo reason; user code's exceptions
// are FunctionErrors.
import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorReason, type CallError } from "./gen/cloudburst/v1/error_pb.js";
import type { Failure } from "./gen/cloudburst/v1/value_pb.js";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** The google.rpc.ErrorInfo domain of cloudburst-grpc's errors. */
export const DOMAIN = "cloudburst.v1";

/** The reasons an error may carry (ErrorReason without its prefix), e.g. "DAG_NOT_FOUND". */
export type Reason = keyof typeof ErrorReason | "";

/** An error of the runtime (not of user code): a gRPC code and the ErrorInfo reason. */
export class CloudburstError extends Error {
  override readonly name = "CloudburstError";

  constructor(
    /** The gRPC status code. */
    readonly code: Code,
    /** The machine-readable reason, such as "DAG_NOT_FOUND"; "" when the server sent none. */
    readonly reason: Reason,
    message: string,
    /** The offending identifiers, such as the DAG or key. */
    readonly metadata: Readonly<Record<string, string>> = {},
  ) {
    super(reason ? `${reason}: ${message}` : message);
  }
}

/** An exception raised by a Python function: the call's result, not an RPC error. */
export class FunctionError extends Error {
  override readonly name = "FunctionError";

  constructor(
    /** The exception's qualified type name, such as "ValueError". */
    readonly type: string,
    /** str(exception). */
    readonly detail: string,
    /** The Python traceback where it was raised. */
    readonly traceback: string,
    /** The registered name of the function that raised. */
    readonly functionName: string,
  ) {
    super(`function ${JSON.stringify(functionName)} raised ${type}: ${detail}`);
  }
}

function reasonName(reason: ErrorReason): Reason {
  const name = ErrorReason[reason] as keyof typeof ErrorReason | undefined;
  return name === undefined || name === "UNSPECIFIED" ? "" : name;
}

function knownReason(reason: string): Reason {
  return reason in ErrorReason && reason !== "UNSPECIFIED" ? (reason as Reason) : "";
}

/** Convert whatever a stub threw into a CloudburstError (with the ErrorInfo reason) when it can. */
export function fromRpcError(err: unknown): unknown {
  if (!(err instanceof ConnectError)) {
    return err;
  }
  const info = err.findDetails(ErrorInfoSchema).find((i) => i.domain === DOMAIN);
  return new CloudburstError(
    err.code,
    info ? knownReason(info.reason) : "",
    err.rawMessage,
    info ? { ...info.metadata } : {},
  );
}

/** The error a CallError (an error answered inside an outcome or a stream frame) stands for. */
export function fromCallError(error: CallError): CloudburstError {
  return new CloudburstError(
    error.code as Code,
    reasonName(error.reason),
    error.message,
    { ...error.metadata },
  );
}

/** The error a Failure stands for: a FunctionError, or a runtime error stored as a failure. */
export function fromFailure(failure: Failure): Error {
  const prefix = "cloudburst.errors.";
  if (failure.type.startsWith(prefix) && failure.traceback === "") {
    return new CloudburstError(
      Code.Unknown,
      knownReason(failure.type.slice(prefix.length)),
      failure.message,
    );
  }
  return new FunctionError(failure.type, failure.message, failure.traceback, failure.functionName);
}
