"""The server's front door: an ASGI middleware that checks every request before FastAPI
parses anything.

In order: the Host header must name this server (against DNS rebinding, where a web page's
own name resolves to 127.0.0.1 and the browser then talks to a local server as that page),
the API key must match (constant time) on every non-public route, an API body must be
labelled JSON (a page may send text/plain, a form or a type-less Blob to any site without
a CORS preflight, so accepting those would let any web page drive a local server), and a
body may not be larger than the cap (413 while reading, whether or not it declared its
length). Every refusal is an OpenAI error object.

Every response carries headers that keep the page safe in a browser: no MIME sniffing, a
Content-Security-Policy that allows only this server's own scripts, styles and connections,
and no framing by other sites (clickjacking).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

from qkv.serve.protocol import error_body

# Host names a loopback-only server is reached by; `qkv serve --allowed-hosts` adds more.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
PUBLIC_PATHS = ("/", "/health", "/metrics", "/favicon.ico")
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate CSP 2
    (b"referrer-policy", b"no-referrer"),
]


class Guard:
    def __init__(
        self,
        app,
        api_key: str | None,
        max_body_bytes: int,
        allowed_hosts: Iterable[str] | None = None,
        metrics_auth: bool = False,
    ):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        hosts = [h.strip().lower() for h in (LOOPBACK_HOSTS if allowed_hosts is None else allowed_hosts)]
        self.any_host = "*" in hosts
        self.hosts = {h.strip("[]").rstrip(".") for h in hosts if h}
        self.metrics_auth = metrics_auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self._guard(scope, receive, _with_security_headers(send))

    async def _guard(self, scope, receive, send):
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.any_host and _host_name(host) not in self.hosts:
            msg = (
                f"the Host header {host!r} is not one this server answers to; if clients reach it by that "
                f"name, start it with --allowed-hosts {_host_name(host) or 'NAME'} (or '*' for any)"
            )
            return await send_json(send, 421, error_body(msg, code="host_not_allowed"))
        public = is_public(scope["path"]) and not (self.metrics_auth and scope["path"] == "/metrics")
        if self.key is not None and not public:
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                msg = (
                    "missing API key; send 'Authorization: Bearer <key>'" if not given else "incorrect API key provided"
                )
                return await send_json(send, 401, error_body(msg, "invalid_request_error", code="invalid_api_key"))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        if scope["path"].startswith("/v1/") and not _is_json(headers.get(b"content-type", b"")):
            got = headers.get(b"content-type", b"").decode("latin-1") or "none"
            msg = f"the request body must be JSON, sent with 'Content-Type: application/json' (got {got!r})"
            return await send_json(send, 415, error_body(msg, code="unsupported_media_type"))
        too_big = error_body(
            f"request body is larger than {self.max_body} bytes; send a smaller request", code="request_too_large"
        )
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_body:
            return await send_json(send, 413, too_big)
        chunks, size = [], 0
        while True:  # read the (bounded) body ourselves, then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await send_json(send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect, for abort-on-disconnect

        return await self.app(scope, replay, send)


def is_public(path: str) -> bool:
    """Paths served without the API key: the page shell (it sends the key itself), its
    static files, liveness and metrics. Everything else, /v1/ and any added router
    included, needs the key when one is set."""
    return path in PUBLIC_PATHS or path.startswith("/static/")


def _with_security_headers(send):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
        await send(message)

    return wrapped


def _host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


async def send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})
