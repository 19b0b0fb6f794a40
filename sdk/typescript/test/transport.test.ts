// Tests of the client's transport against real HTTP/2 gRPC servers on 127.0.0.1 port 0 (made with
// connect-node's own server adapter) and of its TLS settings on real files: a connection reset
// mid-call is UNAVAILABLE and sends a direct KVS call through the scheduler, a server's ABORTED
// stays ABORTED, and TLS files that cannot be used are refused with messages that name them.
// Run with `node --test dist/test/transport.test.js` after `tsc -p .` (make clients does both).
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import * as http2 from "node:http2";
import type { AddressInfo, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ok, strictEqual, throws } from "node:assert/strict";
import { after, test } from "node:test";
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter, createGrpcTransport } from "@connectrpc/connect-node";
import { KvsService } from "../src/gen/cloudburst/v1/kvs_service_pb.js";
import { Serializer } from "../src/gen/cloudburst/v1/value_pb.js";
import { CloudburstClient, CloudburstError, TLS_ENV, connect, tlsSettings } from "../src/index.js";
import { transportOptions } from "../src/transport.js";

/** A real gRPC server on 127.0.0.1:0; resetAll() resets every connection it accepted, closeAll() closes them. */
async function serve(routes: (router: ConnectRouter) => void): Promise<{
  address: string;
  resetAll: () => void;
  closeAll: () => void;
  close: () => Promise<void>;
}> {
  const sockets: Socket[] = [];
  const server = http2.createServer(connectNodeAdapter({ routes }));
  server.on("connection", (socket: Socket) => sockets.push(socket));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    address: `127.0.0.1:${port}`,
    resetAll: () => {
      for (const socket of sockets) socket.resetAndDestroy();
    },
    closeAll: () => {
      for (const socket of sockets) socket.destroy();
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

const servers: { close: () => Promise<void> }[] = [];
after(async () => {
  await Promise.all(servers.map((s) => s.close()));
});

function jsonValue(value: unknown): { serializer: Serializer; data: Uint8Array } {
  return { serializer: Serializer.JSON, data: new TextEncoder().encode(JSON.stringify(value)) };
}

/** A client of a scheduler at address whose KVS calls may go to the KVS it names, as connect() makes. */
function clientOf(address: string): CloudburstClient {
  const shared = transportOptions("http", {});
  return new CloudburstClient(createGrpcTransport({ baseUrl: `http://${address}`, ...shared }), {
    kvsTransport: (kvs) => createGrpcTransport({ baseUrl: `http://${kvs}`, ...shared }),
  });
}

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
  servers.push(kvs);
  resetKvs = kvs.resetAll;
  const scheduler = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({ kvsAddresses: [kvs.address] }),
      getValue: () => ({ found: true, lattice: { kind: { case: "lww", value: { value: jsonValue("from the scheduler") } } } }),
    }),
  );
  servers.push(scheduler);

  const client = clientOf(scheduler.address);
  strictEqual(await client.get("k", { timeoutMs: 30_000 }), "from the scheduler");
  strictEqual(reads, 1, "the read went to the KVS first");
  strictEqual(client.kvsAddress, undefined, "later reads go through the scheduler");

  // The generated stubs see the reset as UNAVAILABLE too, not connect-node's ABORTED.
  const direct = createGrpcTransport({ baseUrl: `http://${kvs.address}`, ...transportOptions("http", {}) });
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
  servers.push(server);
  closeAll = server.closeAll;
  const transport = createGrpcTransport({ baseUrl: `http://${server.address}`, ...transportOptions("http", {}) });
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
  servers.push(kvs);
  const scheduler = await serve((router) =>
    router.service(KvsService, {
      getLimits: () => ({ kvsAddresses: [kvs.address] }),
      getValue: () => ({ found: false }),
    }),
  );
  servers.push(scheduler);
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

/** PEM files made with openssl: a CA, a client certificate it signed, and an unrelated key. */
function pemFiles(): Record<"dir" | "ca" | "cert" | "key" | "otherKey", string> {
  const dir = mkdtempSync(join(tmpdir(), "cloudburst-tls-"));
  const run = (...args: string[]): void => {
    execFileSync("openssl", args, { cwd: dir, stdio: "ignore" });
  };
  const key = (name: string): void => run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name);
  key("ca-key.pem");
  run("req", "-x509", "-new", "-key", "ca-key.pem", "-subj", "/CN=test CA", "-days", "2", "-out", "ca.pem");
  key("client-key.pem");
  run("req", "-new", "-key", "client-key.pem", "-subj", "/CN=client", "-out", "client.csr");
  run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-days", "2", "-out", "client.pem");
  key("other-key.pem");
  return {
    dir,
    ca: join(dir, "ca.pem"),
    cert: join(dir, "client.pem"),
    key: join(dir, "client-key.pem"),
    otherKey: join(dir, "other-key.pem"),
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
      refused(/the key in .*other-key\.pem \(tlsKey\) does not match the certificate in .*client\.pem/),
    );
    throws(() => tlsSettings({ tlsCa: files.key }, {}), refused(/client-key\.pem \(tlsCa\) is not a PEM certificate/));
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
