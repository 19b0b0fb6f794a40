// What makes a retried KVS write the same write (docs/protocol.md, "Objects at the KVS itself"):
// its last-writer-wins lattice is stamped once, by the client, and each write and delete carries
// one random request id, sent again with every attempt. The same clock as the Python SDK's
// LwwClock and the Go client's.
import { randomBytes, randomUUID } from "node:crypto";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { LwwTimestampSchema } from "./gen/cloudburst/v1/lattice_pb.js";

/**
 * Makes the last-writer-wins timestamps of a client's writes: wall-clock nanoseconds order writes
 * across writers, a per-writer step keeps them strictly increasing when the clock stands still or
 * steps back, and the writer id (random, with the process id) breaks ties.
 */
export class LwwClock {
  readonly writerId: string;
  #last = 0n;

  constructor(writerId?: string) {
    this.writerId = writerId ?? `${randomBytes(8).toString("hex")}-${process.pid}`;
  }

  /** A timestamp greater than every one the clock made before. */
  now(): MessageInitShape<typeof LwwTimestampSchema> {
    const wall = BigInt(Date.now()) * 1_000_000n;
    this.#last = wall > this.#last ? wall : this.#last + 1n;
    return { timeNs: this.#last, writerId: this.writerId };
  }
}

/** A random id for one write or delete, sent with each of its attempts. */
export function newRequestId(): string {
  return randomUUID();
}
