// Small KVS ops over one long-lived `KvsService.StreamOps` stream per connection (as the Python
// SDK sends them, docs/protocol.md "Small ops on one stream"): a message on an open stream costs
// the KVS a fraction of a unary call. Each op ends exactly as its unary call would: with its
// answer, with the error the KVS answered (the same ConnectError the call would have thrown), at
// its deadline or abort, or with UNAVAILABLE when the stream breaks. An answer that breaks the
// protocol (batches this client did not ask for, a result of another kind than its op's) ends the
// stream, and it and every op the stream had not answered fail with INTERNAL: a KVS that answers
// wrongly is reported, not worked around.
import { Code, ConnectError, type CallOptions, type Client } from "@connectrpc/connect";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import type { CallError } from "./gen/cloudburst/v1/error_pb.js";
import { ErrorReason } from "./gen/cloudburst/v1/error_pb.js";
import {
  KvsService,
  type DeleteValueResponse,
  type GetValueResponse,
  type PutValueResponse,
  type StreamOpsRequestSchema,
  type StreamOpsResponse,
} from "./gen/cloudburst/v1/kvs_service_pb.js";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { DOMAIN } from "./errors.js";
import { lostTransport } from "./direct.js";
import type { Environment } from "./transport.js";

/** The environment variable that keeps every KVS op a unary call (0, false, no, off), as in Python. */
export const KVS_STREAM_ENV = "CLOUDBURST_KVS_STREAM";

/**
 * A write whose value holds more bytes than this is a unary call, not a frame of the stream: the
 * messages of one stream go in order, so a large value would hold up the small ops behind it, and
 * what a stream saves per op is small beside the cost of moving that many bytes.
 */
export const MAX_STREAMED_PUT_BYTES = 64 << 10;

/**
 * Milliseconds a stream may stay open without an op in flight: then it ends, so that a process
 * that never closes its client still exits (an open stream keeps Node's event loop alive). The
 * next op opens a new one.
 */
export const STREAM_IDLE_MS = 1_000;

const OFF = new Set(["0", "false", "no", "off"]);

/** Whether the environment lets the client stream its KVS ops (the default). */
export function kvsStreamFromEnvironment(env: Environment): boolean {
  return !OFF.has((env[KVS_STREAM_ENV] ?? "").trim().toLowerCase());
}

type Kvs = Client<typeof KvsService>;
type Frame = MessageInitShape<typeof StreamOpsRequestSchema>;
/** The op of a frame: a get, put or delete request. */
export type Op = NonNullable<Frame["op"]>;
/** An answer's result: the op's response (never an error: that is thrown). */
export type Result = StreamOpsResponse["result"];
/** The response to each kind of op: what its unary call answers. */
export interface Answers {
  get: GetValueResponse;
  put: PutValueResponse;
  delete: DeleteValueResponse;
}
/** The kinds of op: "get", "put" and "delete". */
export type OpKind = keyof Answers;

/** The answer that sends an op in a unary call instead (the stream was refused). */
const FALLBACK = Symbol("fallback");

interface Pending {
  /** The kind of the op: its answer must be a result of this kind, or an error. */
  kind: OpKind;
  settle: (result: Result | typeof FALLBACK | ConnectError) => void;
}

/** The ConnectError the unary call would have thrown for an error answered on the stream. */
export function callErrorAsConnectError(error: CallError): ConnectError {
  const name = ErrorReason[error.reason] as string | undefined;
  const reason = name === undefined || name === "UNSPECIFIED" ? "" : name;
  const info = create(ErrorInfoSchema, { domain: DOMAIN, reason, metadata: { ...error.metadata } });
  return new ConnectError(error.message, error.code as Code, undefined, [{ desc: ErrorInfoSchema, value: info }]);
}

/** The frames of one stream, sent in order; the stream's request body. */
class Outbox implements AsyncIterable<Frame> {
  readonly #frames: Frame[] = [];
  #wake: (() => void) | undefined;
  #ended = false;

  constructor(private readonly wanted: (frame: Frame) => boolean) {}

  push(frame: Frame): void {
    this.#frames.push(frame);
    this.#wake?.();
  }

  end(): void {
    this.#ended = true;
    this.#wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Frame> {
    for (;;) {
      const frame = this.#frames.shift();
      if (frame !== undefined) {
        if (this.wanted(frame)) {
          yield frame; // an op that gave up while queued is not sent
        }
        continue;
      }
      if (this.#ended) {
        return;
      }
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
      });
      this.#wake = undefined;
    }
  }
}

/** One StreamOps stream: its unanswered ops by sequence. */
class Stream {
  readonly pending = new Map<bigint, Pending>();
  readonly abort = new AbortController();
  readonly outbox = new Outbox((frame) => this.pending.has(frame.sequence ?? 0n));
  /** Whether the KVS answered any op on it (a refused stream answers none). */
  answered = false;
  /** Ended by this client (idle, or closed): its end is no refusal. */
  ending = false;
  idle: NodeJS.Timeout | undefined;

  end(): void {
    this.ending = true;
    clearTimeout(this.idle);
    this.outbox.end();
    this.abort.abort();
  }
}

/**
 * KVS ops over a StreamOps stream of one connection (the stub's transport: its TLS and token
 * too). The stream opens with the first op, again with the first op after it broke, and ends
 * when idle for STREAM_IDLE_MS or on close().
 */
export class OpStream {
  #stream: Stream | undefined;
  #sequence = 0n;
  #closed = false;
  /** False once the address refused the stream (UNIMPLEMENTED): its ops are unary calls then. */
  available = true;

  /** kvs: the stub at the address; where: that address, for messages. */
  constructor(
    private readonly kvs: Kvs,
    private readonly where: string,
  ) {}

  /** Whether ops may go on the stream (else they are unary calls). */
  get usable(): boolean {
    return this.available && !this.#closed;
  }

  /**
   * Sends op as a frame and resolves to its answer (the response of its unary call), or to
   * undefined: send it as a unary call (the address has no StreamOps, or refused the stream
   * before answering anything on it). Rejects with the ConnectError its unary call would have
   * thrown, or with INTERNAL when the KVS answered on the stream in breach of the protocol.
   */
  async request<K extends OpKind>(op: Op & { case: K }, options: CallOptions): Promise<Answers[K] | undefined> {
    if (!this.usable) {
      return undefined;
    }
    const signal = options.signal;
    if (signal?.aborted) {
      throw ConnectError.from(signal.reason, Code.Canceled);
    }
    const stream = this.#stream ?? this.#open();
    clearTimeout(stream.idle);
    const sequence = ++this.#sequence;
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const answer = new Promise<Result | typeof FALLBACK | ConnectError>((resolve) => {
      stream.pending.set(sequence, { kind: op.case, settle: resolve });
      if (options.timeoutMs !== undefined) {
        timer = setTimeout(
          () => resolve(new ConnectError("the operation timed out", Code.DeadlineExceeded)),
          Math.max(options.timeoutMs, 0),
        );
      }
      if (signal !== undefined) {
        onAbort = () => resolve(ConnectError.from(signal.reason, Code.Canceled));
        signal.addEventListener("abort", onAbort, { once: true });
      }
    });
    const frame: Frame = { sequence, op };
    if (options.timeoutMs !== undefined) {
      const ms = Math.max(Math.floor(options.timeoutMs), 0);
      frame.timeout = { seconds: BigInt(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1_000_000 };
    }
    stream.outbox.push(frame);
    let result: Result | typeof FALLBACK | ConnectError;
    try {
      result = await answer;
    } finally {
      clearTimeout(timer);
      if (onAbort !== undefined) signal?.removeEventListener("abort", onAbort);
      stream.pending.delete(sequence); // a late answer is dropped
      this.#idleWhenDone(stream);
    }
    if (result === FALLBACK) {
      return undefined;
    }
    if (result instanceof ConnectError) {
      throw result;
    }
    return result.value as Answers[K]; // #read checked its kind
  }

  /** Ends the stream; ops still in flight reject with CANCELED, later ops are unary calls. */
  close(): void {
    this.#closed = true;
    const stream = this.#stream;
    this.#stream = undefined;
    if (stream === undefined) {
      return;
    }
    stream.end();
    const closed = new ConnectError("the client was closed before the KVS answered", Code.Canceled);
    for (const op of stream.pending.values()) {
      op.settle(closed);
    }
  }

  #open(): Stream {
    const stream = new Stream();
    this.#stream = stream;
    const answers = this.kvs.streamOps(stream.outbox, { signal: stream.abort.signal });
    void this.#read(stream, answers);
    return stream;
  }

  async #read(stream: Stream, answers: AsyncIterable<StreamOpsResponse>): Promise<void> {
    let error: unknown;
    try {
      for await (const answer of answers) {
        stream.answered = true;
        if (answer.batch.length > 0) {
          // This client never sets reads_batches: a batch is a KVS that does not keep the protocol.
          throw new ConnectError(
            `the KVS at ${this.where} answered with a batch of ${answer.batch.length} answers on a StreamOps stream ` +
              "that did not ask for batches (reads_batches unset); the service breaks the protocol: report it",
            Code.Internal,
          );
        }
        const op = stream.pending.get(answer.sequence);
        if (op === undefined) {
          continue; // its op gave up (deadline, abort)
        }
        const result = answer.result;
        if (result.case === "error") {
          op.settle(callErrorAsConnectError(result.value));
        } else if (result.case === op.kind) {
          op.settle(result);
        } else {
          // Taking it for a miss, or asking again elsewhere, would hide a KVS that answers wrongly.
          const came = result.case === undefined ? "no result" : `a ${result.case} result`;
          throw new ConnectError(
            `the KVS at ${this.where} answered the ${op.kind} of sequence ${answer.sequence} on a StreamOps stream ` +
              `with ${came}, not a ${op.kind} result or an error; the service breaks the protocol: report it`,
            Code.Internal,
          );
        }
      }
    } catch (err) {
      error = err;
    }
    this.#ended(stream, error);
  }

  /** Fails the ops the ended stream did not answer, as their unary calls would have failed. */
  #ended(stream: Stream, err: unknown): void {
    if (this.#stream === stream) {
      this.#stream = undefined;
    }
    stream.end();
    if (stream.pending.size === 0) {
      return;
    }
    const error = err === undefined ? undefined : ConnectError.from(err);
    let failure: ConnectError | typeof FALLBACK;
    if (error?.code === Code.Unimplemented) {
      // No StreamOps here (a scheduler's proxy): this op and every later one are unary calls.
      this.available = false;
      failure = FALLBACK;
    } else if (
      error !== undefined &&
      !stream.answered &&
      !lostTransport(error) &&
      error.code !== Code.Canceled &&
      error.code !== Code.DeadlineExceeded
    ) {
      // Refused before it answered anything (say, UNAUTHENTICATED): the unary calls tell why.
      this.available = false;
      failure = FALLBACK;
    } else if (error === undefined || lostTransport(error) || error.code === Code.Canceled) {
      failure = new ConnectError(
        `the stream of KVS ops to ${this.where} ended before the KVS answered: it may be restarting or unreachable; try again`,
        Code.Unavailable,
      );
    } else {
      failure = error;
    }
    for (const op of stream.pending.values()) {
      op.settle(failure);
    }
  }

  #idleWhenDone(stream: Stream): void {
    if (stream.pending.size > 0 || stream.ending) {
      return;
    }
    clearTimeout(stream.idle);
    stream.idle = setTimeout(() => {
      if (stream.pending.size === 0 && this.#stream === stream) {
        this.#stream = undefined;
        stream.end();
      }
    }, STREAM_IDLE_MS);
    stream.idle.unref(); // the open stream keeps the process alive until then, not the timer
  }
}
