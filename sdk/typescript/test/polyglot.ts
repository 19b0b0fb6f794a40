// Calls a DAG registered from Python, reads a stored result, writes and reads a KVS value and
// checks the typed error of an unknown DAG, against the scheduler given as the first argument.
// Prints one JSON object with what it saw; exits non-zero at the first check that fails. The
// repository's tests run it (compiled) against `cbgrpc serve`:
//
//   node dist/test/polyglot.js 127.0.0.1:7600 poly_pipeline
import { deepStrictEqual } from "node:assert/strict";
import { CloudburstError, connect, type Json } from "../src/index.js";

async function main(address: string, dag: string): Promise<void> {
  const client = connect(address);
  const options = { timeoutMs: 60_000 };
  const args = { poly_total: [{ label: "ts", items: [1, 2, 3] }] };
  const want = { label: "ts", total: 6, count: 3, language: "python" };

  // A DAG call with JSON arguments, answered directly.
  const direct = await client.callDag(dag, args, options);
  deepStrictEqual(direct, want, "direct callDag");

  // The same call stored, then read (and released) by its response key.
  const storedKey = await client.startDag(dag, args, options);
  const stored = await client.waitResult(storedKey, true, options);
  deepStrictEqual(stored, want, "stored result");

  // A KVS value written here and read back.
  const kvsKey = "polyglot-ts";
  const written: Json = { from: "ts", list: [1, "two", null, true] };
  await client.put(kvsKey, written, options);
  const kvsValue = await client.get(kvsKey, options);
  deepStrictEqual(kvsValue, written, "KVS round trip");

  // An unknown DAG is a typed error with its reason.
  let unknownDag = "";
  try {
    await client.callDag("no-such-dag", {}, options);
  } catch (err) {
    if (!(err instanceof CloudburstError)) throw err;
    unknownDag = err.reason;
  }
  deepStrictEqual(unknownDag, "DAG_NOT_FOUND", "unknown DAG");

  // A result JSON cannot carry is a typed error too, not a pickle.
  let unencodable = "";
  try {
    await client.callFunction("poly_set", [], options);
  } catch (err) {
    if (!(err instanceof CloudburstError)) throw err;
    unencodable = err.reason;
  }
  deepStrictEqual(unencodable, "SERIALIZATION_FAILED", "set result");

  process.stdout.write(
    JSON.stringify({
      direct,
      stored_key: storedKey,
      stored,
      kvs_key: kvsKey,
      kvs_value: kvsValue,
      unknown_dag_reason: unknownDag,
      unencodable_reason: unencodable,
    }) + "\n",
  );
}

const [address, dag] = process.argv.slice(2);
if (address === undefined || dag === undefined) {
  process.stderr.write("usage: polyglot ADDRESS DAG\n");
  process.exit(2);
}
main(address, dag).catch((err: unknown) => {
  process.stderr.write(`polyglot: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exit(1);
});
