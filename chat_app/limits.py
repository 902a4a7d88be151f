"""Request limits of a public demo: body size on every route; per-client rate, in-flight and vote caps on /v1, /api.

Each refusal is the API's JSON error (413 or 429 with Retry-After) and one log line naming the client (a hash of
its API key, or its address), the route and the limit. In memory: the counts reset when the server restarts.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import defaultdict, deque

from chat_app.config import LimitsConfig

log = logging.getLogger(__name__)
WINDOW_S = 60.0
LIMITED_PREFIXES = ("/v1/", "/api/")   # ours; Gradio's pages, assets and queue live elsewhere
VOTE_PATH = "/v1/feedback"


class Refused(Exception):
    """A request over a limit: the status, what to tell the client and, for 429, when to come back."""

    def __init__(self, status: int, limit: str, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.limit, self.message, self.retry_after_s = status, limit, message, retry_after_s


def client_of(scope) -> str:
    """Who is asking: `key:<sha256 prefix>` for a bearer key on /v1 (never the key itself), else `addr:<ip>`."""
    if scope["path"].startswith("/v1/"):   # on /api the bearer token is the operator password: not an identity
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer " and value[7:].strip():
                return "key:" + hashlib.sha256(value[7:].strip()).hexdigest()[:16]
    host = (scope.get("client") or ("unknown", 0))[0]
    return f"addr:{host}"


class ClientLimiter:
    """Per-client sliding windows (requests, votes) and in-flight counts; thread-safe (answers run in threads)."""

    def __init__(self, limits: LimitsConfig, clock=time.monotonic):
        self.limits, self.clock = limits, clock
        self.lock = threading.Lock()
        self.requests: dict[str, deque] = defaultdict(deque)   # client -> times of its accepted requests
        self.votes: dict[str, deque] = defaultdict(deque)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.swept_at = clock()

    def _window_full(self, times: deque, cap: int, now: float) -> int | None:
        """Seconds until the window has room again, or None if it has room now (and then counts this one)."""
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        if cap and len(times) >= cap:
            return max(1, math.ceil(times[0] + WINDOW_S - now))
        times.append(now)
        return None

    def acquire(self, client: str, is_vote: bool) -> None:
        """Count a request in (call `release` when it ends); Refused (429) over a limit."""
        limits = self.limits
        with self.lock:
            now = self.clock()
            self._sweep(now)
            if limits.requests_in_flight and self.in_flight.get(client, 0) >= limits.requests_in_flight:
                raise Refused(429, "requests_in_flight", f"at most {limits.requests_in_flight} requests at once "
                              "per client; wait for one to finish", retry_after_s=1)
            wait = self._window_full(self.requests[client], limits.requests_per_minute, now)
            if wait is not None:
                raise Refused(429, "requests_per_minute", f"at most {limits.requests_per_minute} requests a "
                              f"minute per client; retry in {wait} s", retry_after_s=wait)
            wait = self._window_full(self.votes[client], limits.votes_per_minute, now) if is_vote else None
            if wait is not None:
                self.requests[client].pop()   # refused: this request does not use up the client's minute
                raise Refused(429, "votes_per_minute", f"at most {limits.votes_per_minute} votes a minute per "
                              f"client; retry in {wait} s", retry_after_s=wait)
            self.in_flight[client] += 1

    def release(self, client: str) -> None:
        with self.lock:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]

    def _sweep(self, now: float) -> None:
        """Once a minute, forget clients whose windows hold only old times: addresses and keys are unbounded."""
        if now - self.swept_at < WINDOW_S:
            return
        self.swept_at = now
        for windows in (self.requests, self.votes):
            for client in [c for c, times in windows.items() if not times or times[-1] <= now - WINDOW_S]:
                del windows[client]


class RequestLimits:
    """ASGI middleware: the body-size cap on every HTTP request, then the per-client limits on /v1 and /api.

    `refuse(status, message, param, kind, headers)` builds the JSON error (api.error_response)."""

    def __init__(self, app, limits: LimitsConfig, refuse):
        self.app, self.limits, self.refuse = app, limits, refuse
        self.limiter = ClientLimiter(limits)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client, path = client_of(scope), scope["path"]
        try:
            body = await self._read_body(scope, receive)
            limited = path.startswith(LIMITED_PREFIXES)
            if limited:
                self.limiter.acquire(client, is_vote=path == VOTE_PATH and scope["method"] == "POST")
        except Refused as refused:
            log.warning("refused %s %s %s: %s (%s)", client, scope["method"], path, refused.limit, refused.status)
            headers = {"Retry-After": str(refused.retry_after_s)} if refused.retry_after_s else None
            kind = "rate_limit_error" if refused.status == 429 else "invalid_request_error"
            return await self.refuse(refused.status, refused.message, None, kind, headers)(scope, receive, send)

        replayed = False

        async def replay():   # the app reads the body we already hold, then the connection as usual (disconnects)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if limited:
                self.limiter.release(client)

    async def _read_body(self, scope, receive) -> bytes:
        """The whole body, up to max_body_bytes: the declared Content-Length first, then the bytes that arrive
        (a chunked upload declares none). Held in memory, which the cap bounds."""
        cap = self.limits.max_body_bytes
        too_big = Refused(413, "max_body_bytes", f"the request body is larger than {cap} bytes")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and cap and value.isdigit() and (len(value) > 18 or int(value) > cap):
                raise too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":   # the client left; the app will see it too
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if cap and size > cap:
                raise too_big
            if not message.get("more_body"):
                break
        return b"".join(chunks)
