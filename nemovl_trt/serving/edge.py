"""The ASGI edge in front of the OpenAI app: what must hold for every request whatever the routes do.

`EdgeMiddleware(app, EdgeConfig(...), availability=..., limits=...)` wraps the FastAPI app of
`nemovl_trt.server.app.create_app` (`nemovl serve` applies it) and adds, in this order:

1. a request id: the client's `X-Request-Id` when it is short and plain, else a new `req-<hex>`; sent back
   as `X-Request-Id` on every response and written in every log line about the request;
2. the API key (`--api-key` / NEMOVL_API_KEY), as vLLM does it: every `/v1/...` route needs
   `Authorization: Bearer KEY` (401 `invalid_api_key` otherwise), except `/v1/health/*`; `/health`,
   `/metrics` and `/openapi.json` stay open;
3. for `POST /v1/chat/completions` and `POST /v1/completions`: the body is read up to `max_body_bytes` (413) and run through
   `guards.guard_chat_body` (400s: JSON that is not UTF-8 / not standard / nested too deep, text that is not
   encodable, integers out of the engine's range, a prompt that cannot fit, by a cheap byte bound), then
   refused with 503 `model_not_ready` + `Retry-After` while the supervisor restarts tritonserver or the
   server drains; the body is then handed to the app unchanged, and the value the guards decoded with it
   (`scope["state"][PARSED_BODY_KEY]`), so the app does not parse it a second time;
4. `Retry-After` on every 503 the app itself answers;
5. a deadline (`--request-timeout`): a generation request still running after it is cancelled inside the app
   (which cancels the Triton request, hence the engine's work) and answered 504 `timeout`, or, when the SSE
   stream has already started, ended with one `data: {"error": ...}` event and `data: [DONE]`;
6. containment of unexpected errors: an exception escaping the app is logged with its traceback and the
   request id, the client gets a 500 `internal_error` envelope naming the request id, and the exception is
   not re-raised, so uvicorn keeps the keep-alive connection (uvicorn closes a connection whose app raised);
7. its own Prometheus metrics, appended to the app's `GET /metrics` text: rejections by reason, deadlines
   hit, and whatever `extra_metrics` renders (the supervisor's restart counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest

from nemovl_trt.serving.guards import DEFAULT_BYTES_PER_TOKEN, MAX_JSON_DEPTH, GuardError, guard_chat_body

log = logging.getLogger("nemovl.edge")

CHAT_PATH = "/v1/chat/completions"
GENERATION_PATHS = (CHAT_PATH, "/v1/completions")  # bodies guarded, deadline applied
READY_PATHS = ("/v1/health/ready", "/health")
OPEN_V1_PREFIX = "/v1/health/"
REQUEST_ID_HEADER = "x-request-id"
_RID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
SSE_DONE = b"data: [DONE]\n\n"
# Where the body decoded by the guards travels to the app (scope["state"] is the app's `request.state`).
PARSED_BODY_KEY = "nemovl_parsed_body"

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable_error",
               504: "timeout_error"}

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Availability:
    """What the supervisor says: serve or not, and for how long clients should wait."""

    serving: bool
    retry_after_s: int = 1
    reason: str = ""


@dataclass
class EdgeConfig:
    """Settings of the edge (from `nemovl serve` flags)."""

    api_key: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_json_depth: int = MAX_JSON_DEPTH
    request_timeout_s: float | None = None
    guard_bodies: bool = True
    retry_after_s: int = 1
    openapi: dict[str, Any] | None = None  # served at GET /openapi.json when set


def envelope(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error" if status < 500
                                                                   else "internal_server_error"),
                      "param": param, "code": code}}


def request_id_from(scope: Scope) -> str:
    """The client's X-Request-Id when plain and short, else a new one."""
    for k, v in scope.get("headers") or []:
        if k.lower() == b"x-request-id":
            try:
                s = v.decode("ascii")
            except UnicodeDecodeError:
                break
            if _RID_RE.match(s):
                return s
            break
    return "req-" + secrets.token_hex(8)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or []:
        if k.lower() == name:
            return v
    return None


def bearer_ok(scope: Scope, key: str) -> bool:
    """True when `Authorization: Bearer <key>` is present and matches (constant-time compare)."""
    auth = _header(scope, b"authorization") or b""
    scheme, _, token = auth.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), key.encode())


def needs_key(path: str) -> bool:
    """Routes the API key protects: every /v1 route but /v1/health/*."""
    return path.startswith("/v1/") and not path.startswith(OPEN_V1_PREFIX) or path == "/v1"


class EdgeMetrics:
    """The edge's counters, in a registry of their own (appended to the app's /metrics)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.rejected = Counter("nemovl_edge_rejected", "Requests refused by the edge before the app, by reason.",
                                ["reason"], registry=r)
        self.timeouts = Counter("nemovl_request_timeouts", "Chat requests cut by --request-timeout.", registry=r)
        self.internal_errors = Counter("nemovl_internal_errors", "Requests that ended in an unexpected server "
                                       "error (500).", registry=r)


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body, ensure_ascii=True).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class EdgeMiddleware:
    """See the module docstring. `availability()` is polled per chat / readiness request; `limits()` gives
    (max_seq_len, bytes_per_token) for the cheap prompt bound (None: not known yet, bound skipped);
    `extra_metrics()` returns Prometheus text appended to /metrics."""

    def __init__(self, app: Callable[..., Awaitable[None]], config: EdgeConfig | None = None, *,
                 availability: Callable[[], Availability] | None = None,
                 limits: Callable[[], Awaitable[tuple[int | None, int]]] | None = None,
                 extra_metrics: Callable[[], bytes] | None = None) -> None:
        self.app = app
        self.config = config or EdgeConfig()
        self.availability = availability
        self.limits = limits
        self.extra_metrics = extra_metrics
        self.metrics = EdgeMetrics()
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cut: asyncio.Event | None = None

    # ------------------------------------------------------------------ draining
    def begin_drain(self, grace_s: float) -> None:
        """Stop taking chat requests (503 + Retry-After) and, `grace_s` seconds from now (less a margin for
        the goodbye), end every request still running: cancelled in the app (so in Triton), answered 503 or,
        on a started SSE stream, ended with an error event and [DONE]. Callable from a signal handler."""
        self.draining = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        delay = max(0.0, grace_s - 0.5)

        def arm() -> None:
            loop.call_later(delay, self._cut_all)

        loop.call_soon_threadsafe(arm)

    def _cut_all(self) -> None:
        if self._cut is not None:
            self._cut.set()

    # ------------------------------------------------------------------ helpers
    def _unavailable(self) -> Availability | None:
        if self.draining:
            return Availability(False, self.config.retry_after_s, "the server is shutting down")
        if self.availability is None:
            return None
        a = self.availability()
        return None if a.serving else a

    async def _refuse(self, send: Send, status: int, message: str, code: str | None, reason: str,
                      param: str | None = None, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.metrics.rejected.labels(reason=reason).inc()
        await send_json(send, status, envelope(status, message, code, param), headers or [])

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None when the client went away; GuardError(413) over the cap."""
        cap = self.config.max_body_bytes
        parts: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise GuardError(413, f"The request body is larger than the {cap} byte limit.", "content_too_large")
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._cut = asyncio.Event()
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = rid
        path, method = scope.get("path", ""), scope.get("method", "GET")
        retry_after = str(self.config.retry_after_s).encode()

        async def send_with_id(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                headers = [(k, v) for k, v in msg.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                if msg.get("status") in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", retry_after))
                msg = {**msg, "headers": headers}
            await send(msg)

        key = self.config.api_key
        if key and needs_key(path) and not bearer_ok(scope, key):
            await self._refuse(send_with_id, 401, "A valid API key is required (Authorization: Bearer <key>).",
                               "invalid_api_key", "auth", headers=[(b"www-authenticate", b"Bearer")])
            return
        if method == "GET" and path == "/openapi.json" and self.config.openapi is not None:
            await send_json(send_with_id, 200, self.config.openapi, [])
            return
        if method == "GET" and path in READY_PATHS:
            down = self._unavailable()
            if down is not None:
                await self._refuse(send_with_id, 503, f"The model is not ready ({down.reason or 'restarting'}).",
                                   "model_not_ready", "unavailable",
                                   headers=[(b"retry-after", str(down.retry_after_s).encode())])
                return
        if method == "GET" and path == "/metrics":
            await self._metrics(scope, receive, send_with_id)
            return
        if method == "POST" and path in GENERATION_PATHS:
            await self._chat(scope, receive, send_with_id, rid)
            return
        await self._run_app(scope, receive, send_with_id, rid, timeout_s=None)

    async def _chat(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        try:
            raw = await self._read_body(receive)
            if raw is None:
                return
            if self.config.guard_bodies:
                max_seq_len, bpt = (await self.limits()) if self.limits else (None, DEFAULT_BYTES_PER_TOKEN)
                scope["state"][PARSED_BODY_KEY] = guard_chat_body(
                    raw, max_depth=self.config.max_json_depth, max_seq_len=max_seq_len, bytes_per_token=bpt)
        except GuardError as e:
            log.info("request %s refused: %s %s (%s)", rid, e.status, e.code, e.message[:200])
            await self._refuse(send, e.status, e.message, e.code, "guard", e.param)
            return
        down = self._unavailable()
        if down is not None:
            await self._refuse(send, 503, f"The model is not ready ({down.reason or 'restarting'}); retry shortly.",
                               "model_not_ready", "unavailable",
                               headers=[(b"retry-after", str(down.retry_after_s).encode())])
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self._run_app(scope, replay, send, rid, timeout_s=self.config.request_timeout_s)

    async def _run_app(self, scope: Scope, receive: Receive, send: Send, rid: str, timeout_s: float | None) -> None:
        st = {"started": False, "complete": False, "sse": False, "closed": False}
        held: dict[str, Any] = {}  # a 500 from the app, held to add the request id to its message

        async def guarded_send(msg: Message) -> None:
            if st["closed"]:
                return
            if msg["type"] == "http.response.start":
                ctype = next((v for k, v in msg.get("headers", []) if k.lower() == b"content-type"), b"")
                st["sse"] = ctype.startswith(b"text/event-stream")
                if msg.get("status") == 500 and not st["sse"]:
                    held["start"], held["body"] = msg, []
                    return
                st["started"] = True
                await send(msg)
                return
            if msg["type"] == "http.response.body":
                if "start" in held:
                    held["body"].append(msg.get("body", b""))
                    if not msg.get("more_body", False):
                        st["started"] = st["complete"] = True
                        await self._send_500(send, rid, held["start"], b"".join(held["body"]))
                    return
                await send(msg)
                if not msg.get("more_body", False):
                    st["complete"] = True
                return
            await send(msg)

        task = asyncio.ensure_future(self.app(scope, receive, guarded_send))
        assert self._cut is not None
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            done, _ = await asyncio.wait({task, cut}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        finally:
            cut.cancel()
        if task not in done:  # deadline or shutdown: cancel the work (the app's handlers cancel the Triton call)
            before = dict(st)
            st["closed"] = True  # whatever the app sends while it unwinds is dropped: the edge answers
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if cut in done:
                log.warning("request %s cut: the shutdown grace period is over", rid)
                await self._end_with_error(send, before, 503, "The server is shutting down; retry on another "
                                           "instance or shortly.", "model_not_ready")
                return
            self.metrics.timeouts.inc()
            log.warning("request %s cut by the %.1f s request timeout", rid, timeout_s or 0.0)
            await self._end_with_error(send, before, 504, f"The request did not finish within the server's "
                                       f"{timeout_s:g} s request timeout.", "timeout")
            return
        exc = task.exception() if not task.cancelled() else None
        if exc is None:
            return
        log.error("request %s failed with an unexpected error", rid, exc_info=exc)
        if st["complete"]:
            return  # the app already answered (its 500 handler); keep the connection usable
        self.metrics.internal_errors.inc()
        await self._end_with_error(send, dict(st), 500, f"Internal server error (request id {rid}).", "internal_error")
        st["closed"] = True

    async def _send_500(self, send: Send, rid: str, start: Message, body: bytes) -> None:
        """The app's 500, with the request id added to its message (its envelope kept when it has one)."""
        self.metrics.internal_errors.inc()
        message, code = "Internal server error", "internal_error"
        try:
            err = json.loads(body)["error"]
            message = str(err.get("message") or message).rstrip(".")
            code = err.get("code") or code
        except (ValueError, KeyError, TypeError):
            pass
        log.error("request %s answered 500 %s: %s", rid, code, message[:200])
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length",
                                                                                    b"content-type")]
        await send_json(send, 500, envelope(500, f"{message} (request id {rid}).", code), headers)

    async def _end_with_error(self, send: Send, st: dict[str, bool], status: int, message: str, code: str) -> None:
        """Answer an error given what had been sent (`st`): a JSON error when nothing was, an SSE error event
        and [DONE] on a started stream, else just the end of the body."""
        if st["complete"] or st["closed"]:
            return
        if not st["started"]:
            await send_json(send, status, envelope(status, message, code), [])
            return
        if st["sse"]:
            event = b"data: " + json.dumps(envelope(status, message, code)).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": event + SSE_DONE, "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts: list[bytes] = []
        start: dict[str, Any] = {}

        async def capture(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                start.update(msg)
            elif msg["type"] == "http.response.body":
                parts.append(msg.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(parts)
        if start.get("status", 200) == 200:
            body += generate_latest(self.metrics.registry)
            if self.extra_metrics is not None:
                body += self.extra_metrics()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start.get("status", 200), "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
