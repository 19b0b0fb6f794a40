// Tests of the client's transport against real HTTP/2 gRPC servers on 127.0.0.1 port 0 (made with
// connect-node's own server adapter) and of its TLS settings on real files: a connection reset
// mid-call is UNAVAILABLE and sends a direct KVS call through the scheduler, a server's ABORTED
// stays ABORTED, TLS files that cannot be used are refused with messages that name them, a
// certificate out of its validity dates is refused before connecting, and a token goes with every
// call over TLS.
//
// The certificates come from `cbgrpc certs DIR --client admin` (Python's `cryptography`, no
// openssl): CLOUDBURST_TEST_CERTS names DIR. Run with
// `CLOUDBURST_TEST_CERTS=DIR node --test dist/test/transport.test.js` after `tsc -p .`;
// `make clients` does all three.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import * as http2 from "node:http2";
import type { AddressInfo, Socket } from "node:net";
import { X509Certificate } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ok, strictEqual, throws } from "node:assert/strict";
import { test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { KvsService } from "../src/gen/cloudburst/v1/kvs_service_pb.js";
import { CloudburstClient, CloudburstError, TLS_ENV, TOKEN_ENV, connect, tlsSettings } from "../src/index.js";
import { certificateProblem } from "../src/tls.js";
import { PING_TIMEOUT_ENV, PROTOCOL_VERSION, grpcTransport, transportOptions } from "../src/transport.js";
import { clientOf, hungPeer, jsonValue, serve } from "./servers.js";

test("a connection reset mid-call is UNAVAILABLE and a direct KVS read falls back", async () => {
  let resetKvs = (): void => undefined;
  let reads = 0;
  const kvs = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({}),
      // The KVS dies while it holds the read: the kernel resets its connections.
      getValue: (_request, context) => {
        reads += 1;
        resetKvs();
        return new Promise((_resolve, reject) => {
          context.signal.addEventListener("abort", () => reject(new ConnectError("gone", Code.Canceled)));
        });
      },
    }),
  );
  resetKvs = kvs.resetAll;
  const scheduler = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({ kvsAddresses: [kvs.address] }),
      getValue: () => ({ found: true, lattice: { kind: { case: "lww", value: { value: jsonValue("from the scheduler") } } } }),
    }),
  );

  const client = clientOf(scheduler.address);
  strictEqual(await client.get("k", { timeoutMs: 30_000 }), "from the scheduler");
  strictEqual(reads, 1, "the read went to the KVS first");
  strictEqual(client.kvsAddress, undefined, "later reads go through the scheduler");

  // The generated stubs see the reset as UNAVAILABLE too, not connect-node's ABORTED.
  const direct = grpcTransport(`http://${kvs.address}`, transportOptions("http", {}));
  const stub = new CloudburstClient(direct, { directKvs: false });
  await stub.kvs.getValue({ key: "k" }, { timeoutMs: 30_000 }).then(
    () => ok(false, "the read answered"),
    (err: unknown) => {
      ok(err instanceof ConnectError, String(err));
      strictEqual(err.code, Code.Unavailable, err.message);
      ok(err.message.includes("reset"), err.message);
    },
  );
});

test("a connection closed mid-call is UNAVAILABLE unless the caller cancelled the call", async () => {
  let closeAll = (): void => undefined;
  const server = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({}),
      getValue: (request, context) => {
        if (request.key === "close") closeAll();
        return new Promise((_resolve, reject) => {
          context.signal.addEventListener("abort", () => reject(new ConnectError("gone", Code.Canceled)));
        });
      },
    }),
  );
  closeAll = server.closeAll;
  const transport = grpcTransport(`http://${server.address}`, transportOptions("http", {}));
  const stub = new CloudburstClient(transport, { directKvs: false }).kvs;
  await stub.getValue({ key: "close" }, { timeoutMs: 30_000 }).then(
    () => ok(false, "the read answered"),
    (err: unknown) => {
      ok(err instanceof ConnectError, String(err));
      strictEqual(err.code, Code.Unavailable, err.message);
    },
  );
  const caller = new AbortController();
  const cancelled = stub.getValue({ key: "wait" }, { timeoutMs: 30_000, signal: caller.signal });
  caller.abort();
  await cancelled.then(
    () => ok(false, "the read answered"),
    (err: unknown) => {
      ok(err instanceof ConnectError, String(err));
      strictEqual(err.code, Code.Canceled, err.message);
    },
  );
});

test("a server's own ABORTED stays ABORTED and does not fall back", async () => {
  const kvs = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({}),
      getValue: () => {
        throw new ConnectError("a conflicting write", Code.Aborted);
      },
    }),
  );
  const scheduler = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({ kvsAddresses: [kvs.address] }),
      getValue: () => ({ found: false }),
    }),
  );
  const client = clientOf(scheduler.address);
  await client.get("k", { timeoutMs: 30_000 }).then(
    () => ok(false, "the read answered"),
    (err: unknown) => {
      ok(err instanceof CloudburstError, String(err));
      strictEqual(err.code, Code.Aborted);
      ok(err.message.includes("a conflicting write"), err.message);
    },
  );
  strictEqual(client.kvsAddress, kvs.address, "the KVS is still used directly");
});

test("calls to a hung peer fail with UNAVAILABLE when pings go unanswered, and nothing else throws", async () => {
  const peer = await hungPeer();
  const client = clientOf(peer.address, { env: { [PING_TIMEOUT_ENV]: "0.3" } });
  // Direct access on: each op asks where the KVS is (GetLimits), fails, and is sent through the
  // peer again: two calls in a row on connections whose pings go unanswered.
  for (const op of [() => client.put("k", 1, { timeoutMs: 60_000 }), () => client.get("k", { timeoutMs: 60_000 })]) {
    const started = performance.now();
    await op().then(
      () => ok(false, "the hung peer answered"),
      (err: unknown) => {
        ok(err instanceof CloudburstError, String(err));
        strictEqual(err.code, Code.Unavailable, err.message);
      },
    );
    ok(performance.now() - started < 30_000, "keepalive, not the deadline, ended the call");
  }
  ok(peer.accepted() >= 2, `the calls used ${peer.accepted()} connections`);
  // Every connection the client gave up has ended: an error of one would have come by now.
  await peer.closed();
  await new Promise((resolve) => setImmediate(resolve));
});

/** The environment variable naming the directory of `cbgrpc certs DIR --client admin`. */
const CERTS_ENV = "CLOUDBURST_TEST_CERTS";

/**
 * PEM files of `cbgrpc certs`: a CA, a client certificate it signed, an unrelated key, and the
 * certificate of `cbgrpc serve` (valid for 127.0.0.1); dir is a fresh directory for other files.
 */
function pemFiles(): Record<"dir" | "ca" | "cert" | "key" | "otherKey" | "serverCert" | "serverKey", string> {
  const certs = process.env[CERTS_ENV] ?? "";
  if (certs === "") {
    throw new Error(`${CERTS_ENV} must name a directory made by \`cbgrpc certs DIR --client admin\` (make clients does it)`);
  }
  return {
    dir: mkdtempSync(join(tmpdir(), "cloudburst-tls-")),
    ca: join(certs, "ca.pem"),
    cert: join(certs, "client-admin.pem"),
    key: join(certs, "client-admin-key.pem"),
    otherKey: join(certs, "kvs-key.pem"),
    serverCert: join(certs, "serve.pem"),
    serverKey: join(certs, "serve-key.pem"),
  };
}

function refused(pattern: RegExp): (err: unknown) => boolean {
  return (err: unknown) => {
    ok(err instanceof CloudburstError, String(err));
    strictEqual(err.code, Code.InvalidArgument);
    ok(pattern.test(err.message), err.message);
    return true;
  };
}

test("TLS settings come from options, else from the environment, and unusable files are refused", () => {
  const files = pemFiles();
  try {
    strictEqual(tlsSettings({}, {}), undefined);
    strictEqual(tlsSettings({ tlsServerName: "scheduler.example" }, {}), undefined, "a name alone is plaintext");
    strictEqual(tlsSettings({ tlsCa: files.ca, tlsServerName: "scheduler.example" }, {})?.servername, "scheduler.example");
    // An empty option leaves the variable in force.
    strictEqual(tlsSettings({ tlsCa: "" }, { [TLS_ENV.ca]: files.ca })?.caFile, files.ca);
    const fromEnv = tlsSettings({}, { [TLS_ENV.ca]: files.ca, [TLS_ENV.cert]: files.cert, [TLS_ENV.key]: files.key });
    ok(fromEnv?.ca !== undefined && fromEnv.cert !== undefined && fromEnv.key !== undefined);
    strictEqual(fromEnv.certFile, files.cert);
    // An option wins over its variable.
    throws(
      () => tlsSettings({ tlsCert: join(files.dir, "missing.pem") }, { [TLS_ENV.cert]: files.cert, [TLS_ENV.key]: files.key }),
      refused(/cannot read TLS file .*missing\.pem \(tlsCert\)/),
    );
    throws(
      () => tlsSettings({}, { [TLS_ENV.ca]: join(files.dir, "gone.pem") }),
      refused(new RegExp(`cannot read TLS file .*gone\\.pem \\(${TLS_ENV.ca}\\)`)),
    );
    throws(() => tlsSettings({ tlsCert: files.cert }, {}), refused(/needs its key: tlsCert is set but tlsKey/));
    throws(() => tlsSettings({}, { [TLS_ENV.key]: files.key }), refused(/needs its key: CLOUDBURST_TLS_KEY is set/));
    throws(
      () => tlsSettings({ tlsCert: files.cert, tlsKey: files.otherKey }, {}),
      refused(/the key in .*kvs-key\.pem \(tlsKey\) does not match the certificate in .*client-admin\.pem/),
    );
    throws(() => tlsSettings({ tlsCa: files.key }, {}), refused(/client-admin-key\.pem \(tlsCa\) is not a PEM certificate/));
    writeFileSync(join(files.dir, "empty.pem"), "");
    throws(() => tlsSettings({ tlsCa: join(files.dir, "empty.pem") }, {}), refused(/empty\.pem \(tlsCa\) is not a PEM certificate/));
    throws(() => tlsSettings({ tlsCert: files.cert, tlsKey: files.ca }, {}), refused(/ca\.pem \(tlsKey\) is not a PEM private key/));
    // connect() refuses them at once, and TLS settings on an http:// address.
    throws(() => connect("127.0.0.1:1", { tlsCert: files.cert, tlsKey: files.otherKey }), refused(/does not match/));
    throws(() => connect("http://127.0.0.1:1", { tlsCa: files.ca }), refused(/plaintext address/));
  } finally {
    rmSync(files.dir, { recursive: true, force: true });
  }
});

test("a client certificate out of its validity dates is refused before connecting, saying when", () => {
  const files = pemFiles();
  try {
    const validTo = new Date(new X509Certificate(readFileSync(files.cert)).validTo);
    const later = new Date(validTo.getTime() + 60_000);
    const expired = (pattern: RegExp) => (err: unknown) => {
      ok(err instanceof CloudburstError, String(err));
      strictEqual(err.code, Code.Unauthenticated);
      ok(pattern.test(err.message), err.message);
      ok(err.message.includes("servers refuse it in the TLS handshake"), err.message);
      return true;
    };
    const day = validTo.toISOString().slice(0, 10);
    throws(
      () => tlsSettings({ tlsCert: files.cert, tlsKey: files.key }, {}, later),
      expired(new RegExp(`the client certificate .*client-admin\\.pem expired on ${day} \\d\\d:\\d\\d UTC`)),
    );
    throws(
      () => tlsSettings({}, { [TLS_ENV.cert]: files.cert, [TLS_ENV.key]: files.key }, new Date(0)),
      expired(/the client certificate .*client-admin\.pem is not valid before \d{4}-\d\d-\d\d \d\d:\d\d UTC/),
    );
    ok(tlsSettings({ tlsCert: files.cert, tlsKey: files.key }, {})?.cert !== undefined, "valid now");
    // A certificate that expires while the client runs is refused in the handshake: the
    // explanation gives its dates as above.
    const tls = tlsSettings({ tlsCert: files.cert, tlsKey: files.key }, {});
    ok(tls !== undefined);
    const problem = certificateProblem(tls, later);
    ok(new RegExp(`^it expired on ${day} \\d\\d:\\d\\d UTC$`).test(problem), problem);
    const early = certificateProblem(tls, new Date(0));
    ok(/^it is not valid before \d{4}-\d\d-\d\d \d\d:\d\d UTC$/.test(early), early);
  } finally {
    rmSync(files.dir, { recursive: true, force: true });
  }
});

test("a token comes from the option, else CLOUDBURST_TOKEN, asks for TLS, and goes with every call", async () => {
  const files = pemFiles();
  const seen: string[] = [];
  const server = http2.createSecureServer(
    {
      cert: readFileSync(files.serverCert),
      key: readFileSync(files.serverKey),
      allowHTTP1: false,
    },
    connectNodeAdapter({
      routes: (router) =>
        router.service(KvsService, {
          getLimits: (_request, context) => {
            seen.push(context.requestHeader.get("authorization") ?? "");
            return {};
          },
          getValue: (_request, context) => {
            seen.push(context.requestHeader.get("authorization") ?? "");
            return { found: false };
          },
        }),
    }),
  );
  const sockets: Socket[] = [];
  server.on("secureConnection", (socket: Socket) => sockets.push(socket));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  const saved = process.env[TOKEN_ENV];
  try {
    strictEqual(tlsSettings({}, {}), undefined);
    const alone = tlsSettings({}, { [TOKEN_ENV]: " cbt_env " });
    strictEqual(alone?.token, "cbt_env", "a token alone asks for TLS (Node's roots)");
    strictEqual(alone.ca, undefined);
    strictEqual(tlsSettings({ token: "cbt_option" }, { [TOKEN_ENV]: "cbt_env" })?.token, "cbt_option");
    throws(
      () => connect("http://127.0.0.1:1", { token: "cbt_secret" }),
      (err: unknown) => {
        ok(err instanceof CloudburstError, String(err));
        strictEqual(err.code, Code.InvalidArgument);
        ok(err.message.includes("a token is sent only over TLS"), err.message);
        ok(!err.message.includes("cbt_secret"), "the message does not show the token");
        return true;
      },
    );

    const byOption = connect(address, { tlsCa: files.ca, token: "cbt_option", directKvs: false });
    strictEqual(await byOption.get("k", { timeoutMs: 30_000 }), undefined);
    await byOption.kvs.getLimits({}, { timeoutMs: 30_000 });
    process.env[TOKEN_ENV] = "cbt_env";
    const byEnvironment = connect(address, { tlsCa: files.ca });
    strictEqual(await byEnvironment.get("k", { timeoutMs: 30_000 }), undefined);
    delete process.env[TOKEN_ENV];
    const without = connect(address, { tlsCa: files.ca, directKvs: false });
    strictEqual(await without.get("k", { timeoutMs: 30_000 }), undefined);
    // byEnvironment asked the server for its KVS first (GetLimits), with the token too.
    strictEqual(JSON.stringify(seen), JSON.stringify([
      "Bearer cbt_option",
      "Bearer cbt_option",
      "Bearer cbt_env",
      "Bearer cbt_env",
      "",
    ]));
  } finally {
    if (saved === undefined) delete process.env[TOKEN_ENV];
    else process.env[TOKEN_ENV] = saved;
    for (const socket of sockets) socket.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    rmSync(files.dir, { recursive: true, force: true });
  }
});

test("every call names the protocol version in its user agent", async () => {
  const agents: string[] = [];
  const server = await serve((router) =>
    router.service(KvsService, {
      getLimits: (_request, context) => {
        agents.push(context.requestHeader.get("user-agent") ?? "");
        return {};
      },
    }),
  );
  await clientOf(server.address).kvs.getLimits({}, { timeoutMs: 30_000 });
  strictEqual(agents.length, 1);
  const agent = agents[0] ?? "";
  ok(agent.startsWith(`cloudburst-protocol/${PROTOCOL_VERSION} connect-es/`), agent);
});
