// TLS settings of a connection, as the Python SDK takes them: a CA to trust, a bearer token or a
// client certificate and its key, the name the servers' certificates must carry. Settings not
// given as options come from the same environment variables (CLOUDBURST_TLS_*, CLOUDBURST_TOKEN),
// so a program written for an open server runs unchanged against a secured one.
import { readFileSync } from "node:fs";
import { X509Certificate, createPrivateKey } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import { CloudburstError } from "./errors.js";
import type { Environment } from "./transport.js";

/** The environment variables that fill the TLS settings not given as options. */
export const TLS_ENV = {
  ca: "CLOUDBURST_TLS_CA",
  cert: "CLOUDBURST_TLS_CERT",
  key: "CLOUDBURST_TLS_KEY",
  serverName: "CLOUDBURST_TLS_SERVER_NAME",
} as const;

/** The environment variable that gives the bearer token when the token option does not. */
export const TOKEN_ENV = "CLOUDBURST_TOKEN";

/** The TLS options of connect() (files are PEM paths). */
export interface TlsSettings {
  /** The CA bundle the servers' certificates must chain to; Node's roots when not given. */
  tlsCa?: string;
  /** A client certificate signed by the cluster's CA, to authenticate with. */
  tlsCert?: string;
  /** The key of tlsCert. */
  tlsKey?: string;
  /** Verify the servers' certificates against this name instead of the host dialled. */
  tlsServerName?: string;
  /**
   * A bearer token (from `cbgrpc token ROLE`), sent as `authorization: Bearer <token>` with every
   * call; its role decides what the client may do. It is sent only over TLS.
   */
  token?: string;
}

/** The settings read and checked: what Node's TLS takes, and where each came from. */
export interface Tls {
  /** PEM of the CA bundle; undefined: Node's roots. */
  ca?: Buffer;
  /** PEM of the client certificate. */
  cert?: Buffer;
  /** PEM of its key. */
  key?: Buffer;
  /** The name the servers' certificates must carry; undefined: the host dialled. */
  servername?: string;
  /** The client certificate's file, for messages. */
  certFile?: string;
  /** The CA bundle's file, for messages. */
  caFile?: string;
  /** The bearer token sent with every call. */
  token?: string;
}

/**
 * The TLS settings from options, else (for options not given or empty) from the environment;
 * undefined when no CA, certificate, key or token is set (then only an https:// address asks for
 * TLS, trusting Node's roots). A token alone asks for TLS too, as with the Python SDK. Throws a
 * CloudburstError (INVALID_ARGUMENT) when a file cannot be read or is not PEM, when a certificate
 * comes without its key (or a key without its certificate), or when the key does not match the
 * certificate; and one (UNAUTHENTICATED) when the certificate has expired or is not valid yet at
 * `now`, which servers would refuse in the TLS handshake.
 */
export function tlsSettings(
  options: TlsSettings,
  env: Environment = process.env,
  now: Date = new Date(),
): Tls | undefined {
  const pick = (given: string | undefined, variable: string): Setting | undefined => {
    const fromOption = (given ?? "").trim() !== "";
    const value = (fromOption ? given : env[variable]) ?? "";
    const origin = fromOption ? optionName(variable) : variable;
    return value.trim() === "" ? undefined : { value: value.trim(), origin };
  };
  const ca = pick(options.tlsCa, TLS_ENV.ca);
  const cert = pick(options.tlsCert, TLS_ENV.cert);
  const key = pick(options.tlsKey, TLS_ENV.key);
  const serverName = pick(options.tlsServerName, TLS_ENV.serverName);
  const token = pick(options.token, TOKEN_ENV);
  if (ca === undefined && cert === undefined && key === undefined && token === undefined) {
    return undefined; // a server name alone does not ask for TLS, as with the Python SDK
  }
  if ((cert === undefined) !== (key === undefined)) {
    const [given, missing] = cert === undefined ? [key, "tlsCert"] : [cert, "tlsKey"];
    throw invalid(
      `a client certificate needs its key: ${given?.origin} is set but ${missing} ` +
        `(or ${missing === "tlsCert" ? TLS_ENV.cert : TLS_ENV.key}) is not; give both or neither`,
    );
  }
  const tls: Tls = {};
  if (ca !== undefined) {
    tls.ca = read(ca);
    certificate(tls.ca, ca); // fails when the file holds no certificate
    tls.caFile = ca.value;
  }
  if (cert !== undefined && key !== undefined) {
    tls.cert = read(cert);
    tls.key = read(key);
    const x509 = certificate(tls.cert, cert);
    let privateKey;
    try {
      privateKey = createPrivateKey(tls.key);
    } catch (err) {
      throw invalid(`${key.value} (${key.origin}) is not a PEM private key: ${messageOf(err)}`);
    }
    if (!x509.checkPrivateKey(privateKey)) {
      throw invalid(
        `the key in ${key.value} (${key.origin}) does not match the certificate in ` +
          `${cert.value} (${cert.origin}): give the key the certificate was issued for`,
      );
    }
    tls.certFile = cert.value;
    const expired = validityProblem(x509, cert.value, now);
    if (expired !== "") {
      throw new CloudburstError(
        Code.Unauthenticated,
        "",
        `${expired}; servers refuse it in the TLS handshake: ${ADVICE}`,
      );
    }
  }
  if (serverName !== undefined) {
    tls.servername = serverName.value;
  }
  if (token !== undefined) {
    tls.token = token.value;
  }
  return tls;
}

/** What to do about a client certificate the servers refuse (as the Python SDK says it). */
const ADVICE =
  "use a client certificate issued by the cluster's CA and still valid " +
  "(`cbgrpc certs DIR --client ROLE` issues one), or a token";

/**
 * Why the certificate read from file is not valid at now (expired, or not valid yet), in the
 * Python SDK's words; "" when it is valid.
 */
export function validityProblem(cert: X509Certificate, file: string, now: Date = new Date()): string {
  const notAfter = new Date(cert.validTo);
  const notBefore = new Date(cert.validFrom);
  if (notAfter < now) {
    return `the client certificate ${file} expired on ${utcMinute(notAfter)} UTC`;
  }
  if (notBefore > now) {
    return `the client certificate ${file} is not valid before ${utcMinute(notBefore)} UTC`;
  }
  return "";
}

/** A time as "YYYY-MM-DD HH:MM" in UTC. */
function utcMinute(time: Date): string {
  return time.toISOString().slice(0, 16).replace("T", " ");
}

/** A setting's value and where it came from (an option or an environment variable). */
interface Setting {
  value: string;
  origin: string;
}

function optionName(variable: string): string {
  if (variable === TOKEN_ENV) {
    return "token";
  }
  const entry = Object.entries(TLS_ENV).find(([, name]) => name === variable);
  const key = entry?.[0] ?? "";
  return `tls${key.charAt(0).toUpperCase()}${key.slice(1)}`;
}

function read(setting: Setting): Buffer {
  try {
    return readFileSync(setting.value);
  } catch (err) {
    throw invalid(`cannot read TLS file ${setting.value} (${setting.origin}): ${messageOf(err)}`);
  }
}

function certificate(pem: Buffer, setting: Setting): X509Certificate {
  try {
    return new X509Certificate(pem);
  } catch (err) {
    throw invalid(`${setting.value} (${setting.origin}) is not a PEM certificate: ${messageOf(err)}`);
  }
}

function invalid(message: string): CloudburstError {
  return new CloudburstError(Code.InvalidArgument, "", message);
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Node's codes of the TLS alerts a server sends when it refuses the client's certificate. */
const REFUSAL_ALERTS = /^ERR_SSL_(SSLV3|TLSV1|TLSV13)_ALERT_(BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_EXPIRED|CERTIFICATE_REQUIRED|CERTIFICATE_UNKNOWN|HANDSHAKE_FAILURE|ACCESS_DENIED|DECRYPT_ERROR)$/;

/** Whether err (or an error it was caused by) is a TLS alert that refuses a client certificate. */
export function refusedCertificate(err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && REFUSAL_ALERTS.test(code)) {
      return true;
    }
  }
  return false;
}

/**
 * Why the servers may refuse the client certificate, as far as the client can tell: expired or
 * not yet valid, or not signed by the CA in tlsCa.
 */
export function certificateProblem(tls: Tls, now: Date = new Date()): string {
  if (tls.cert === undefined) {
    return "";
  }
  const cert = new X509Certificate(tls.cert);
  const notAfter = new Date(cert.validTo);
  const notBefore = new Date(cert.validFrom);
  if (notAfter < now) {
    return `it expired on ${utcMinute(notAfter)} UTC`;
  }
  if (notBefore > now) {
    return `it is not valid before ${utcMinute(notBefore)} UTC`;
  }
  if (tls.ca !== undefined) {
    const cas = splitPem(tls.ca).map((pem) => new X509Certificate(pem));
    if (!cas.some((ca) => cert.checkIssued(ca) && cert.verify(ca.publicKey))) {
      return `it is not signed by the CA in ${tls.caFile} (its issuer is ${oneLine(cert.issuer)})`;
    }
  }
  return "it is not signed by a CA the server trusts for clients";
}

function splitPem(pem: Buffer): string[] {
  return pem.toString("utf8").match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g) ?? [];
}

function oneLine(name: string): string {
  return name.split("\n").filter((part) => part !== "").join(", ");
}

/**
 * The error of a call whose TLS handshake the server ended because it refused the client's
 * certificate (refusal: the alert, seen on the connection during the call): UNAUTHENTICATED,
 * saying which certificate and why; other errors unchanged.
 */
export function certificateRefusal(
  err: unknown,
  tls: Tls | undefined,
  where: string,
  refusal: Error | undefined,
): unknown {
  const alert = refusedCertificate(err) ? err : refusal;
  if (tls?.cert === undefined || alert === undefined || !(err instanceof ConnectError)) {
    return err;
  }
  if (err.code !== Code.Canceled && err.code !== Code.Unavailable && err.code !== Code.Internal && err.code !== Code.Aborted) {
    return err; // an answer of the server
  }
  const cause = alert instanceof Error ? alert.message : String(alert);
  return new ConnectError(
    `the server at ${where} refused this client's certificate ${tls.certFile} in the TLS handshake: ` +
      `${certificateProblem(tls)}; ${ADVICE} (${cause})`,
    Code.Unauthenticated,
    undefined,
    undefined,
    err,
  );
}
