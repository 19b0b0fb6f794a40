// Unit tests of the hand-written layer (no server): value encoding and typed errors.
// Run with `node --test dist/test/unit.test.js` after `tsc -p .` (make clients does both).
import { deepStrictEqual, ok, strictEqual, throws } from "node:assert/strict";
import { test } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorReason, CallErrorSchema } from "../src/gen/cloudburst/v1/error_pb.js";
import { FailureSchema, Serializer, ValueSchema } from "../src/gen/cloudburst/v1/value_pb.js";
import { ErrorInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { CloudburstError, DIRECT_KVS_ENV, FunctionError, KEEPALIVE_TIMEOUT_MS, PING_TIMEOUT_ENV, pingTimeoutMs } from "../src/index.js";
import { directKvsFromEnvironment, lostTransport } from "../src/direct.js";
import { fromCallError, fromFailure, fromRpcError } from "../src/errors.js";
import { decode, encode, failureOf, toValue } from "../src/values.js";

test("strings, bytes and JSON values pick their serializer", () => {
  strictEqual(encode("é").serializer, Serializer.STRING);
  strictEqual(encode(new Uint8Array([0, 1])).serializer, Serializer.BYTES);
  const json = toValue({ a: [1, null, true] });
  strictEqual(json.serializer, Serializer.JSON);
  deepStrictEqual(new TextDecoder().decode(json.data), '{"a":[1,null,true]}');
  deepStrictEqual(decode(json), { a: [1, null, true] });
  strictEqual(decode(toValue("é")), "é");
});

test("a pickled value cannot be read and says what to do", () => {
  const pickled = create(ValueSchema, { data: new Uint8Array([0x80]), serializer: Serializer.CLOUDPICKLE });
  throws(() => decode(pickled), /return JSON-representable values/);
});

test("an RPC error carries the ErrorInfo reason and metadata", () => {
  const rpcError = new ConnectError("DAG 'x' is not registered", Code.NotFound, undefined, [
    { desc: ErrorInfoSchema, value: { reason: "DAG_NOT_FOUND", domain: "cloudburst.v1", metadata: { dag: "x" } } },
  ]);
  const err = fromRpcError(rpcError);
  ok(err instanceof CloudburstError);
  strictEqual(err.reason, "DAG_NOT_FOUND");
  strictEqual(err.code, Code.NotFound);
  deepStrictEqual(err.metadata, { dag: "x" });
  const foreign = fromRpcError(
    new ConnectError("m", Code.NotFound, undefined, [
      { desc: ErrorInfoSchema, value: { reason: "X", domain: "elsewhere" } },
    ]),
  );
  ok(foreign instanceof CloudburstError);
  strictEqual(foreign.reason, "");
});

test("outcome errors and failures become typed errors", () => {
  const callError = fromCallError(
    create(CallErrorSchema, { code: Code.InvalidArgument, reason: ErrorReason.SERIALIZATION_FAILED, message: "a set" }),
  );
  strictEqual(callError.reason, "SERIALIZATION_FAILED");
  strictEqual(callError.code, Code.InvalidArgument);
  const raised = fromFailure(create(FailureSchema, { type: "ValueError", message: "bad", traceback: "tb", functionName: "f" }));
  ok(raised instanceof FunctionError);
  strictEqual(raised.functionName, "f");
  const stored = create(ValueSchema, {
    data: toBinary(FailureSchema, create(FailureSchema, { type: "cloudburst.errors.FUNCTION_NOT_FOUND", message: "gone" })),
    serializer: Serializer.FAILURE,
  });
  const runtime = fromFailure(failureOf(stored));
  ok(runtime instanceof CloudburstError);
  strictEqual(runtime.reason, "FUNCTION_NOT_FOUND");
});

test("the ping timeout is the default unless the environment sets it", () => {
  strictEqual(pingTimeoutMs({}), KEEPALIVE_TIMEOUT_MS);
  strictEqual(pingTimeoutMs({ [PING_TIMEOUT_ENV]: " " }), KEEPALIVE_TIMEOUT_MS);
  strictEqual(pingTimeoutMs({ [PING_TIMEOUT_ENV]: "30" }), 30_000);
  strictEqual(pingTimeoutMs({ [PING_TIMEOUT_ENV]: "0.5" }), 500);
  for (const raw of ["soon", "0", "-1", "86400", "NaN", "Infinity", "0x10"]) {
    throws(() => pingTimeoutMs({ [PING_TIMEOUT_ENV]: raw }), (err: unknown) => {
      ok(err instanceof CloudburstError);
      strictEqual(err.code, Code.InvalidArgument);
      ok(err.message.includes(PING_TIMEOUT_ENV), err.message);
      return true;
    });
  }
});

test("direct KVS access is on unless the environment turns it off", () => {
  for (const off of ["0", "false", " No ", "OFF"]) {
    strictEqual(directKvsFromEnvironment({ [DIRECT_KVS_ENV]: off }), false, off);
  }
  for (const on of [undefined, "", "1", "true", "yes"]) {
    strictEqual(directKvsFromEnvironment({ [DIRECT_KVS_ENV]: on }), true, String(on));
  }
});

test("only an unreachable service sends objects through the scheduler", () => {
  strictEqual(lostTransport(new ConnectError("connection refused", Code.Unavailable)), true);
  const answered = new ConnectError("no executor", Code.Unavailable, undefined, [
    { desc: ErrorInfoSchema, value: { reason: "NO_EXECUTOR", domain: "cloudburst.v1" } },
  ]);
  strictEqual(lostTransport(answered), false);
  strictEqual(lostTransport(new ConnectError("no such key", Code.NotFound)), false);
  strictEqual(lostTransport(new Error("not an RPC error")), false);
});
