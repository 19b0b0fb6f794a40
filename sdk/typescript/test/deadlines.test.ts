// Tests that a KVS op keeps one deadline across its attempts, against real HTTP/2 gRPC servers on
// 127.0.0.1 port 0 (made with connect-node's own server adapter): a KVS that answers UNAVAILABLE
// shortly before an op's deadline, as a KVS lost mid-call does, and a scheduler whose KvsService
// then gets the op again and never answers it. The attempt through the scheduler must get only
// what the first one left, so the op ends at its deadline, not at twice it. Run with
// `node --test dist/test/deadlines.test.js` after `tsc -p .`.
import { ok, strictEqual } from "node:assert/strict";
import { test } from "node:test";
import { Code, ConnectError, type HandlerContext } from "@connectrpc/connect";
import type { Duration } from "@bufbuild/protobuf/wkt";
import { KvsService } from "../src/gen/cloudburst/v1/kvs_service_pb.js";
import { CloudburstError, type CloudburstClient } from "../src/index.js";
import { DIRECT_KVS_PROBE_MS } from "../src/direct.js";
import { clientOf, hungPeer, serve } from "./servers.js";

/** The deadline of every op here. */
const TIMEOUT_MS = 1_500;

/** Milliseconds before an op's deadline at which the KVS answers UNAVAILABLE. */
const LEFT_MS = 300;

/** Resolves LEFT_MS before a deadline timeoutMs from now. */
function nearDeadline(timeoutMs: number | undefined): Promise<void> {
  ok(timeoutMs !== undefined, "the op carries its deadline");
  return new Promise((resolve) => setTimeout(resolve, Math.max(timeoutMs - LEFT_MS, 0)));
}

function milliseconds(duration: Duration | undefined): number | undefined {
  return duration === undefined ? undefined : Number(duration.seconds) * 1000 + duration.nanos / 1e6;
}

/** The error of a KVS that was lost mid-call (the transport's, without a reason). */
function lost(): ConnectError {
  return new ConnectError("the KVS went away", Code.Unavailable);
}

/** Never resolves; rejects once the call is ended (its deadline, or the client gave it up). */
function never(context: HandlerContext): Promise<never> {
  return new Promise((_resolve, reject) => {
    context.signal.addEventListener("abort", () => reject(ConnectError.from(context.signal.reason)), { once: true });
  });
}

/**
 * A KVS that answers each op (unary, or a frame of its op stream) with UNAVAILABLE LEFT_MS
 * before the op's deadline, and a scheduler that names it and never answers an op; retries:
 * the deadline (milliseconds) each op the scheduler received carried.
 */
async function cluster(): Promise<{ scheduler: string; retries: number[] }> {
  const retries: number[] = [];
  const kvs = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({}),
      async putValue(_request, context) {
        await nearDeadline(context.timeoutMs());
        throw lost();
      },
      async getValue(_request, context) {
        await nearDeadline(context.timeoutMs());
        throw lost();
      },
      async deleteValue(_request, context) {
        await nearDeadline(context.timeoutMs());
        throw lost();
      },
      async *streamOps(requests) {
        for await (const frame of requests) {
          await nearDeadline(milliseconds(frame.timeout));
          throw lost(); // the stream breaks: the op's answer never comes
        }
        yield* [];
      },
    }),
  );
  const received = (context: HandlerContext): Promise<never> => {
    retries.push(context.timeoutMs() ?? Infinity);
    return never(context);
  };
  const scheduler = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({ kvsAddresses: [kvs.address] }),
      putValue: (_request, context) => received(context),
      getValue: (_request, context) => received(context),
      deleteValue: (_request, context) => received(context),
    }),
  );
  return { scheduler: scheduler.address, retries };
}

/** How long op took, in milliseconds, and the error it rejected with. */
async function timed(op: () => Promise<unknown>): Promise<{ elapsed: number; error: unknown }> {
  const started = performance.now();
  try {
    await op();
  } catch (error) {
    return { elapsed: performance.now() - started, error };
  }
  return { elapsed: performance.now() - started, error: undefined };
}

test("an op sent again through the scheduler gets only what is left of its deadline", async () => {
  const { scheduler, retries } = await cluster();
  const ops: [string, (client: CloudburstClient) => Promise<unknown>][] = [
    ["put", (client) => client.put("k", "v", { timeoutMs: TIMEOUT_MS })],
    ["get", (client) => client.get("k", { timeoutMs: TIMEOUT_MS })],
    ["delete", (client) => client.delete("k", { timeoutMs: TIMEOUT_MS })],
  ];
  const cases = [true, false].flatMap((kvsStream) =>
    ops.map(([name, op]) => ({ name: `${name} (${kvsStream ? "a frame" : "a unary call"})`, kvsStream, op })),
  );
  // Each op with a client of its own (one that lost the KVS sends every op through the scheduler).
  const results = await Promise.all(
    cases.map(async ({ kvsStream, op }) => {
      const client = clientOf(scheduler, { kvsStream });
      try {
        return await timed(() => op(client));
      } finally {
        client.close();
      }
    }),
  );
  for (const [index, { elapsed, error }] of results.entries()) {
    const name = cases[index]!.name;
    ok(error instanceof CloudburstError, `${name}: ${String(error)}`);
    strictEqual(error.code, Code.DeadlineExceeded, `${name}: ${error.message}`);
    // Twice the deadline before: the attempt through the scheduler got all of it again.
    ok(elapsed < TIMEOUT_MS + 700, `${name} took ${Math.round(elapsed)} ms with a deadline of ${TIMEOUT_MS} ms`);
  }
  strictEqual(retries.length, cases.length, "each op was sent again through the scheduler");
  for (const timeoutMs of retries) {
    ok(timeoutMs <= LEFT_MS + 100, `the attempt through the scheduler was given ${timeoutMs} ms, not what was left`);
  }
});

test("an op whose deadline passes while the KVS address is probed ends then", async () => {
  const peer = await hungPeer(); // the KVS address the scheduler names: it never answers
  let answered = 0;
  const scheduler = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({ kvsAddresses: [peer.address] }),
      getValue: () => {
        answered += 1;
        return { found: false };
      },
    }),
  );
  const client = clientOf(scheduler.address);
  const timeoutMs = DIRECT_KVS_PROBE_MS / 4;
  const { elapsed, error } = await timed(() => client.get("k", { timeoutMs }));
  ok(error instanceof CloudburstError, String(error));
  strictEqual(error.code, Code.DeadlineExceeded, error.message);
  ok(elapsed < timeoutMs + 700, `the get took ${Math.round(elapsed)} ms with a deadline of ${timeoutMs} ms`);
  strictEqual(answered, 0);
  // The probe went on without the call: once it gave the address up, ops go through the scheduler.
  strictEqual(await client.get("k", { timeoutMs: 30_000 }), undefined);
  strictEqual(answered, 1);
  strictEqual(client.kvsAddress, undefined);
  client.close();
});
