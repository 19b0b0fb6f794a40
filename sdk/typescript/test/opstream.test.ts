// Tests of the client's KVS op streams against real HTTP/2 gRPC servers on 127.0.0.1 port 0 (made
// with connect-node's own server adapter), each counting the StreamOps streams, frames and unary
// calls it serves: where put, get and delete go on a stream and where they stay unary calls, and
// that each op ends as its unary call would when it errs, times out, is aborted, is refused or
// loses its stream. Run with `node --test dist/test/opstream.test.js` after `tsc -p .`.
import { deepStrictEqual, ok, rejects, strictEqual } from "node:assert/strict";
import { test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { ErrorReason } from "../src/gen/cloudburst/v1/error_pb.js";
import {
  KvsService,
  type StreamOpsRequest,
  type StreamOpsResponseSchema,
} from "../src/gen/cloudburst/v1/kvs_service_pb.js";
import { CloudburstError } from "../src/index.js";
import { kvsStreamFromEnvironment } from "../src/opstream.js";
import { clientOf, jsonValue, serve, until } from "./servers.js";

type Answer = MessageInitShape<typeof StreamOpsResponseSchema>;

/** What a test KVS served. */
interface Counts {
  streams: number;
  ended: number;
  frames: string[];
  unary: string[];
}

const STORED = { found: true, lattice: { kind: { case: "lww" as const, value: { value: jsonValue("stored") } } } };

/**
 * A KVS whose StreamOps serves each frame concurrently with answer (by default: the op's usual
 * answer), answering each as it ends; servesOpStreams is what its GetLimits says.
 */
async function kvsServer(
  options: {
    servesOpStreams?: boolean;
    answer?: (frame: StreamOpsRequest) => Promise<Answer>;
    refuse?: ConnectError;
    kvsAddresses?: string[];
  } = {},
): Promise<{ address: string; counts: Counts; resetAll: () => void }> {
  const counts: Counts = { streams: 0, ended: 0, frames: [], unary: [] };
  const usual = async (frame: StreamOpsRequest): Promise<Answer> => {
    switch (frame.op.case) {
      case "get":
        return { sequence: frame.sequence, result: { case: "get", value: STORED } };
      case "put":
        return { sequence: frame.sequence, result: { case: "put", value: {} } };
      default:
        return { sequence: frame.sequence, result: { case: "delete", value: { existed: true } } };
    }
  };
  const answer = options.answer ?? usual;
  const server = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({ servesOpStreams: options.servesOpStreams ?? true, kvsAddresses: options.kvsAddresses ?? [] }),
      getValue: (request) => {
        counts.unary.push(`get ${request.key}`);
        return STORED;
      },
      putValue: (request) => {
        counts.unary.push(`put ${request.key}`);
        return {};
      },
      deleteValue: (request) => {
        counts.unary.push(`delete ${request.key}`);
        return { existed: true };
      },
      async *streamOps(requests) {
        counts.streams += 1;
        if (options.refuse !== undefined) {
          throw options.refuse;
        }
        const ready: Answer[] = [];
        let wake = (): void => undefined;
        let reading = true;
        let running = 0;
        void (async () => {
          try {
            for await (const frame of requests) {
              counts.frames.push(`${frame.op.case ?? ""} ${frame.op.value?.key ?? ""}`);
              running += 1;
              void answer(frame).then((a) => {
                running -= 1;
                ready.push(a);
                wake();
              });
            }
          } catch {
            // the client cancelled the stream
          }
          reading = false;
          wake();
        })();
        try {
          for (;;) {
            const next = ready.shift();
            if (next !== undefined) {
              yield next;
              continue;
            }
            if (!reading && running === 0) {
              return;
            }
            await new Promise<void>((resolve) => {
              wake = resolve;
            });
          }
        } finally {
          counts.ended += 1;
        }
      },
    }),
  );
  return { address: server.address, counts, resetAll: server.resetAll };
}

/** The error a promise rejects with. */
async function failure(promise: Promise<unknown>): Promise<CloudburstError> {
  try {
    await promise;
  } catch (err) {
    ok(err instanceof CloudburstError, String(err));
    return err;
  }
  throw new Error("the op did not fail");
}

test("CLOUDBURST_KVS_STREAM=0 turns op streams off; anything else leaves them on", () => {
  for (const off of ["0", "false", " No ", "OFF"]) {
    strictEqual(kvsStreamFromEnvironment({ CLOUDBURST_KVS_STREAM: off }), false, off);
  }
  for (const on of [undefined, "", "1", "yes"]) {
    strictEqual(kvsStreamFromEnvironment({ CLOUDBURST_KVS_STREAM: on }), true, String(on));
  }
});

test("put, get and delete go as frames of one stream where the address serves op streams", async () => {
  const kvs = await kvsServer();
  const client = clientOf(kvs.address);
  await client.put("a", { n: 1 });
  strictEqual(await client.get("a"), "stored");
  strictEqual(await client.delete("a"), true);
  await Promise.all([client.get("b"), client.get("c"), client.put("d", "x")]);
  strictEqual(kvs.counts.streams, 1);
  deepStrictEqual(kvs.counts.frames, ["put a", "get a", "delete a", "get b", "get c", "put d"]);
  deepStrictEqual(kvs.counts.unary, []);
  client.close();
  await until(() => kvs.counts.ended === 1, "close() ends the stream");
});

test("a value over 64 KiB, a proxy's address and the switch get unary calls", async () => {
  const kvs = await kvsServer();
  const client = clientOf(kvs.address);
  await client.put("large", "x".repeat((64 << 10) + 1));
  await client.put("small", "x".repeat(64 << 10));
  deepStrictEqual(kvs.counts.unary, ["put large"]);
  deepStrictEqual(kvs.counts.frames, ["put small"]);
  client.close();

  const proxy = await kvsServer({ servesOpStreams: false });
  const proxied = clientOf(proxy.address);
  await proxied.put("a", 1);
  await proxied.get("a");
  await proxied.delete("a");
  const switchedOff = clientOf(kvs.address, { kvsStream: false });
  await switchedOff.get("off");
  strictEqual(proxy.counts.streams, 0, "no stream is tried at an address that serves none");
  deepStrictEqual(proxy.counts.unary, ["put a", "get a", "delete a"]);
  strictEqual(kvs.counts.streams, 1, "the switch keeps ops unary");
  deepStrictEqual(kvs.counts.unary, ["put large", "get off"]);
});

test("an error answered on the stream is the error of the unary call", async () => {
  const error = new ConnectError("key must not be empty", Code.InvalidArgument);
  const kvs = await kvsServer({
    answer: async (frame) => ({
      sequence: frame.sequence,
      result: {
        case: "error",
        value: { code: Code.InvalidArgument, message: error.rawMessage, reason: ErrorReason.INVALID_ARGUMENT, metadata: { field: "key" } },
      },
    }),
  });
  const client = clientOf(kvs.address);
  const streamed = await failure(client.get(""));
  strictEqual(kvs.counts.frames.length, 1);
  strictEqual(streamed.code, Code.InvalidArgument);
  strictEqual(streamed.reason, "INVALID_ARGUMENT");
  strictEqual(streamed.message, "INVALID_ARGUMENT: key must not be empty");
  deepStrictEqual(streamed.metadata, { field: "key" });
  client.close();
});

test("an op past its deadline or aborted ends at once; its late answer is dropped", async () => {
  const held: (() => void)[] = [];
  const kvs = await kvsServer({
    answer: (frame) =>
      new Promise((resolve) => {
        const answer = (): void => resolve({ sequence: frame.sequence, result: { case: "get", value: STORED } });
        if (frame.op.value?.key === "held") held.push(answer);
        else answer();
      }),
  });
  const client = clientOf(kvs.address);
  const started = performance.now();
  const late = await failure(client.get("held", { timeoutMs: 200 }));
  strictEqual(late.code, Code.DeadlineExceeded, late.message);
  ok(performance.now() - started < 5_000, "the deadline ended the read");
  const caller = new AbortController();
  const aborted = client.get("held", { signal: caller.signal });
  await until(() => held.length === 2, "both reads reached the KVS");
  caller.abort();
  strictEqual((await failure(aborted)).code, Code.Canceled);
  for (const answer of held) answer(); // late answers, for ops that ended
  strictEqual(await client.get("other"), "stored");
  strictEqual(kvs.counts.streams, 1, "the stream outlived the ops that gave up");
  client.close();
});

test("a broken stream fails its ops with UNAVAILABLE and the next op opens another", async () => {
  let reset = (): void => undefined;
  const kvs = await kvsServer({
    answer: (frame) =>
      new Promise((resolve) => {
        if (frame.op.value?.key === "break") reset();
        else resolve({ sequence: frame.sequence, result: { case: "put", value: {} } });
      }),
  });
  reset = kvs.resetAll;
  const client = clientOf(kvs.address);
  await client.put("before", 1);
  const broken = await failure(client.put("break", 1, { timeoutMs: 30_000 }));
  strictEqual(broken.code, Code.Unavailable, broken.message);
  await client.put("after", 1);
  strictEqual(kvs.counts.streams, 2);
  deepStrictEqual(kvs.counts.unary, [], "no op was sent again as a unary call");
  client.close();
});

test("a stream refused before any answer sends its ops as unary calls, and no later op tries one", async () => {
  for (const refusal of [
    new ConnectError("no StreamOps here", Code.Unimplemented),
    new ConnectError("the certificate was revoked", Code.Unauthenticated),
  ]) {
    const kvs = await kvsServer({ refuse: refusal });
    const client = clientOf(kvs.address);
    await client.put("a", 1);
    strictEqual(await client.get("a"), "stored");
    deepStrictEqual(kvs.counts.unary, ["put a", "get a"], refusal.message);
    strictEqual(kvs.counts.streams, 1, refusal.message);
    client.close();
  }
});

test("the direct KVS gets the stream; a stream lost mid-op sends the op through the scheduler", async () => {
  let reset = (): void => undefined;
  const kvs = await kvsServer({
    answer: (frame) =>
      new Promise((resolve) => {
        if (frame.op.value?.key === "break") reset();
        else resolve({ sequence: frame.sequence, result: { case: "put", value: {} } });
      }),
  });
  reset = kvs.resetAll;
  const scheduler = await kvsServer({ servesOpStreams: false, kvsAddresses: [kvs.address] });
  const client = clientOf(scheduler.address);
  await client.put("direct", 1);
  strictEqual(client.kvsAddress, kvs.address);
  await client.put("break", 1, { timeoutMs: 30_000 });
  deepStrictEqual(kvs.counts.frames, ["put direct", "put break"]);
  deepStrictEqual(scheduler.counts.unary, ["put break"], "the lost op went through the scheduler");
  strictEqual(scheduler.counts.streams, 0);
  client.close();
});

test("batched answers the client did not ask for fail the op", async () => {
  const kvs = await kvsServer({
    answer: async (frame) => ({ batch: [{ sequence: frame.sequence, result: { case: "put", value: {} } }] }),
  });
  const client = clientOf(kvs.address);
  const refused = await failure(client.put("a", 1));
  strictEqual(refused.code, Code.Internal, refused.message);
  ok(refused.message.includes("did not ask for"), refused.message);
  client.close();
});

test("an answer of another kind than its op fails it and the stream's unanswered ops with INTERNAL", async () => {
  const held: (() => void)[] = [];
  const kvs = await kvsServer({
    answer: (frame) =>
      new Promise((resolve) => {
        const key = frame.op.value?.key;
        if (key === "held") {
          held.push(() => resolve({ sequence: frame.sequence, result: { case: "put", value: {} } }));
        } else if (key === "wrong") {
          resolve({ sequence: frame.sequence, result: { case: "put", value: {} } }); // a put's answer for a get
        } else if (key === "empty") {
          resolve({ sequence: frame.sequence });
        } else {
          resolve({ sequence: frame.sequence, result: { case: "get", value: STORED } });
        }
      }),
  });
  const scheduler = await kvsServer({ servesOpStreams: false, kvsAddresses: [kvs.address] });
  const client = clientOf(scheduler.address);
  strictEqual(await client.get("before"), "stored");
  strictEqual(client.kvsAddress, kvs.address);
  const waiting = failure(client.put("held", 1, { timeoutMs: 30_000 }));
  await until(() => held.length === 1, "the held write reached the KVS");
  const wrong = await failure(client.get("wrong", { timeoutMs: 30_000 }));
  strictEqual(wrong.code, Code.Internal, wrong.message);
  ok(wrong.message.includes(`the KVS at ${kvs.address} answered the get`), wrong.message);
  ok(wrong.message.includes("with a put result, not a get result or an error"), wrong.message);
  ok(wrong.message.includes("breaks the protocol: report it"), wrong.message);
  // The op the stream had not answered ends with it, as in a broken stream, with the same error.
  const other = await waiting;
  strictEqual(other.code, Code.Internal, other.message);
  strictEqual(other.message, wrong.message);
  for (const answer of held) answer(); // too late: the stream has ended
  await until(() => kvs.counts.ended === 1, "the stream ended");

  const empty = await failure(client.delete("empty", { timeoutMs: 30_000 }));
  strictEqual(empty.code, Code.Internal, empty.message);
  ok(empty.message.includes("answered the delete"), empty.message);
  ok(empty.message.includes("with no result"), empty.message);

  strictEqual(await client.get("after"), "stored", "the next op opens another stream");
  strictEqual(kvs.counts.streams, 3);
  deepStrictEqual(kvs.counts.unary, [], "no op was sent again as a unary call");
  deepStrictEqual(scheduler.counts.unary, [], "nor through the scheduler");
  strictEqual(client.kvsAddress, kvs.address, "the KVS is still used directly");
  client.close();
});

test("a stream without an op in flight ends by itself, and the next op opens another", async () => {
  const kvs = await kvsServer();
  const client = clientOf(kvs.address);
  await client.put("a", 1);
  // Nothing ends it but the client's idle timer (about a second): a process that never closes
  // its client is not kept alive by the stream.
  await until(() => kvs.counts.ended === 1, "the idle stream ended");
  strictEqual(await client.get("a"), "stored");
  strictEqual(kvs.counts.streams, 2);
  deepStrictEqual(kvs.counts.unary, []);
  client.close();
});
