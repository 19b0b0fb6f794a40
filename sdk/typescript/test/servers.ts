// What the client's Node tests share: real servers on 127.0.0.1 port 0 (gRPC over HTTP/2 made with
// connect-node's own server adapter, and a peer that never answers), each closed when the tests of
// the file that started it end, a client as connect() makes it, and a deadline-bound wait.
import * as http2 from "node:http2";
import * as net from "node:net";
import type { AddressInfo, Socket } from "node:net";
import { ok } from "node:assert/strict";
import { after } from "node:test";
import type { ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { Serializer } from "../src/gen/cloudburst/v1/value_pb.js";
import { CloudburstClient } from "../src/index.js";
import { grpcTransport, transportOptions } from "../src/transport.js";

/** A server started by a test; closed once the file's tests end. */
export interface Server {
  /** host:port to dial. */
  address: string;
  /** Resets every connection it accepted (as the kernel does for a process that died). */
  resetAll: () => void;
  /** Closes every connection it accepted. */
  closeAll: () => void;
}

const closers: (() => Promise<void>)[] = [];
after(async () => {
  await Promise.all(closers.map((close) => close()));
});

/** Listens on 127.0.0.1:0; the server and its connections are closed once the file's tests end. */
async function listen(server: net.Server): Promise<{ address: string; sockets: Socket[] }> {
  const sockets: Socket[] = [];
  server.on("connection", (socket: Socket) => sockets.push(socket));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  closers.push(
    () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  );
  const { port } = server.address() as AddressInfo;
  return { address: `127.0.0.1:${port}`, sockets };
}

/** A real gRPC server with routes. */
export async function serve(routes: (router: ConnectRouter) => void): Promise<Server> {
  const { address, sockets } = await listen(http2.createServer(connectNodeAdapter({ routes })));
  return {
    address,
    resetAll: () => {
      for (const socket of sockets) socket.resetAndDestroy();
    },
    closeAll: () => {
      for (const socket of sockets) socket.destroy();
    },
  };
}

/**
 * A peer that accepts connections and never answers, as the kernel does for a stopped process
 * (SIGSTOP): accepted() counts its connections, closed() resolves once every one has ended.
 */
export async function hungPeer(): Promise<{ address: string; accepted: () => number; closed: () => Promise<void> }> {
  const { address, sockets } = await listen(
    net.createServer((socket) => {
      socket.resume(); // reads what comes (and sees the client's end), answers nothing
      socket.on("error", () => undefined); // the client gave it up
    }),
  );
  return {
    address,
    accepted: () => sockets.length,
    closed: () => until(() => sockets.every((s) => s.closed), "the client ended its connections"),
  };
}

/**
 * A client of address (taken for a scheduler) as connect() makes it; direct (the default): its KVS
 * ops may go to the KVS that address names; kvsStream: as in ClientOptions; env: what the client's
 * transports read (a ping timeout).
 */
export function clientOf(
  address: string,
  options: { direct?: boolean; kvsStream?: boolean; env?: Record<string, string> } = {},
): CloudburstClient {
  const shared = transportOptions("http", options.env ?? {});
  return new CloudburstClient(grpcTransport(`http://${address}`, shared), {
    address,
    ...(options.kvsStream === undefined ? {} : { kvsStream: options.kvsStream }),
    ...(options.direct ?? true ? { kvsTransport: (kvs: string) => grpcTransport(`http://${kvs}`, shared) } : {}),
  });
}

/** A JSON value as the client encodes it. */
export function jsonValue(value: unknown): { serializer: Serializer; data: Uint8Array } {
  return { serializer: Serializer.JSON, data: new TextEncoder().encode(JSON.stringify(value)) };
}

/** Resolves once check() holds; fails after a deadline. */
export async function until(check: () => boolean, what: string): Promise<void> {
  const deadline = performance.now() + 10_000;
  while (!check()) {
    ok(performance.now() < deadline, `not within 10 s: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
