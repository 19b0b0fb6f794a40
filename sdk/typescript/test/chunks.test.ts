// Tests of values too large for one message against a real HTTP/2 gRPC server on 127.0.0.1 port 0
// (connect-node's own server adapter) holding values in memory as the KVS does: a value over the
// message limit is answered `chunked` by GetValue (and by a StreamOps get) and served by
// GetValueChunks; PutValueChunks joins its chunks. Run with `node --test dist/test/chunks.test.js`
// after `tsc -p .`.
import { createHash } from "node:crypto";
import { deepStrictEqual, ok, strictEqual } from "node:assert/strict";
import { test } from "node:test";
import { Code } from "@connectrpc/connect";
import { KvsService } from "../src/gen/cloudburst/v1/kvs_service_pb.js";
import type { Value } from "../src/gen/cloudburst/v1/value_pb.js";
import { CloudburstError } from "../src/index.js";
import { CHUNK_BYTES } from "../src/chunks.js";
import { clientOf, serve } from "./servers.js";

const MIB = 1 << 20;

interface Kvs {
  address: string;
  calls: string[];
  /** The chunk sizes of each PutValueChunks call. */
  putChunks: number[][];
  stored: Map<string, Value>;
  /** How many GetLimits calls it answered. */
  limitsAsked: () => number;
}

/**
 * An in-memory KVS; a value of more than maxMessageBytes is answered `chunked`. hangChunks: its
 * GetValueChunks sends the lattice and then nothing.
 */
async function kvsServer(
  options: {
    maxValueBytes?: number;
    maxMessageBytes?: number;
    opStreams?: boolean;
    hangChunks?: boolean;
    kvsAddresses?: string[];
  } = {},
): Promise<Kvs> {
  const maxMessage = options.maxMessageBytes ?? 4 * MIB;
  const calls: string[] = [];
  const putChunks: number[][] = [];
  const stored = new Map<string, Value>();
  let limitsAsked = 0;
  const answer = (key: string) => {
    const value = stored.get(key);
    if (value === undefined) return { found: false };
    if (value.data.length > maxMessage) return { found: true, chunked: true };
    return { found: true, lattice: { kind: { case: "lww" as const, value: { value } } } };
  };
  const server = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => {
        limitsAsked += 1;
        return {
          maxValueBytes: BigInt(options.maxValueBytes ?? 64 * MIB),
          maxMessageBytes: BigInt(maxMessage),
          servesOpStreams: options.opStreams ?? false,
          kvsAddresses: options.kvsAddresses ?? [],
        };
      },
      getValue: (request) => {
        calls.push(`GetValue ${request.key}`);
        return answer(request.key);
      },
      putValue: (request) => {
        calls.push(`PutValue ${request.key}`);
        const kind = request.lattice?.kind;
        if (kind?.case === "lww" && kind.value.value !== undefined) stored.set(request.key, kind.value.value);
        return {};
      },
      async *getValueChunks(request) {
        calls.push(`GetValueChunks ${request.key}`);
        const value = stored.get(request.key);
        if (value === undefined) return;
        yield { frame: { case: "lattice", value: { kind: { case: "lww", value: { value: { serializer: value.serializer } } } } } };
        if (options.hangChunks) {
          await new Promise(() => undefined);
        }
        for (let start = 0; start < value.data.length; start += CHUNK_BYTES) {
          yield { frame: { case: "chunk", value: value.data.subarray(start, start + CHUNK_BYTES) } };
        }
      },
      async putValueChunks(requests) {
        const sizes: number[] = [];
        putChunks.push(sizes);
        let key = "";
        let serializer = 0;
        const parts: Uint8Array[] = [];
        for await (const frame of requests) {
          if (frame.frame.case === "put") {
            key = frame.frame.value.key;
            const kind = frame.frame.value.lattice?.kind;
            serializer = kind?.case === "lww" ? (kind.value.value?.serializer ?? 0) : 0;
            calls.push(`PutValueChunks ${key}`);
          } else if (frame.frame.case === "chunk") {
            sizes.push(frame.frame.value.length);
            parts.push(frame.frame.value);
          }
        }
        const data = Buffer.concat(parts);
        stored.set(key, { serializer, data: new Uint8Array(data) } as Value);
        return { size: BigInt(data.length) };
      },
      async *streamOps(requests) {
        for await (const frame of requests) {
          calls.push(`frame ${frame.op.case ?? ""} ${frame.op.value?.key ?? ""}`);
          if (frame.op.case === "get") {
            yield { sequence: frame.sequence, result: { case: "get", value: answer(frame.op.value.key) } };
          } else if (frame.op.case === "put") {
            const kind = frame.op.value.lattice?.kind;
            if (kind?.case === "lww" && kind.value.value !== undefined) stored.set(frame.op.value.key, kind.value.value);
            yield { sequence: frame.sequence, result: { case: "put", value: {} } };
          }
        }
      },
    }),
  );
  return { address: server.address, calls, putChunks, stored, limitsAsked: () => limitsAsked };
}

function generated(size: number): Uint8Array {
  const data = new Uint8Array(size);
  for (let i = 0; i < size; i += 1) data[i] = (i * 2654435761) >>> 24;
  return data;
}

const digest = (data: Uint8Array): string => createHash("sha256").update(data).digest("hex");

test("a 20 MiB value is written in 1 MiB chunks and read back from its chunks intact", async () => {
  const kvs = await kvsServer();
  const client = clientOf(kvs.address, { direct: false });
  const data = generated(20 * MIB + 5);
  await client.put("big", data);
  deepStrictEqual(kvs.putChunks, [[...Array(20).fill(MIB), 5]]);
  strictEqual(digest(kvs.stored.get("big")!.data), digest(data));
  const read = await client.get("big");
  ok(read instanceof Uint8Array);
  strictEqual(read.length, data.length);
  strictEqual(digest(read), digest(data));
  deepStrictEqual(kvs.calls, ["PutValueChunks big", "GetValue big", "GetValueChunks big"]);
  client.close();
});

test("a chunked answer on an op stream is read with GetValueChunks", async () => {
  const kvs = await kvsServer({ opStreams: true, maxMessageBytes: 64 << 10 });
  const client = clientOf(kvs.address);
  const text = "x".repeat(300 << 10);
  kvs.stored.set("text", { serializer: 3, data: new TextEncoder().encode(text) } as Value);
  strictEqual(await client.get("text"), text);
  deepStrictEqual(kvs.calls, ["frame get text", "GetValueChunks text"]);
  client.close();
});

test("a value over the tier's message limit (under 4 MiB) goes in chunks", async () => {
  const kvs = await kvsServer({ maxMessageBytes: 256 << 10 });
  const client = clientOf(kvs.address, { direct: false });
  await client.put("mid", generated(300 << 10));
  deepStrictEqual(kvs.calls, ["PutValueChunks mid"]);
  client.close();
});

test("a write to the KVS directly is sized by that KVS's own limits, not the scheduler's", async () => {
  const kvs = await kvsServer({ maxMessageBytes: 256 << 10 });
  const scheduler = await kvsServer({ maxMessageBytes: 8 * MIB, kvsAddresses: [kvs.address] });
  const client = clientOf(scheduler.address);
  await client.put("mid", generated(300 << 10));
  deepStrictEqual(kvs.calls, ["PutValueChunks mid"]);
  deepStrictEqual(scheduler.calls, []);
  await client.put("small", generated(200 << 10));
  deepStrictEqual(kvs.calls, ["PutValueChunks mid", "PutValue small"]);
  client.close();
});

test("a value under 64 KiB over a tiny message limit goes in chunks; the limits are asked once", async () => {
  const tiny = { maxMessageBytes: 16 << 10, opStreams: true };
  const data = generated(60 << 10);
  // At the address connected to (a KVS answers there, as for `cbgrpc serve`), with direct access
  // on (its GetLimits answer, asked first, sizes the writes) and off (the first put asks it).
  for (const direct of [true, false]) {
    const kvs = await kvsServer(tiny);
    const client = clientOf(kvs.address, { direct });
    await client.put("over", data);
    await client.put("under", generated(8 << 10));
    await client.put("under", generated(8 << 10));
    const read = await client.get("over");
    ok(read instanceof Uint8Array);
    strictEqual(digest(read), digest(data));
    deepStrictEqual(kvs.putChunks, [[60 << 10]]);
    const how = direct ? "frame put" : "PutValue";
    const get = direct ? "frame get over" : "GetValue over";
    deepStrictEqual(kvs.calls, ["PutValueChunks over", `${how} under`, `${how} under`, get, "GetValueChunks over"]);
    strictEqual(kvs.limitsAsked(), 1, "GetLimits was asked once");
    client.close();
  }
  // At the KVS directly: sized by its own limits, not by the scheduler's.
  const kvs = await kvsServer(tiny);
  const scheduler = await kvsServer({ kvsAddresses: [kvs.address] });
  const client = clientOf(scheduler.address);
  await client.put("over", data);
  await client.put("under", generated(8 << 10));
  strictEqual(digest((await client.get("over")) as Uint8Array), digest(data));
  deepStrictEqual(kvs.calls, ["PutValueChunks over", "frame put under", "frame get over", "GetValueChunks over"]);
  deepStrictEqual(scheduler.calls, []);
  strictEqual(kvs.limitsAsked() + scheduler.limitsAsked(), 2, "each was asked its limits once");
  client.close();
});

test("a small value still goes in one message", async () => {
  const kvs = await kvsServer();
  const client = clientOf(kvs.address, { direct: false });
  await client.put("small", { a: 1 });
  deepStrictEqual(await client.get("small"), { a: 1 });
  await client.put("medium", generated(MIB));
  deepStrictEqual(kvs.calls, ["PutValue small", "GetValue small", "PutValue medium"]);
  client.close();
});

test("a value over max_value_bytes is refused before sending, naming its size and the limit", async () => {
  const kvs = await kvsServer({ maxValueBytes: 5 * MIB });
  const client = clientOf(kvs.address, { direct: false });
  let caught: unknown;
  try {
    await client.put("huge", generated(6 * MIB));
  } catch (err) {
    caught = err;
  }
  ok(caught instanceof CloudburstError, String(caught));
  strictEqual(caught.code, Code.ResourceExhausted);
  strictEqual(caught.reason, "PAYLOAD_TOO_LARGE");
  ok(caught.message.includes(`${6 * MIB} bytes`), caught.message);
  ok(caught.message.includes(`limit of ${5 * MIB} bytes`), caught.message);
  ok(caught.message.includes("smaller pieces"), caught.message);
  deepStrictEqual(kvs.calls, []);
  client.close();
});

test("a deadline ends a chunked read that stalls", async () => {
  const kvs = await kvsServer({ hangChunks: true, maxMessageBytes: 64 << 10 });
  const client = clientOf(kvs.address, { direct: false });
  kvs.stored.set("slow", { serializer: 1, data: generated(MIB) } as Value);
  const started = performance.now();
  let caught: unknown;
  try {
    await client.get("slow", { timeoutMs: 300 });
  } catch (err) {
    caught = err;
  }
  ok(caught instanceof CloudburstError, String(caught));
  strictEqual(caught.code, Code.DeadlineExceeded);
  ok(performance.now() - started < 5_000);
  const abort = new AbortController();
  const reading = client.get("slow", { signal: abort.signal });
  setTimeout(() => abort.abort(), 100);
  let aborted: unknown;
  try {
    await reading;
  } catch (err) {
    aborted = err;
  }
  ok(aborted instanceof CloudburstError, String(aborted));
  strictEqual(aborted.code, Code.Canceled);
  client.close();
});
