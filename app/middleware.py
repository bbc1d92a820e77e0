"""What wraps every request, outside the framework's own error handling (so a 500 gets it too):
the security headers, HEAD answered wherever GET is, and the cap on request bodies, enforced
before a body is read or parsed. Pure ASGI."""

from __future__ import annotations

from starlette.exceptions import HTTPException

from app.schemas import ErrorOut

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; "
     b"img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
     b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeaders:
    """A strict Content-Security-Policy (no inline script, so corpus text could run nothing
    even if it escaped), nosniff and no framing, on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *(h for h in SECURITY_HEADERS if h[0] not in names)]
            await send(message)

        return await self.app(scope, receive, send_with_headers)


class HeadAsGet:
    """HEAD wherever GET is served: the GET's status and headers (its Content-Length
    included), without the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_head(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        return await self.app({**scope, "method": "GET"}, receive, send_head)


def too_large_message(limit: int) -> str:
    return (f"the request body is over this server's limit of {limit:,} bytes "
            "(FEATURESCOPE_MAX_BODY)")


class BodyLimit:
    """Refuses (413) a request whose Content-Length is over `max_bytes` before reading any of
    its body, and one whose streamed body grows past it as soon as it does."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    return await self._refuse(send, value)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, too_large_message(self.max_bytes))
            return message

        return await self.app(scope, counted, send)

    async def _refuse(self, send, length: bytes) -> None:
        status, message = ((413, too_large_message(self.max_bytes)) if length.isdigit()
                           else (400, "malformed Content-Length"))
        body = ErrorOut(status=status, error=message).model_dump_json().encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def outermost(app, *, max_bytes: int):
    """The layers every request goes through first, around the framework's stack."""
    return SecurityHeaders(HeadAsGet(BodyLimit(app, max_bytes)))
