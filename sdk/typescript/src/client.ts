// A thin, idiomatic client: call Python functions and DAGs with native values, read and write
// the KVS, wait for stored results. The generated stubs stay available for anything else.
import { Code, createClient, type CallOptions, type Client, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { Outcome } from "./gen/cloudburst/v1/execution_pb.js";
import { KvsService } from "./gen/cloudburst/v1/kvs_service_pb.js";
import { Keyspace } from "./gen/cloudburst/v1/lattice_pb.js";
import {
  SchedulerService,
  type CallDagRequestSchema,
} from "./gen/cloudburst/v1/scheduler_service_pb.js";
import type { ArgumentSchema } from "./gen/cloudburst/v1/value_pb.js";
import { CloudburstError, fromCallError, fromFailure, fromRpcError } from "./errors.js";
import { ACCEPTED, decode, encode, failureOf, isFailure, type NativeValue } from "./values.js";

/** Options of every call: a deadline and an abort signal. */
export interface Options {
  /** How long the call may take, in milliseconds. */
  timeoutMs?: number;
  /** Aborts the call. */
  signal?: AbortSignal;
}

/** Arguments of a DAG call: each function's arguments, passed before its upstream results. */
export type DagArguments = Record<string, NativeValue[]>;

/** Connects to a scheduler at "host:port" (plaintext, for loopback and trusted networks). */
export function connect(address: string): CloudburstClient {
  const baseUrl = /^https?:\/\//.test(address) ? address : `http://${address}`;
  return new CloudburstClient(createGrpcTransport({ baseUrl }));
}

/** A client of one scheduler (or a load balancer in front of several). */
export class CloudburstClient {
  /** The generated SchedulerService stub. */
  readonly scheduler: Client<typeof SchedulerService>;
  /** The generated KvsService stub. */
  readonly kvs: Client<typeof KvsService>;

  constructor(transport: Transport) {
    this.scheduler = createClient(SchedulerService, transport);
    this.kvs = createClient(KvsService, transport);
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

  /** Stores a value under a user key (last writer wins). */
  async put(key: string, value: NativeValue, options: Options = {}): Promise<void> {
    await rpc(() =>
      this.kvs.putValue(
        {
          key,
          keyspace: Keyspace.USER,
          lattice: { kind: { case: "lww", value: { value: encode(value) } } },
          omitLattice: true,
        },
        callOptions(options),
      ),
    );
  }

  /** Reads the value under a user key; undefined when there is none. */
  async get(key: string, options: Options = {}): Promise<NativeValue | undefined> {
    const response = await rpc(() =>
      this.kvs.getValue({ key, keyspace: Keyspace.USER }, callOptions(options)),
    );
    if (!response.found) {
      return undefined;
    }
    const kind = response.lattice?.kind;
    if (kind?.case !== "lww" || kind.value.value === undefined) {
      throw new CloudburstError(Code.FailedPrecondition, "", `key ${JSON.stringify(key)} holds a set; read it with the kvs stub`);
    }
    return decode(kind.value.value);
  }
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
