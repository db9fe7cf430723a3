"""basic-auth: identify the consumer by HTTP Basic credentials (RFC 7617)."""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import os
import re
from base64 import b64decode, b64encode

from pydantic import ConfigDict, Field, field_validator

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import (
    Consumer,
    HookResult,
    Plugin,
    PluginConfig,
    PluginEnv,
    Response,
    register,
)

_JSON = ("Content-Type", "application/json")
_CHALLENGE = ("WWW-Authenticate", 'Basic realm="sluicegate"')
_MISSING = b'{"message":"Missing authorization in request"}'
_MALFORMED = b'{"message":"Invalid authorization in request"}'
_INVALID = b'{"message":"Invalid user authorization"}'

# Stored passwords may be pbkdf2-sha256 hashes in passlib's format,
# `$pbkdf2-sha256$<iterations>$<salt>$<hash>` (base64 without padding, '.' for '+'; plain
# '+' is accepted too), so hashes made by passlib work. PBKDF2 over scrypt: scrypt resists
# GPU cracking better, but PBKDF2 is in every hashlib build (scrypt needs an OpenSSL that
# has it, and FIPS builds refuse it), is FIPS approved, and at OWASP's iteration count is
# an accepted choice; a stored form other tools make and check is worth more here.
PBKDF2_SCHEME = "pbkdf2-sha256"
# OWASP Password Storage Cheat Sheet (2023): 600,000 iterations for PBKDF2-HMAC-SHA256.
PBKDF2_ITERATIONS = 600_000
# Above this one verification takes minutes: a typo, not a policy.
MAX_PBKDF2_ITERATIONS = 100_000_000
PBKDF2_SALT_BYTES = 16
_HASH_SHAPE = re.compile(r"\$([a-z0-9-]+)\$(.*)", re.DOTALL)
# crypt-style schemes someone may paste; refused by name rather than taken as a plain
# password that could never match. Other `$word$...` passwords stay plain.
_HASH_SCHEMES = re.compile(r"pbkdf2(-sha\d+)?|2[abxy]?|argon2(id|i|d)?|scrypt|[1356]|"
                           r"bcrypt(-sha256)?|sha(256|512)-crypt|md5-crypt")
# A correct password enters the cache only once per hashed consumer, so this bound is only
# reached with more hashed consumers than it; then the cache starts over.
VERIFIED_CACHE_SIZE = 65_536
# Wrong passwords remembered so a client retrying one costs no hash; a client trying many
# only ever flushes this one.
REJECTED_CACHE_SIZE = 4096


def _ab64_encode(data: bytes) -> str:
    return b64encode(data).decode().rstrip("=").replace("+", ".")


def _ab64_decode(text: str) -> bytes:
    text = text.replace(".", "+")
    return b64decode(text + "=" * (-len(text) % 4), validate=True)


class PasswordHash:
    """A parsed `$pbkdf2-sha256$...` stored password."""

    __slots__ = ("digest", "iterations", "salt")

    def __init__(self, iterations: int, salt: bytes, digest: bytes) -> None:
        self.iterations = iterations
        self.salt = salt
        self.digest = digest

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Raises ValueError with a reason that never quotes the stored value."""
        match = _HASH_SHAPE.fullmatch(text)
        if match is None or match.group(1) != PBKDF2_SCHEME:
            scheme = match.group(1) if match else "?"
            raise ValueError(f"unsupported hash scheme {scheme!r} (supported: "
                             f"{PBKDF2_SCHEME}; or give the plain password)")
        parts = match.group(2).split("$")
        if len(parts) != 3 or not parts[0].isdigit():
            raise ValueError(f"a {PBKDF2_SCHEME} hash reads $pbkdf2-sha256$<iterations>$<salt>"
                             "$<hash> (make one with `sluicegate hash-secret`)")
        iterations = int(parts[0])
        if not 1 <= iterations <= MAX_PBKDF2_ITERATIONS:
            raise ValueError(f"{PBKDF2_SCHEME} iterations must be 1 to {MAX_PBKDF2_ITERATIONS}")
        try:
            salt, digest = _ab64_decode(parts[1]), _ab64_decode(parts[2])
        except (binascii.Error, ValueError):
            raise ValueError(f"{PBKDF2_SCHEME} salt and hash must be base64") from None
        if not salt or not 16 <= len(digest) <= 64:
            raise ValueError(f"a {PBKDF2_SCHEME} hash needs a salt and a 16 to 64 byte hash")
        return cls(iterations, salt, digest)

    def verify(self, password: bytes) -> bool:
        """The slow part (runs in a thread: hashlib releases the GIL while hashing)."""
        derived = hashlib.pbkdf2_hmac("sha256", password, self.salt, self.iterations,
                                      len(self.digest))
        return hmac.compare_digest(derived, self.digest)


def is_hashed(stored: str) -> bool:
    """Does a configured password look like a hash (of some crypt scheme)?"""
    match = _HASH_SHAPE.fullmatch(stored) if stored.startswith("$") else None
    return match is not None and _HASH_SCHEMES.fullmatch(match.group(1)) is not None


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS,
                  salt: bytes | None = None) -> str:
    """The stored form of a password (`sluicegate hash-secret`)."""
    salt = os.urandom(PBKDF2_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"${PBKDF2_SCHEME}${iterations}${_ab64_encode(salt)}${_ab64_encode(digest)}"


class BasicAuthConfig(PluginConfig):
    """basic-auth options of a route."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    hide_credentials: bool = False
    """Remove the Authorization header before proxying, so the upstream never sees it."""


class BasicAuthConsumer(PluginConfig):
    """A consumer's basic-auth credential."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    username: str = Field(min_length=1, pattern=r"^[^:]+$")
    """User name the client sends; unique among consumers; may not contain ':'."""
    password: str = Field(min_length=1, repr=False)
    """Password the client sends, or better its hash: `$pbkdf2-sha256$<iterations>$<salt>
    $<hash>` as `sluicegate hash-secret` prints it (passlib's pbkdf2_sha256 format)."""

    @field_validator("password")
    @classmethod
    def _stored_form(cls, value: str) -> str:
        if is_hashed(value):
            PasswordHash.parse(value)  # raises ValueError with the reason
        return value


@register
class BasicAuth(Plugin):
    """Answers 401 unless the request's `Authorization: Basic` header holds a consumer's
    username and password, and identifies that consumer.

    Hashed passwords: a pbkdf2-sha256 hash costs hundreds of milliseconds by design, far
    too slow for every request. The first request with a credential hashes it in a thread
    (the event loop keeps serving); after that, the credential is recognised by a fast keyed
    digest (BLAKE2b, a random key per config version) kept in memory: successful ones in a
    cache bounded by VERIFIED_CACHE_SIZE, wrong ones in a smaller one, both emptied when the
    config changes. Concurrent requests with the same new credential share one hash. An
    unknown username is refused at once, without hashing."""

    name = "basic-auth"
    priority = 2520
    schema = BasicAuthConfig
    consumer_unique_field = "username"
    consumer_schema = BasicAuthConsumer

    def __init__(self, conf: BasicAuthConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.hide_credentials = conf.hide_credentials
        self.users: dict[bytes, tuple[Consumer, bytes | PasswordHash]] = {}
        for consumer in env.consumers.values():
            credential = consumer.plugin_confs.get(self.name)
            if credential is not None:
                stored = credential.password
                expected = PasswordHash.parse(stored) if is_hashed(stored) else stored.encode()
                self.users[credential.username.encode()] = (consumer, expected)
        self.cache_key = os.urandom(32)
        self.verified: set[bytes] = set()
        self.rejected: set[bytes] = set()
        self.verifying: dict[bytes, asyncio.Future[bool]] = {}

    def access(self, ctx: RequestContext) -> HookResult:
        header = ctx.get_header("authorization")
        if header is None:
            return Response(401, _MISSING, [_JSON, _CHALLENGE])
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return Response(401, _MALFORMED, [_JSON])
        try:
            decoded = b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return Response(401, _MALFORMED, [_JSON])
        username, sep, password = decoded.partition(b":")
        if not sep:
            return Response(401, _MALFORMED, [_JSON])
        entry = self.users.get(username)
        if entry is None:
            # Spend the same comparison so an unknown user does not answer faster.
            hmac.compare_digest(password, password)
            return Response(401, _INVALID, [_JSON])
        consumer, expected = entry
        if type(expected) is bytes:
            if not hmac.compare_digest(password, expected):
                return Response(401, _INVALID, [_JSON])
            return self._admit(ctx, consumer)
        token = hashlib.blake2b(decoded, key=self.cache_key, digest_size=16).digest()
        if token in self.verified:
            return self._admit(ctx, consumer)
        if token in self.rejected:
            return Response(401, _INVALID, [_JSON])
        return self._verify_later(ctx, consumer, expected, password, token)

    async def _verify_later(self, ctx: RequestContext, consumer: Consumer,
                            expected: PasswordHash, password: bytes, token: bytes
                            ) -> Response | None:
        future = self.verifying.get(token)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(None, expected.verify,
                                                                password)
            self.verifying[token] = future
            future.add_done_callback(lambda done: self._remember(token, done))
        # Shielded: a client that goes away must not cancel others waiting on this hash.
        if not await asyncio.shield(future):
            return Response(401, _INVALID, [_JSON])
        return self._admit(ctx, consumer)

    def _remember(self, token: bytes, done: asyncio.Future[bool]) -> None:
        self.verifying.pop(token, None)
        if done.cancelled() or done.exception() is not None:
            return
        cache, limit = ((self.verified, VERIFIED_CACHE_SIZE) if done.result()
                        else (self.rejected, REJECTED_CACHE_SIZE))
        if len(cache) >= limit:
            cache.clear()
        cache.add(token)

    def _admit(self, ctx: RequestContext, consumer: Consumer) -> None:
        ctx.consumer = consumer
        ctx.consumer_name = consumer.username
        if self.hide_credentials:
            ctx.remove_header("authorization")
        return None
