// Objects at the KVS itself: the scheduler's GetLimits answer names the KVS (kvs_addresses), and
// KVS calls go there, one network hop instead of two through the scheduler's KvsService, which
// forwards to the KVS tier. A direct call that finds the KVS unreachable is made again through
// the scheduler, which then serves every KVS call until the KVS answers again. Small ops go as
// frames of one StreamOps stream (opstream.ts) to the KVS, and to the scheduler's address when
// what answers there is a KVS itself (`cbgrpc serve`: GetLimits sets serves_op_streams).
import { Code, ConnectError, createClient, type CallOptions, type Client, type Transport } from "@connectrpc/connect";
import { KvsService, type GetLimitsResponse } from "./gen/cloudburst/v1/kvs_service_pb.js";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { DOMAIN } from "./errors.js";
import { OpStream } from "./opstream.js";
import type { Environment } from "./transport.js";

/** The environment variable that turns direct KVS access off (0, false, no, off). */
export const DIRECT_KVS_ENV = "CLOUDBURST_DIRECT_KVS";

/** Milliseconds a KVS address the scheduler names may take to answer before objects go through it. */
export const DIRECT_KVS_PROBE_MS = 2_000;

/** Milliseconds after losing the KVS's address before it is tried again (then doubling). */
export const DIRECT_RETRY_MS = 5_000;

/** The longest pause between tries of a lost KVS address. */
export const DIRECT_RETRY_MAX_MS = 120_000;

const OFF = new Set(["0", "false", "no", "off"]);

/** Whether the environment leaves direct KVS access on (the default). */
export function directKvsFromEnvironment(env: Environment): boolean {
  return !OFF.has((env[DIRECT_KVS_ENV] ?? "").trim().toLowerCase());
}

/**
 * Whether err is UNAVAILABLE from the transport (the service could not be reached), not an error
 * a service answered with a reason of its own.
 */
export function lostTransport(err: unknown): boolean {
  return (
    err instanceof ConnectError &&
    err.code === Code.Unavailable &&
    !err.findDetails(ErrorInfoSchema).some((info) => info.domain === DOMAIN)
  );
}

/** Whether err leaves a question open: the call did not reach the service, or ran out of time. */
function askAgain(err: unknown): boolean {
  return (
    lostTransport(err) ||
    (err instanceof ConnectError && (err.code === Code.DeadlineExceeded || err.code === Code.Canceled))
  );
}

type Kvs = Client<typeof KvsService>;

/**
 * The options of a request made now for a call: what is left of the call's deadline, and its
 * signal. Throws DEADLINE_EXCEEDED once nothing is left.
 */
export type RequestOptions = () => CallOptions;

/**
 * The options of each request of a call that starts now: every attempt, and every request of an
 * attempt, gets what is left of one deadline (options.timeoutMs from now).
 */
export function deadlineOf(options: CallOptions): RequestOptions {
  const timeoutMs = options.timeoutMs;
  if (timeoutMs === undefined) {
    return () => options;
  }
  const deadline = performance.now() + timeoutMs;
  return () => {
    const left = Math.floor(deadline - performance.now()); // gRPC takes whole milliseconds
    if (left <= 0) {
      throw new ConnectError(`the call's deadline (${timeoutMs} ms) passed before the KVS answered`, Code.DeadlineExceeded);
    }
    return { ...options, timeoutMs: left };
  };
}

/**
 * An idempotent KVS operation: given the stub to call, the op stream there, if any, and the
 * options of each request it makes (what is left of the call's deadline when it makes it).
 */
export type KvsOperation<T> = (kvs: Kvs, ops: OpStream | undefined, options: RequestOptions) => Promise<T>;

/** Where KVS calls go: the KVS the scheduler names while it answers, else the scheduler. */
export class DirectKvs {
  #resolving: Promise<void> | undefined;
  #resolved = false;
  #address: string | undefined;
  #stub: Kvs | undefined;
  #ops: OpStream | undefined;
  #proxyOps: OpStream | undefined;
  #inUse = false;
  #closed = false;
  #limits: GetLimitsResponse | undefined;
  #asking: Promise<GetLimitsResponse> | undefined;
  /** The direct KVS's own limits, from its last GetLimits answer (its probe, or its return). */
  #directLimits: GetLimitsResponse | undefined;

  /**
   * proxy: KvsService at the scheduler (at `where`); transport: how to reach a KVS (undefined:
   * never directly); streams: whether small ops may go on op streams.
   */
  constructor(
    private readonly proxy: Kvs,
    private readonly transport: ((address: string) => Transport) | undefined,
    private readonly streams = false,
    private readonly where = "the scheduler",
  ) {}

  /** The KVS that calls go to directly; undefined while they go through the scheduler. */
  current(): string | undefined {
    return this.#inUse ? this.#address : undefined;
  }

  /**
   * Runs an idempotent KVS operation at the KVS; if that is unreachable, through the scheduler.
   * The whole call keeps options.timeoutMs, taken when it starts: the attempt through the
   * scheduler gets what the first one left (and fails with DEADLINE_EXCEEDED when nothing is).
   */
  async call<T>(options: CallOptions, operation: KvsOperation<T>): Promise<T> {
    const requestOptions = deadlineOf(options);
    const stub = await this.#stubFor(requestOptions);
    if (stub === this.proxy) {
      return operation(stub, this.#proxyOps, requestOptions);
    }
    try {
      return await operation(stub, this.#ops, requestOptions);
    } catch (err) {
      if (!lostTransport(err)) {
        throw err;
      }
      this.#leave();
    }
    return operation(this.proxy, this.#proxyOps, requestOptions);
  }

  /**
   * The limits (max_value_bytes, max_message_bytes) of the service behind kvs, which sizes a write
   * sent there: the direct KVS's own, from its GetLimits answer; otherwise the scheduler's.
   */
  async limitsOf(kvs: Kvs, options: CallOptions): Promise<GetLimitsResponse> {
    if (kvs !== this.proxy && kvs === this.#stub && this.#directLimits !== undefined) {
      return this.#directLimits;
    }
    return this.limits(options);
  }

  /**
   * The scheduler's limits (max_value_bytes, max_message_bytes): from its GetLimits answer, asked
   * once (again after a failure).
   */
  async limits(options: CallOptions): Promise<GetLimitsResponse> {
    if (this.#limits !== undefined) {
      return this.#limits;
    }
    this.#asking ??= this.proxy.getLimits({}, options).finally(() => {
      this.#asking = undefined;
    });
    this.#limits = await this.#asking;
    return this.#limits;
  }

  /** Ends the op streams (ops in flight on them reject with CANCELED); later ops are unary calls. */
  close(): void {
    this.#closed = true;
    this.#ops?.close();
    this.#proxyOps?.close();
  }

  async #stubFor(options: RequestOptions): Promise<Kvs> {
    if (this.transport === undefined) {
      return this.proxy; // no GetLimits: ops at the scheduler's address stay unary calls
    }
    if (!this.#resolved) {
      this.#resolving ??= this.#resolve(this.transport, options).finally(() => {
        this.#resolving = undefined;
      });
      // A call whose deadline passes while an address is probed ends then; the probe goes on.
      await settledBefore(this.#resolving, options);
    }
    return this.#inUse && this.#stub !== undefined ? this.#stub : this.proxy;
  }

  /**
   * Asks the scheduler where the KVS is (and whether a KVS itself answers at its address) and uses
   * the first address that answers.
   */
  async #resolve(transport: (address: string) => Transport, options: RequestOptions): Promise<void> {
    let addresses: string[];
    try {
      const limits = await this.proxy.getLimits({}, options());
      this.#limits = limits;
      addresses = limits.kvsAddresses;
      if (limits.servesOpStreams && this.streams && !this.#closed) {
        this.#proxyOps = new OpStream(this.proxy, this.where);
      }
    } catch (err) {
      // A scheduler that cannot be reached (or not before the call's deadline) is asked again
      // by the next call; one that answered with an error names no KVS.
      this.#resolved = !askAgain(err);
      return;
    }
    this.#resolved = true;
    for (const address of addresses) {
      const stub = createClient(KvsService, transport(address));
      try {
        this.#directLimits = await stub.getLimits({}, { timeoutMs: DIRECT_KVS_PROBE_MS });
      } catch {
        // Unreachable, or (with TLS) it refused this client: the KVS's port asks for a client
        // certificate, so a client without one stays with the scheduler.
        continue;
      }
      this.#address = address;
      this.#stub = stub;
      if (this.streams && !this.#closed) {
        this.#ops = new OpStream(stub, address);
      }
      this.#inUse = true;
      return;
    }
  }

  /** Sends KVS calls through the scheduler until the KVS answers directly again. */
  #leave(): void {
    if (!this.#inUse) {
      return;
    }
    this.#inUse = false;
    this.#comeBack(DIRECT_RETRY_MS);
  }

  #comeBack(delay: number): void {
    const stub = this.#stub;
    if (stub === undefined) {
      return;
    }
    const timer = setTimeout(() => {
      stub.getLimits({}, { timeoutMs: delay }).then(
        (limits) => {
          this.#directLimits = limits; // a KVS restarted meanwhile may have other limits
          this.#inUse = true;
        },
        () => this.#comeBack(Math.min(delay * 2, DIRECT_RETRY_MAX_MS)),
      );
    }, delay);
    timer.unref(); // a client waiting to try again does not keep the process alive
  }
}

/**
 * Resolves once promise does, or rejects as a request made now with options would be ended: at
 * what is left of its deadline (DEADLINE_EXCEEDED), or when its signal aborts (CANCELED).
 */
async function settledBefore(promise: Promise<void>, options: RequestOptions): Promise<void> {
  const { timeoutMs, signal } = options();
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  const ended = new Promise<never>((_resolve, reject) => {
    if (timeoutMs !== undefined) {
      timer = setTimeout(() => reject(new ConnectError("the operation timed out", Code.DeadlineExceeded)), timeoutMs);
    }
    if (signal !== undefined) {
      onAbort = () => reject(ConnectError.from(signal.reason, Code.Canceled));
      if (signal.aborted) onAbort();
      else signal.addEventListener("abort", onAbort, { once: true });
    }
  });
  try {
    await Promise.race([promise, ended]);
  } finally {
    clearTimeout(timer);
    if (onAbort !== undefined) signal?.removeEventListener("abort", onAbort);
  }
}
