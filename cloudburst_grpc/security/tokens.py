"""Bearer tokens: stored as salted hashes, several at once, re-read when their file changes.

A tokens file has one token per line, ``ROLE HASH [NAME]``, with ``#``
comments; ``cbgrpc token ROLE`` prints a new token and its line. The hash is
PBKDF2-HMAC-SHA256 with a random salt (``pbkdf2-sha256$ITERATIONS$SALT$DIGEST``,
base64), compared in constant time; the clear token is never stored. A
token that matched once is remembered by its SHA-256 (not the token itself)
until the file changes, so later calls cost one SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cloudburst_grpc.security.identity import CLIENT_ROLES

logger = logging.getLogger(__name__)

#: PBKDF2 iterations of new hashes.
ITERATIONS = 200_000
#: Seconds between checks of the tokens file for changes (0: a stat at every call).
RELOAD_CHECK_SECONDS = 0.0
_SCHEME = "pbkdf2-sha256"


class TokenFileError(ValueError):
    """The tokens file is missing or has a malformed line."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_token(token: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """The stored form of ``token``: ``pbkdf2-sha256$ITERATIONS$SALT$DIGEST``."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", token.encode(), salt, iterations)
    return f"{_SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def verify_token(token: str, stored: str) -> bool:
    """Whether ``token`` matches the stored hash (constant-time comparison)."""
    scheme, iterations, salt, digest = stored.split("$")
    if scheme != _SCHEME:
        return False
    computed = hashlib.pbkdf2_hmac("sha256", token.encode(), _unb64(salt), int(iterations))
    return hmac.compare_digest(computed, _unb64(digest))


def new_token() -> str:
    """A new random token (256 bits)."""
    return "cbt_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TokenEntry:
    """One configured token: its role, stored hash and a name for logs."""

    role: str
    hashed: str
    name: str


def parse_tokens(text: str, source: str) -> list[TokenEntry]:
    """Parse a tokens file.

    Raises:
        TokenFileError: A line is malformed; the message names the line (never its hash).
    """
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3):
            raise TokenFileError(f"{source}:{number}: expected 'ROLE HASH [NAME]'")
        role, hashed = parts[0], parts[1]
        if role not in CLIENT_ROLES:
            raise TokenFileError(
                f"{source}:{number}: unknown role {role!r}; known: {', '.join(CLIENT_ROLES)}"
            )
        pieces = hashed.split("$")
        if len(pieces) != 4 or pieces[0] != _SCHEME or not pieces[1].isdigit():
            raise TokenFileError(
                f"{source}:{number}: not a token hash (make one with `cbgrpc token {role}`)"
            )
        name = parts[2] if len(parts) == 3 else f"line {number}"
        entries.append(TokenEntry(role, hashed, name))
    return entries


class TokenStore:
    """The configured tokens, re-read when the file changes (no restart needed)."""

    def __init__(self, path: Path, check_seconds: float = RELOAD_CHECK_SECONDS) -> None:
        """Read the file once.

        Raises:
            TokenFileError: The file is missing or malformed.
        """
        self.path = Path(path)
        self._check_seconds = check_seconds
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._stamp = self._stat()
        self._entries = self._read()
        self._known: dict[bytes, TokenEntry] = {}

    def _stat(self) -> tuple[int, int]:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise TokenFileError(f"cannot read the tokens file: {exc}") from None
        return stat.st_mtime_ns, stat.st_size

    def _read(self) -> list[TokenEntry]:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise TokenFileError(f"cannot read the tokens file: {exc}") from None
        return parse_tokens(text, str(self.path))

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + self._check_seconds
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._entries = self._read()
                    self._stamp = stamp
                    self._known = {}
                    logger.info("loaded %d tokens from %s", len(self._entries), self.path)
            except TokenFileError as exc:
                logger.warning("keeping the current tokens: %s", exc)

    def cached(self, token: str) -> TokenEntry | None:
        """The entry of a token that matched before (cheap), or None."""
        self._refresh()
        return self._known.get(hashlib.sha256(token.encode()).digest())

    def lookup(self, token: str) -> TokenEntry | None:
        """The entry ``token`` matches, or None (slow: run it off the event loop)."""
        known = self.cached(token)
        if known is not None:
            return known
        entries = self._entries
        for entry in entries:
            if verify_token(token, entry.hashed):
                if entries is self._entries:
                    self._known[hashlib.sha256(token.encode()).digest()] = entry
                return entry
        return None
