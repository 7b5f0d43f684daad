"""Request ids and the headers every response carries.

Every response has ``X-Request-Id``: the caller's if it is well formed (so a client or a proxy
can correlate its logs with ours), else one of ours, plus conservative security headers. The
regular routes get them from ``app.RequestIdMiddleware``; the plain-ASGI ingest endpoint adds
them to the response it builds (one layer less per request on the hottest path).
"""

from __future__ import annotations

import itertools
import os
import re

from starlette.types import Scope

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: Sent with every response.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


class RequestIds:
    """Ids unique per process as uuid4's, without a getrandom() call per request (which
    released the GIL to the writer thread mid-request): a random prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def assign(self, scope: Scope) -> str:
        """The request's id (the caller's ``X-Request-Id`` if well formed), stored in
        ``scope["request_id"]``."""
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        rid: str
        if incoming and _REQUEST_ID_RE.match(incoming):
            rid = incoming
        else:
            rid = f"{self._prefix}{next(self._counter):016x}"
        scope["request_id"] = rid
        return rid
