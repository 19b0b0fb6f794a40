// Lets the repository's tests drive this client against a real cluster one step at a time: it
// connects to the scheduler given as the first argument, then reads one JSON command per line on
// stdin and answers each with one JSON line on stdout.
//
//   node dist/test/driver.js ADDRESS [default|on|off]   (the directKvs option; default: unset)
//
// TLS settings and the token come from the environment (CLOUDBURST_TLS_*, CLOUDBURST_TOKEN), as
// the client reads them.
//
// Commands: {"op": "put", "key": K, "value": V}, {"op": "get", "key": K}, {"op": "delete", "key": K},
// {"op": "call", "name": FUNCTION, "args": [...], "timeout": SECONDS},
// {"op": "delete_function", "name": FUNCTION},
// {"op": "kvs_address"} and {"op": "wait_result", "key": K, "timeout": SECONDS}. An answer is
// {"ok": true, ...} or {"ok": false, "code": "Unavailable", "reason": "...", "message": "..."}.
// At the end of stdin the driver closes its client and exits.
import { createInterface } from "node:readline";
import { Code } from "@connectrpc/connect";
import { CloudburstError, connect, type CloudburstClient, type Json } from "../src/index.js";
import { fromRpcError } from "../src/errors.js";

interface Command {
  op: string;
  key?: string;
  value?: Json;
  name?: string;
  args?: Json[];
  timeout?: number;
}

type Answer = Record<string, Json | undefined>;

async function run(client: CloudburstClient, command: Command): Promise<Answer> {
  const options = { timeoutMs: (command.timeout ?? 60) * 1000 };
  const key = command.key ?? "";
  try {
    switch (command.op) {
      case "put":
        await client.put(key, command.value ?? null, options);
        return { ok: true };
      case "get": {
        const value = await client.get(key, options);
        return value === undefined ? { ok: true, found: false } : { ok: true, found: true, value: value as Json };
      }
      case "delete":
        return { ok: true, existed: await client.delete(key, options) };
      case "call":
        return { ok: true, value: (await client.callFunction(command.name ?? "", command.args ?? [], options)) as Json };
      case "delete_function":
        try {
          await client.scheduler.deleteFunction({ name: command.name ?? "" }, options);
        } catch (err) {
          throw fromRpcError(err);
        }
        return { ok: true };
      case "kvs_address":
        return { ok: true, address: client.kvsAddress ?? "" };
      case "wait_result":
        return { ok: true, value: (await client.waitResult(key, false, options)) as Json };
      default:
        return { ok: false, message: `unknown op ${JSON.stringify(command.op)}` };
    }
  } catch (err) {
    if (err instanceof CloudburstError) {
      return { ok: false, code: Code[err.code], reason: err.reason, message: err.message };
    }
    return { ok: false, code: "", message: String(err) };
  }
}

async function main(address: string, mode: string): Promise<void> {
  const modes: Record<string, boolean | undefined> = { default: undefined, on: true, off: false };
  if (!(mode in modes)) {
    throw new Error(`unknown mode ${JSON.stringify(mode)}`);
  }
  const directKvs = modes[mode];
  const client = connect(address, directKvs === undefined ? {} : { directKvs });
  for await (const line of createInterface({ input: process.stdin })) {
    const answer = await run(client, JSON.parse(line) as Command);
    process.stdout.write(`${JSON.stringify(answer)}\n`);
  }
  client.close();
}

const [address, mode = "default"] = process.argv.slice(2);
if (address === undefined) {
  process.stderr.write("usage: driver ADDRESS [default|on|off]\n");
  process.exit(2);
}
main(address, mode).catch((err: unknown) => {
  process.stderr.write(`driver: ${String(err)}\n`);
  process.exit(1);
});
