// Tests that a retried KVS write is the same write, against real HTTP/2 gRPC servers on 127.0.0.1
// port 0 (made with connect-node's own server adapter): a KVS that applies each write and delete
// and then answers UNAVAILABLE, as when its answer is lost, and a scheduler whose KvsService the
// client then sends the write through again. Each attempt must carry the same request id, and a
// put the same stamped lattice. Run with `node --test dist/test/writes.test.js` after `tsc -p .`.
import { deepStrictEqual, notStrictEqual, ok, strictEqual } from "node:assert/strict";
import { test } from "node:test";
import { toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  KvsService,
  type PutValueChunksRequest,
  type PutValueRequest,
} from "../src/gen/cloudburst/v1/kvs_service_pb.js";
import { LatticeSchema } from "../src/gen/cloudburst/v1/lattice_pb.js";
import { LwwClock } from "../src/writes.js";
import { clientOf, serve } from "./servers.js";

/** A write or delete a test server received. */
interface Received {
  at: "kvs" | "scheduler";
  how: "frame" | "unary" | "chunks";
  op: "put" | "delete";
  key: string;
  requestId: string;
  /** A put's lattice, serialized (a chunked put's first frame, and then its joined chunks). */
  lattice?: string;
  timeNs?: bigint;
  writerId?: string;
}

/** The scheduler's message limit: a value over it less 4 KiB of headroom goes in chunks. */
const MESSAGE_BYTES = 256 << 10;

/** What a server received in a put (request), with a chunked put's joined chunks (data). */
function put(at: Received["at"], how: Received["how"], request: PutValueRequest, data?: Uint8Array): Received {
  const lattice = request.lattice;
  const timestamp = lattice?.kind.case === "lww" ? lattice.kind.value.timestamp : undefined;
  const bytes = lattice === undefined ? "" : Buffer.from(toBinary(LatticeSchema, lattice)).toString("hex");
  return {
    at,
    how,
    op: "put",
    key: request.key,
    requestId: request.requestId,
    lattice: data === undefined ? bytes : `${bytes}+${Buffer.from(data).toString("hex")}`,
    ...(timestamp === undefined ? {} : { timeNs: timestamp.timeNs, writerId: timestamp.writerId }),
  };
}

/** The error of a write that was applied but whose answer was lost. */
function lost(): ConnectError {
  return new ConnectError("the answer was lost", Code.Unavailable);
}

/**
 * A KVS that records each write and delete and then answers UNAVAILABLE (on its op stream, by
 * ending the stream), and a scheduler that names it and records and answers each one.
 */
async function cluster(): Promise<{ scheduler: string; kvs: string; received: Received[] }> {
  const received: Received[] = [];
  const kvs = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({ servesOpStreams: true, maxMessageBytes: BigInt(MESSAGE_BYTES) }),
      putValue: (request) => {
        received.push(put("kvs", "unary", request));
        throw lost();
      },
      deleteValue: (request) => {
        received.push({ at: "kvs", how: "unary", op: "delete", key: request.key, requestId: request.requestId });
        throw lost();
      },
      async putValueChunks(requests) {
        const { header, data } = await joined(requests);
        received.push(put("kvs", "chunks", header, data));
        throw lost();
      },
      async *streamOps(requests) {
        for await (const frame of requests) {
          if (frame.op.case === "put") {
            received.push(put("kvs", "frame", frame.op.value));
          } else if (frame.op.case === "delete") {
            const { key, requestId } = frame.op.value;
            received.push({ at: "kvs", how: "frame", op: "delete", key, requestId });
          }
          throw lost(); // the stream breaks after the op was applied
        }
        yield* [];
      },
    }),
  );
  const scheduler = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({ kvsAddresses: [kvs.address], maxMessageBytes: BigInt(MESSAGE_BYTES) }),
      putValue: (request) => {
        received.push(put("scheduler", "unary", request));
        return {};
      },
      deleteValue: (request) => {
        received.push({ at: "scheduler", how: "unary", op: "delete", key: request.key, requestId: request.requestId });
        return { existed: true };
      },
      async putValueChunks(requests) {
        const { header, data } = await joined(requests);
        received.push(put("scheduler", "chunks", header, data));
        return { size: BigInt(data.length) };
      },
    }),
  );
  return { scheduler: scheduler.address, kvs: kvs.address, received };
}

/** A PutValueChunks stream's first frame and its chunks joined. */
async function joined(
  requests: AsyncIterable<PutValueChunksRequest>,
): Promise<{ header: PutValueRequest; data: Uint8Array }> {
  let header: PutValueRequest | undefined;
  const chunks: Uint8Array[] = [];
  for await (const request of requests) {
    if (request.frame.case === "put") header = request.frame.value;
    else if (request.frame.case === "chunk") chunks.push(request.frame.value);
  }
  ok(header !== undefined, "PutValueChunks sent no write");
  return { header, data: Buffer.concat(chunks) };
}

/** The two attempts of the write to key: at the KVS, then through the scheduler. */
function attempts(received: Received[], key: string): [Received, Received] {
  const of = received.filter((r) => r.key === key);
  deepStrictEqual(
    of.map((r) => r.at),
    ["kvs", "scheduler"],
    `the write to ${key} went to the KVS and then through the scheduler`,
  );
  return [of[0]!, of[1]!];
}

test("a retried put (streamed, unary or chunked) sends the same stamped lattice and request id", async () => {
  const { scheduler, received } = await cluster();
  const writes: [string, string, Received["how"]][] = [
    ["streamed", "small", "frame"],
    ["unary", "x".repeat((64 << 10) + 1), "unary"], // over 64 KiB: not a frame of the stream
    ["chunked", "y".repeat(MESSAGE_BYTES), "chunks"], // over the message limit: in chunks
  ];
  for (const [key, value, how] of writes) {
    const client = clientOf(scheduler); // a new client goes to the KVS first
    await client.put(key, value, { timeoutMs: 30_000 });
    const [first, retry] = attempts(received, key);
    strictEqual(first.how, how, key);
    ok(first.requestId !== "", `the put of ${key} carries a request id`);
    strictEqual(retry.requestId, first.requestId, `the retry of ${key} carries the first attempt's request id`);
    ok((first.timeNs ?? 0n) > 0n && (first.writerId ?? "") !== "", `the client stamped the put of ${key}`);
    strictEqual(retry.lattice, first.lattice, `the retry of ${key} sends the same stamped lattice`);
    client.close();
  }
  const ids = new Set(received.map((r) => r.requestId));
  strictEqual(ids.size, writes.length, "each write has its own request id");
});

test("a retried delete sends the same request id; the next delete another", async () => {
  const { scheduler, received } = await cluster();
  for (const [kvsStream, how] of [
    [true, "frame"],
    [false, "unary"],
  ] as const) {
    const key = `deleted-${how}`;
    const client = clientOf(scheduler, { kvsStream });
    strictEqual(await client.delete(key, { timeoutMs: 30_000 }), true);
    const [first, retry] = attempts(received, key);
    strictEqual(first.how, how, key);
    ok(first.requestId !== "", `the delete of ${key} carries a request id`);
    strictEqual(retry.requestId, first.requestId, `the retry of ${key} carries the first attempt's request id`);
    // The KVS was lost: the next delete goes through the scheduler only, as another delete.
    await client.delete(key, { timeoutMs: 30_000 });
    const again = received.filter((r) => r.key === key);
    strictEqual(again.length, 3);
    notStrictEqual(again[2]!.requestId, first.requestId, "another delete has another request id");
    client.close();
  }
});

test("puts of one client are stamped in increasing order, each with its own request id", async () => {
  const { scheduler, received } = await cluster();
  const client = clientOf(scheduler);
  await client.put("a", 1, { timeoutMs: 30_000 }); // to the KVS, then through the scheduler
  await client.put("a", 2, { timeoutMs: 30_000 }); // through the scheduler
  await client.put("a", 3, { timeoutMs: 30_000 });
  const later = received.filter((r) => r.key === "a").slice(1);
  strictEqual(later.length, 3);
  ok(later.every((r) => r.at === "scheduler"));
  ok(later[0]!.timeNs! < later[1]!.timeNs! && later[1]!.timeNs! < later[2]!.timeNs!, "timestamps increase");
  strictEqual(new Set(later.map((r) => r.writerId)).size, 1, "one writer id per client");
  strictEqual(new Set(later.map((r) => r.requestId)).size, 3, "each put has its own request id");
  client.close();
});

test("the clock never repeats or goes back, even within one millisecond", () => {
  const clock = new LwwClock();
  let last = 0n;
  for (let i = 0; i < 10_000; i += 1) {
    const now = clock.now();
    ok(now.timeNs! > last, "strictly increasing");
    last = now.timeNs!;
    strictEqual(now.writerId, clock.writerId);
  }
  ok(/^[0-9a-f]{16}-\d+$/.test(clock.writerId), clock.writerId);
  notStrictEqual(new LwwClock().writerId, clock.writerId, "each clock has its own writer id");
});
