// Values too large for one message move in chunks (docs/protocol.md): a write of more than
// INLINE_VALUE_BYTES (or than the KVS tier's message limit, when that is smaller) goes with
// PutValueChunks, the write without its bytes and then the bytes in CHUNK_BYTES pieces; a
// GetValue answered `chunked` is read with GetValueChunks. The same rules as the Python SDK's
// (sdk/python/cloudburst/chunks.py), so that either reads what the other wrote.
import { Code, type CallOptions, type Client } from "@connectrpc/connect";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { GetLimitsResponse, KvsService, PutValueChunksRequestSchema } from "./gen/cloudburst/v1/kvs_service_pb.js";
import type { Keyspace, LwwTimestampSchema } from "./gen/cloudburst/v1/lattice_pb.js";
import { Serializer, type Value } from "./gen/cloudburst/v1/value_pb.js";
import { CloudburstError } from "./errors.js";

/** Bytes of a value per chunk. */
export const CHUNK_BYTES = 1 << 20;

/** A last-writer-wins value larger than this is written in chunks. */
export const INLINE_VALUE_BYTES = 4 << 20;

/** Bytes of a message left for what is not the value (key, timestamp, framing). */
export const MESSAGE_HEADROOM_BYTES = 4 << 10;

type Kvs = Client<typeof KvsService>;

/** The largest value written in one message under the tier's limits. */
export function inlineValueBytes(limits: GetLimitsResponse | undefined): number {
  const message = Number(limits?.maxMessageBytes ?? 0n);
  return message > 0 ? Math.min(INLINE_VALUE_BYTES, Math.max(message - MESSAGE_HEADROOM_BYTES, 0)) : INLINE_VALUE_BYTES;
}

/** Refuses, before sending, a value over the tier's max_value_bytes (0: no limit known). */
export function checkValueSize(key: string, size: number, limits: GetLimitsResponse | undefined): void {
  const limit = Number(limits?.maxValueBytes ?? 0n);
  if (limit > 0 && size > limit) {
    throw new CloudburstError(
      Code.ResourceExhausted,
      "PAYLOAD_TOO_LARGE",
      `the value for key ${JSON.stringify(key)} is ${size} bytes serialized, over the limit of ${limit} bytes; ` +
        "store large data in smaller pieces or raise the limit (the KVS's max_value_bytes)",
      { what: `the value for key ${JSON.stringify(key)}`, size: String(size), limit: String(limit) },
    );
  }
}

/** Which write a chunked write is: its timestamp and request id, the same in each attempt. */
export interface WriteIdentity {
  timestamp: MessageInitShape<typeof LwwTimestampSchema>;
  requestId: string;
}

/**
 * Writes a last-writer-wins value with PutValueChunks: slices of data, never a copy of the whole.
 * The first frame carries the write's timestamp and request id.
 */
export async function writeValue(
  kvs: Kvs,
  key: string,
  keyspace: Keyspace,
  serializer: Serializer,
  data: Uint8Array,
  write: WriteIdentity,
  options: CallOptions,
): Promise<void> {
  async function* frames(): AsyncGenerator<MessageInitShape<typeof PutValueChunksRequestSchema>> {
    yield {
      frame: {
        case: "put",
        value: {
          key,
          keyspace,
          requestId: write.requestId,
          lattice: { kind: { case: "lww", value: { timestamp: write.timestamp, value: { serializer } } } },
        },
      },
    };
    for (let start = 0; start < data.length; start += CHUNK_BYTES) {
      yield { frame: { case: "chunk", value: data.subarray(start, start + CHUNK_BYTES) } };
    }
  }
  await kvs.putValueChunks(frames(), options);
}

/**
 * Reads a key with GetValueChunks: the value of a last-writer-wins lattice, its chunks joined
 * (the first frame names no size, so they are joined once at the end); undefined when it is
 * missing. A set lattice is refused: read it with the kvs stub.
 */
export async function readValue(
  kvs: Kvs,
  key: string,
  keyspace: Keyspace,
  options: CallOptions,
): Promise<Value | undefined> {
  let value: Value | undefined;
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const frame of kvs.getValueChunks({ key, keyspace }, options)) {
    if (frame.frame.case === "lattice") {
      const kind = frame.frame.value.kind;
      if (kind.case !== "lww") {
        throw notLww(key);
      }
      value = kind.value.value ?? ({ serializer: Serializer.UNSPECIFIED, data: new Uint8Array() } as Value);
    } else if (frame.frame.case === "chunk" && value !== undefined) {
      chunks.push(frame.frame.value);
      size += frame.frame.value.length;
    }
  }
  if (value === undefined) {
    return undefined;
  }
  const data = chunks.length === 1 ? chunks[0]! : new Uint8Array(size);
  if (chunks.length !== 1) {
    let at = 0;
    for (const chunk of chunks) {
      data.set(chunk, at);
      at += chunk.length;
    }
  }
  value.data = data;
  return value;
}

/** The error for a key that holds no last-writer-wins value. */
export function notLww(key: string): CloudburstError {
  return new CloudburstError(
    Code.FailedPrecondition,
    "",
    `key ${JSON.stringify(key)} holds a set lattice, not a single value; read it with the kvs stub`,
  );
}
