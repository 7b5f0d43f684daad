"""``Idempotency-Key`` on ``POST /metrics``: a batch retried with the same key is stored once.

The key is scoped to the caller's service. It is claimed in the same transaction as the batch's
rows (``StorageBackend.insert_batches``), together with a fingerprint of the body and the answer
the first attempt got, so a replay after a lost response gets that answer again (with
``Idempotent-Replayed: true``) and stores nothing, across restarts and across processes sharing
the database. Within one process a replay that arrives while the first attempt is still
committing waits for it (the in-flight map below); between processes the primary key of
``idempotency_keys`` decides, under SQLite's write lock. The same key with another body is refused
(422). Keys are remembered for ``METRICS_IDEMPOTENCY_WINDOW_S``; retention forgets older ones.

See docs/delivery.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from metrics_service.errors import ApiError, BadRequest

HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
# Visible ASCII except the quote and backslash (the draft's key is a structured-field string;
# a bare token is accepted too).
_KEY_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")

#: (status, JSON body, headers) as the ingest endpoint returns them.
Answer = tuple[int, dict[str, Any], dict[str, str]]


class InvalidIdempotencyKey(BadRequest):
    code = "invalid_idempotency_key"

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(
            f"the {HEADER} header is invalid: {message}",
            details=[{"field": HEADER, "rule": rule, "message": message}],
        )


class KeyReused(ApiError):
    status = 422
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        message = "this Idempotency-Key was already used for a different request body"
        super().__init__(
            message,
            details=[{"field": HEADER, "rule": "same_body", "message": message}],
        )


def parse_key(raw: bytes) -> str:
    """The key from the header value (``"abc"`` or ``abc``); InvalidIdempotencyKey if malformed."""
    try:
        value = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InvalidIdempotencyKey(
            "charset", "only visible ASCII characters are allowed"
        ) from None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value:
        raise InvalidIdempotencyKey("length", "the key must not be empty")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey("length", f"at most {MAX_KEY_LENGTH} characters")
    if not _KEY_RE.match(value):
        raise InvalidIdempotencyKey(
            "charset", 'only visible ASCII characters other than " and \\ are allowed'
        )
    return value


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True, slots=True)
class Stored:
    """A committed key's record."""

    fingerprint: str
    status: int
    response: bytes


@dataclass(eq=False, slots=True)
class Claim:
    """A key to claim in the transaction that stores its batch's rows.

    ``StorageBackend.insert_batches`` sets ``existing`` when the key was already committed (by
    another process sharing the database, or by an attempt that finished after this one looked):
    then the batch's rows are not stored again.
    """

    service: str
    key: str
    fingerprint: str
    status: int
    response: bytes
    window_s: float
    existing: Stored | None = None
    submitted: bool = False
    settle: Callable[[BaseException | None], None] = field(default=lambda error: None)


# -- the request side (event loop) ---------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Flight:
    fingerprint: str
    answer: asyncio.Future[Stored]


class Registry:
    """Keys being committed by this process: a replay waits for the first attempt's answer."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._flights: dict[tuple[str, str], _Flight] = {}

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def execute(
        self,
        service: str,
        key: str,
        print_: str,
        lookup_committed: Callable[[], Awaitable[Stored | None]] | None,
        first: Callable[[Claim], Awaitable[Answer]],
        replay: Callable[[Stored], Answer],
    ) -> Answer:
        """Answer a request carrying ``key``: replay a committed or in-flight attempt's answer,
        or run ``first`` with a claim that it must commit with its rows.

        Without ``lookup_committed`` (durable acknowledgement) a key committed earlier is found
        by the claim itself, at commit; with it (buffered), before the batch is queued."""
        slot = (service, key)
        while True:
            flight = self._flights.get(slot)
            if flight is not None:
                if flight.fingerprint != print_:
                    raise KeyReused
                try:
                    answered = await asyncio.shield(flight.answer)
                except Exception:
                    continue  # the first attempt failed: this one tries for itself
                return replay(answered)
            committed = None if lookup_committed is None else await lookup_committed()
            if slot in self._flights:
                continue  # another attempt started meanwhile: wait for it instead
            if committed is not None:
                if committed.fingerprint != print_:
                    raise KeyReused
                return replay(committed)
            return await self._first(slot, print_, first, replay)

    async def _first(
        self,
        slot: tuple[str, str],
        print_: str,
        first: Callable[[Claim], Awaitable[Answer]],
        replay: Callable[[Stored], Answer],
    ) -> Answer:
        loop = asyncio.get_running_loop()
        flight = _Flight(print_, loop.create_future())
        self._flights[slot] = flight

        def settle(error: BaseException | None) -> None:
            # Committed (or given up): later replays read the database.
            if self._flights.get(slot) is flight:
                del self._flights[slot]
            if error is not None and not flight.answer.done():
                flight.answer.set_exception(error)
                flight.answer.exception()  # retrieved: no "never retrieved" warning

        claim_ = Claim(slot[0], slot[1], print_, 0, b"", self.window_s, settle=settle)
        try:
            answer = await first(claim_)
        except BaseException as exc:
            settle(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            raise
        if claim_.existing is not None:
            # Another process committed the key first; this attempt stored nothing.
            if claim_.existing.fingerprint != print_:
                error = KeyReused()
                settle(error)
                raise error
            stored = claim_.existing
            answer = replay(stored)
        else:
            stored = Stored(print_, claim_.status, claim_.response)
        if not flight.answer.done():
            flight.answer.set_result(stored)
        if not claim_.submitted:
            settle(None)  # nothing to commit (every metric rejected): nothing to remember
        return answer
