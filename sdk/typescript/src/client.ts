// A thin, idiomatic client: call Python functions and DAGs with native values, read and write
// the KVS, wait for stored results. The generated stubs stay available for anything else.
import { Code, createClient, type CallOptions, type Client, type Transport } from "@connectrpc/connect";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { Outcome } from "./gen/cloudburst/v1/execution_pb.js";
import { KvsService } from "./gen/cloudburst/v1/kvs_service_pb.js";
import { Keyspace } from "./gen/cloudburst/v1/lattice_pb.js";
import {
  SchedulerService,
  type CallDagRequestSchema,
} from "./gen/cloudburst/v1/scheduler_service_pb.js";
import type { ArgumentSchema, Value } from "./gen/cloudburst/v1/value_pb.js";
import { checkValueSize, inlineValueBytes, notLww, readValue, writeValue } from "./chunks.js";
import { DirectKvs, directKvsFromEnvironment, type RequestOptions } from "./direct.js";
import {
  kvsStreamFromEnvironment,
  MAX_STREAMED_PUT_BYTES,
  type Answers,
  type Op,
  type OpKind,
  type OpStream,
} from "./opstream.js";
import { grpcTransport, transportOptions } from "./transport.js";
import { LwwClock, newRequestId } from "./writes.js";
import { tlsSettings, type TlsSettings } from "./tls.js";
import { CloudburstError, fromCallError, fromFailure, fromRpcError } from "./errors.js";
import { Serializer } from "./gen/cloudburst/v1/value_pb.js";
import { ACCEPTED, decode, encode, failureOf, isFailure, type NativeValue } from "./values.js";

/** Options of every call: a deadline and an abort signal. */
export interface Options {
  /**
   * How long the call may take, in milliseconds: all of it, so a KVS op made again through the
   * scheduler after the KVS was found unreachable gets only what is left.
   */
  timeoutMs?: number;
  /** Aborts the call. */
  signal?: AbortSignal;
}

/** Arguments of a DAG call: each function's arguments, passed before its upstream results. */
export type DagArguments = Record<string, NativeValue[]>;

/**
 * Options of a connection. TLS: the tls* settings and the token not given come from
 * `CLOUDBURST_TLS_CA`, `CLOUDBURST_TLS_CERT`, `CLOUDBURST_TLS_KEY`, `CLOUDBURST_TLS_SERVER_NAME`
 * and `CLOUDBURST_TOKEN`; any of them but the server name makes a "host:port" address use TLS (an
 * https:// address always does, an http:// one never).
 */
export interface ConnectOptions extends TlsSettings {
  /**
   * Read and write objects at the KVS itself when the scheduler names its address (a cluster's
   * scheduler does): one network hop instead of two. When that address does not answer, within
   * two seconds of the first KVS call or later, objects go through the scheduler, and the KVS is
   * tried again now and then. With TLS only a client that shows a certificate goes direct.
   * false always goes through the scheduler; when not given, `CLOUDBURST_DIRECT_KVS=0` turns it
   * off.
   */
  directKvs?: boolean;
  /**
   * Send put, get and delete as frames of one long-lived stream per connection (to the KVS, or
   * to a `cbgrpc serve` address while directKvs is on) rather than one call each: cheaper for the
   * KVS. When not given, `CLOUDBURST_KVS_STREAM=0` turns it off.
   */
  kvsStream?: boolean;
}

/**
 * Connects to a scheduler at "host:port" (plaintext, for loopback and trusted networks, unless a
 * TLS setting or a token is given), or at a URL. With a token, every call carries it
 * (`authorization: Bearer <token>`) and a scheduler with a tokens file authenticates the client
 * by it: a token it does not know fails calls with UNAUTHENTICATED, a role that may not do
 * something with PERMISSION_DENIED, each with the server's reason; objects then go through the
 * scheduler (the KVS takes client certificates only). With TLS and a client certificate, the
 * servers that ask for one (a scheduler without tokens, or its client certificate port, and the
 * KVS) authenticate the client by it; a server that refuses it fails calls with UNAUTHENTICATED,
 * saying why, and a certificate expired or not valid yet is refused here (UNAUTHENTICATED). The
 * connection pings the scheduler every second and gives it up (its calls reject with
 * UNAVAILABLE) when a ping goes unanswered for two seconds (`CLOUDBURST_PING_TIMEOUT_SECONDS`):
 * a hung scheduler fails calls within seconds instead of at their deadlines. Throws a
 * CloudburstError (INVALID_ARGUMENT) for a TLS file that cannot be read, a certificate without
 * its key or with a key that does not match it, or a malformed environment variable.
 */
export function connect(address: string, options: ConnectOptions = {}): CloudburstClient {
  const plaintext = address.startsWith("http://");
  const given = [options.tlsCa, options.tlsCert, options.tlsKey, options.tlsServerName];
  if (plaintext && given.some((setting) => setting !== undefined)) {
    throw new CloudburstError(
      Code.InvalidArgument,
      "",
      `TLS settings were given for the plaintext address ${address}: use host:port or https://`,
    );
  }
  if (plaintext && options.token !== undefined) {
    throw new CloudburstError(
      Code.InvalidArgument,
      "",
      `a token is sent only over TLS, and ${address} is a plaintext address: use host:port or https://`,
    );
  }
  const tls = plaintext ? undefined : tlsSettings(options, process.env);
  const scheme = address.startsWith("https://") || tls !== undefined ? "https" : "http";
  const baseUrl = /^https?:\/\//.test(address) ? address : `${scheme}://${address}`;
  const shared = transportOptions(scheme, process.env, tls);
  return new CloudburstClient(grpcTransport(baseUrl, shared), {
    directKvs: options.directKvs ?? directKvsFromEnvironment(process.env),
    kvsStream: options.kvsStream ?? kvsStreamFromEnvironment(process.env),
    address,
    kvsTransport: (kvsAddress) => grpcTransport(`${scheme}://${kvsAddress}`, shared),
  });
}

/** How a CloudburstClient reaches the KVS itself; without kvsTransport, always through the scheduler. */
export interface ClientOptions {
  /** Whether to read and write objects at the KVS that the scheduler names (default true). */
  directKvs?: boolean;
  /** Makes the transport to a KVS at "host:port". */
  kvsTransport?: (address: string) => Transport;
  /**
   * Whether put, get and delete go as frames of a StreamOps stream where a KVS serves one
   * (default true): at the KVS the scheduler names, and at the transport's address when its
   * GetLimits answer sets serves_op_streams (only with direct access on: without it, ops there
   * stay unary calls).
   */
  kvsStream?: boolean;
  /** The transport's address, for messages. */
  address?: string;
}

/** A client of one scheduler (or a load balancer in front of several). */
export class CloudburstClient {
  /** The generated SchedulerService stub. */
  readonly scheduler: Client<typeof SchedulerService>;
  /** The generated KvsService stub at the scheduler, which forwards to the KVS tier. */
  readonly kvs: Client<typeof KvsService>;
  readonly #direct: DirectKvs;
  readonly #clock = new LwwClock();

  constructor(transport: Transport, options: ClientOptions = {}) {
    this.scheduler = createClient(SchedulerService, transport);
    this.kvs = createClient(KvsService, transport);
    this.#direct = new DirectKvs(
      this.kvs,
      options.kvsTransport !== undefined && (options.directKvs ?? true) ? options.kvsTransport : undefined,
      options.kvsStream ?? true,
      options.address ?? "the scheduler",
    );
  }

  /**
   * Ends the client's KVS op streams, so that nothing of it keeps the process running (an idle
   * stream also ends by itself after a second). Ops still waiting on a stream reject with
   * CANCELED; later ops are unary calls.
   */
  close(): void {
    this.#direct.close();
  }

  /**
   * The address of the KVS that put and get go to directly; undefined while they go through the
   * scheduler (before the first of them, too).
   */
  get kvsAddress(): string | undefined {
    return this.#direct.current();
  }

  /** Calls a function and waits for its result; a raise rejects with a FunctionError. */
  async callFunction(name: string, args: NativeValue[] = [], options: Options = {}): Promise<NativeValue> {
    const response = await rpc(() =>
      this.scheduler.callFunction(
        {
          name,
          arguments: args.map(argument),
          directResponse: true,
          acceptSerializers: ACCEPTED,
        },
        callOptions(options),
      ),
    );
    return resultOf(response.outcome);
  }

  /** Calls a DAG and waits for its sink's result. */
  async callDag(name: string, args: DagArguments = {}, options: Options = {}): Promise<NativeValue> {
    const response = await rpc(() =>
      this.scheduler.callDag({ ...dagRequest(name, args), directResponse: true }, callOptions(options)),
    );
    return resultOf(response.outcome);
  }

  /**
   * Calls a DAG without waiting; resolves to the response key its result is stored under (read
   * it with waitResult). A result nobody reads expires after the scheduler's result time-to-live.
   */
  async startDag(name: string, args: DagArguments = {}, options: Options = {}): Promise<string> {
    const response = await rpc(() => this.scheduler.callDag(dagRequest(name, args), callOptions(options)));
    return response.responseKey;
  }

  /** Waits for the result stored under a response key; with release, deletes it once read. */
  async waitResult(responseKey: string, release = false, options: Options = {}): Promise<NativeValue> {
    const response = await rpc(() =>
      this.scheduler.getResult({ responseKey, release }, callOptions(options)),
    );
    return resultOf(response.outcome);
  }

  /**
   * Stores a value under a user key (last writer wins). A value of more than 4 MiB (or than the
   * message limit of the service the write goes to, when that is smaller, however small the
   * value) goes in 1 MiB chunks (PutValueChunks); one over that service's max_value_bytes is
   * refused before sending (RESOURCE_EXHAUSTED, PAYLOAD_TOO_LARGE). The limits come from each
   * service's GetLimits answer, asked once: when the client first asks where the KVS is, or
   * (with direct access off) by the first put. The write is stamped once, here, with this
   * client's last-writer-wins timestamp and given a random request id; a retry through the
   * scheduler after the KVS was found unreachable sends the same lattice and id, so it stores the
   * value once (see the README, "Retried writes"). A KVS refuses a write stamped more than its
   * kvs.max_clock_skew_seconds ahead of its own clock (INVALID_ARGUMENT).
   */
  async put(key: string, value: NativeValue, options: Options = {}): Promise<void> {
    const encoded = encode(value);
    const data = encoded.data instanceof Uint8Array ? encoded.data : new Uint8Array();
    // Stamped once, here: every attempt sends the same write.
    const write = { timestamp: this.#clock.now(), requestId: newRequestId() };
    const request = {
      key,
      keyspace: Keyspace.USER,
      lattice: { kind: { case: "lww", value: { timestamp: write.timestamp, value: encoded } } },
      requestId: write.requestId,
      omitLattice: true,
    } as const;
    await rpc(() =>
      this.#direct.call(callOptions(options), async (kvs, ops, requestOptions) => {
        // Known since the client asked where the KVS is; asked here by a first put without direct
        // access (or after that question found no answer), and then kept.
        const limits = await this.#direct.limitsOf(kvs, requestOptions());
        checkValueSize(key, data.length, limits);
        if (data.length > inlineValueBytes(limits)) {
          const serializer = encoded.serializer ?? Serializer.UNSPECIFIED;
          await writeValue(kvs, key, Keyspace.USER, serializer, data, write, requestOptions());
          return;
        }
        if (data.length <= MAX_STREAMED_PUT_BYTES) {
          const answer = await streamed(ops, { case: "put", value: request }, requestOptions);
          if (answer !== undefined) return;
        }
        await kvs.putValue(request, requestOptions());
      }),
    );
  }

  /**
   * Reads the value under a user key; undefined when there is none. A value too large for one
   * message (GetValue answers `chunked`) is read in chunks (GetValueChunks).
   */
  async get(key: string, options: Options = {}): Promise<NativeValue | undefined> {
    const request = { key, keyspace: Keyspace.USER };
    const value: Value | undefined = await rpc(() =>
      this.#direct.call(callOptions(options), async (kvs, ops, requestOptions) => {
        const answer = await streamed(ops, { case: "get", value: request }, requestOptions);
        const response = answer ?? (await kvs.getValue(request, requestOptions()));
        if (!response.found) {
          return undefined;
        }
        if (response.chunked) {
          return readValue(kvs, key, Keyspace.USER, requestOptions());
        }
        const kind = response.lattice?.kind;
        if (kind?.case !== "lww" || kind.value.value === undefined) {
          throw notLww(key);
        }
        return kind.value.value;
      }),
    );
    return value === undefined ? undefined : decode(value);
  }

  /**
   * Deletes the value under a user key; resolves to whether there was one. The delete carries a
   * random request id, sent again with it when it is retried through the scheduler (see the
   * README, "Retried writes").
   */
  async delete(key: string, options: Options = {}): Promise<boolean> {
    const request = { key, keyspace: Keyspace.USER, requestId: newRequestId() };
    const response = await rpc(() =>
      this.#direct.call(callOptions(options), async (kvs, ops, requestOptions) => {
        const answer = await streamed(ops, { case: "delete", value: request }, requestOptions);
        return answer ?? kvs.deleteValue(request, requestOptions());
      }),
    );
    return response.existed;
  }
}

/**
 * Sends an op on the stream, if one serves here; resolves to its answer, or to undefined when it
 * is to go in a unary call. Rejects as the unary call would.
 */
async function streamed<K extends OpKind>(
  ops: OpStream | undefined,
  op: Op & { case: K },
  options: RequestOptions,
): Promise<Answers[K] | undefined> {
  return ops === undefined ? undefined : ops.request<K>(op, options());
}

function argument(value: NativeValue): MessageInitShape<typeof ArgumentSchema> {
  return { kind: { case: "value", value: encode(value) } };
}

function dagRequest(name: string, args: DagArguments): MessageInitShape<typeof CallDagRequestSchema> {
  const functionArguments: Record<string, { arguments: MessageInitShape<typeof ArgumentSchema>[] }> = {};
  for (const [fn, values] of Object.entries(args)) {
    functionArguments[fn] = { arguments: values.map(argument) };
  }
  return { name, functionArguments, acceptSerializers: ACCEPTED };
}

function callOptions(options: Options): CallOptions {
  const result: CallOptions = {};
  if (options.timeoutMs !== undefined) result.timeoutMs = options.timeoutMs;
  if (options.signal !== undefined) result.signal = options.signal;
  return result;
}

async function rpc<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (err) {
    throw fromRpcError(err);
  }
}

function resultOf(outcome: Outcome | undefined): NativeValue {
  const result = outcome?.result;
  switch (result?.case) {
    case "value":
      if (isFailure(result.value)) {
        throw fromFailure(failureOf(result.value));
      }
      return decode(result.value);
    case "failure":
      throw fromFailure(result.value);
    case "error":
      throw fromCallError(result.value);
    default:
      throw new CloudburstError(Code.Internal, "INTERNAL", "the scheduler answered an empty outcome");
  }
}
