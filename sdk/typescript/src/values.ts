// Conversion between native values and cloudburst.v1.Value (docs/protocol.md has the table).
import { create, fromBinary, type MessageInitShape } from "@bufbuild/protobuf";
import {
  FailureSchema,
  Serializer,
  ValueSchema,
  type Failure,
  type Value,
} from "./gen/cloudburst/v1/value_pb.js";

/** A value JSON can carry: what functions called from TypeScript take and return. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A native value: a string (sent as STRING), bytes (BYTES) or anything JSON can carry (JSON). */
export type NativeValue = Json | Uint8Array;

/** The serializers this client reads results in, in order of preference. */
export const ACCEPTED: Serializer[] = [Serializer.JSON, Serializer.STRING, Serializer.BYTES];

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder("utf-8", { fatal: true });

/** Encode a native value: a string as STRING, a Uint8Array as BYTES, anything else as JSON. */
export function encode(value: NativeValue): MessageInitShape<typeof ValueSchema> {
  if (typeof value === "string") {
    return { data: utf8.encode(value), serializer: Serializer.STRING };
  }
  if (value instanceof Uint8Array) {
    return { data: value, serializer: Serializer.BYTES };
  }
  const text = JSON.stringify(value);
  if (text === undefined) {
    throw new TypeError(`cannot encode ${typeof value} as JSON`);
  }
  return { data: utf8.encode(text), serializer: Serializer.JSON };
}

/** Decode a Value into a native value; a stored failure is returned as a Failure message. */
export function decode(value: Value): NativeValue {
  switch (value.serializer) {
    case Serializer.JSON:
      return JSON.parse(fromUtf8.decode(value.data)) as Json;
    case Serializer.STRING:
      return fromUtf8.decode(value.data);
    case Serializer.BYTES:
      return value.data;
    default:
      throw new TypeError(
        `cannot read a ${Serializer[value.serializer] ?? value.serializer} value in TypeScript; ` +
          "return JSON-representable values from functions called from other languages",
      );
  }
}

/** Whether a Value is a stored failure; read it with failureOf. */
export function isFailure(value: Value): boolean {
  return value.serializer === Serializer.FAILURE;
}

/** The Failure message a FAILURE value carries. */
export function failureOf(value: Value): Failure {
  return fromBinary(FailureSchema, value.data);
}

/** A Value message built from a native value (for the generated stubs). */
export function toValue(value: NativeValue): Value {
  return create(ValueSchema, encode(value));
}
