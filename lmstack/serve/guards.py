"""What stands between a client and the engine: API keys, per-key rate limits, body size, deadlines and
client disconnects. Each refusal is an `APIError` in OpenAI's shape (401, 413, 429, 504)."""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request

from lmstack.serve.protocol import APIError

T = TypeVar("T")


# --- API keys -----------------------------------------------------------------------------------------------
class Authenticator:
    """`Authorization: Bearer KEY` against a fixed set of keys; with no keys configured, everyone is in."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def client(self, request: Request) -> str:
        """The caller's identity for rate limits: its key, or its address when keys are off."""
        if not self._keys:
            return f"ip:{request.client.host if request.client else '?'}"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        given = token.encode()
        if not any(hmac.compare_digest(given, key) for key in self._keys):  # constant time per key
            shown = f"{token[:3]}***{token[-2:]}" if len(token) > 8 else "***"
            raise APIError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
        return f"key:{token}"


# --- rate limits --------------------------------------------------------------------------------------------
@dataclass
class TokenBucket:
    capacity: float
    rate: float  # refill per second
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, amount: float) -> float:
        """Seconds until `amount` is available (0: now)."""
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate


class RateLimiter:
    """Per client: requests per minute and tokens per minute, each a token bucket holding one minute's
    worth. A request is charged its prompt tokens plus the completion tokens it may generate (as OpenAI
    estimates); `refund` gives back what it did not use. A refused request is charged nothing."""

    MAX_CLIENTS = 10_000

    def __init__(
        self,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm, self.tpm, self._clock = requests_per_minute, tokens_per_minute, clock
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    def acquire(self, client: str, tokens: int) -> None:
        if not self.rpm and not self.tpm:
            return
        if self.tpm and tokens > self.tpm:
            raise APIError(
                429,
                f"Request too large: it may use {tokens} tokens (prompt + max_tokens x n) but the limit is "
                f"{self.tpm} tokens per minute. Lower max_tokens or shorten the prompt.",
                type="tokens",
                code="rate_limit_exceeded",
            )
        requests, token_bucket = self._get(client)
        candidates = [(requests, 1, "requests", self.rpm), (token_bucket, tokens, "tokens", self.tpm)]
        checks = [(b, amount, kind, limit) for b, amount, kind, limit in candidates if b is not None]
        for bucket, amount, kind, limit in checks:
            wait = bucket.wait(amount)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                raise APIError(
                    429,
                    f"Rate limit reached for {kind}: limit {limit} per minute. "
                    f"Please try again in {wait:.1f}s.",
                    type=kind,
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry)},
                )
        for bucket, amount, _, _ in checks:
            bucket.level -= amount

    def refund(self, client: str, tokens: int) -> None:
        """Give back tokens charged but not used; a negative refund charges usage known only afterwards."""
        bucket = self._buckets.get(client, (None, None))[1]
        if bucket is not None and tokens:
            bucket.level = min(bucket.capacity, bucket.level + tokens)

    def _get(self, client: str) -> tuple[TokenBucket | None, TokenBucket | None]:
        now = self._clock()
        if client not in self._buckets:
            if len(self._buckets) >= self.MAX_CLIENTS:
                self._forget_full(now)
            self._buckets[client] = (self._bucket(self.rpm, now), self._bucket(self.tpm, now))
        pair = self._buckets[client]
        for bucket in pair:
            if bucket is not None:
                bucket.refill(now)
        return pair

    @staticmethod
    def _bucket(per_minute: int | None, now: float) -> TokenBucket | None:
        return TokenBucket(per_minute, per_minute / 60, per_minute, now) if per_minute else None

    def _forget_full(self, now: float) -> None:
        """A full bucket is the same as no bucket: drop those, so the table stays bounded."""
        for client, pair in list(self._buckets.items()):
            for b in pair:
                if b is not None:
                    b.refill(now)
            if all(b is None or b.level >= b.capacity for b in pair):
                del self._buckets[client]


# --- body size ----------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes (from
    Content-Length before reading anything, else while reading), always before any parsing."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413, f"Request body of {size}+ bytes exceeds this server's limit of {limit} bytes.",
        code="request_too_large",
    )  # fmt: skip


# --- deadlines and disconnects ------------------------------------------------------------------------------
class ClientDisconnected(Exception):
    """The client went away; whatever it asked for has been cancelled."""


async def watch(request: Request, awaitable: Awaitable[T], deadline: float | None, poll: float = 0.1) -> T:
    """Await `awaitable` unless the client disconnects or the deadline (event-loop time) passes; either
    cancels it (which aborts its engine requests) and raises ClientDisconnected / a 504 APIError."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            wait = poll if deadline is None else min(poll, deadline - loop.time())
            done, _ = await asyncio.wait({task}, timeout=max(wait, 0.0))
            if done:
                return task.result()
            if deadline is not None and loop.time() >= deadline:
                raise timed_out()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        task.cancel()


def timed_out() -> APIError:
    return APIError(
        504, "The request timed out on the server and was aborted; retry, or ask for fewer tokens.",
        type="timeout_error", code="timeout",
    )  # fmt: skip
