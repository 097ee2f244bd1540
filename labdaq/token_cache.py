"""A short-lived cache of verified bearer tokens for the API process.

Verifying a token is a database round trip per request (the token row joined with its
user), which under the standard API load was a fifth of a read request's cost. A verified
token is kept here for ``ttl_s`` seconds, so a busy client is verified about once per
``ttl_s`` instead of once per request.

Revocation still takes effect: every commit that changed a token or a user (revoked,
issued, role changed, disabled) in this process marks the session
(:func:`mark_auth_changed`), and after that commit the whole cache is dropped, so the
process that revoked a token refuses it on the next request. A change made by another
process (the CLI, another API process) is seen once the entry is older than ``ttl_s``.
Expiry is checked on every request against the cached ``expires_at``, so an expiring
token is refused on time whatever its age in the cache.

One lookup at a time per token (:meth:`TokenCache.verify_once`): when an entry ages out,
every request of that token arriving before the database has answered would otherwise
make its own lookup, up to one per open connection (each an ORM query on aiosqlite's
thread), a burst every ``ttl_s`` that the requests behind it wait for. They wait for the
one lookup instead and share its answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import event
from sqlalchemy.orm import Session

from labdaq.storage import models as m

_CHANGED_KEY = "labdaq_auth_changed"
#: Bumped after every commit that changed tokens or users: entries of an older
#: generation are not used.
_generation = 0
_lock = threading.Lock()


def mark_auth_changed(session: Session) -> None:
    """Say that this session changes tokens or users: cached tokens are dropped once it
    commits."""
    session.info[_CHANGED_KEY] = True


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    global _generation
    if session.info.pop(_CHANGED_KEY, False):
        with _lock:
            _generation += 1


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_CHANGED_KEY, None)


@dataclass(frozen=True)
class CachedToken:
    """What a request needs of a verified token (a transient copy, in no session)."""

    token: m.ApiToken
    actor: str
    expires_at: datetime | None
    generation: int
    cached_at_s: float


class TokenCache:
    """Verified tokens by the SHA-256 of their secret, each for ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float, max_entries: int = 1024) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, CachedToken] = {}
        # Lookups under way, by the secret's key and the generation they started in.
        self._pending: dict[tuple[str, int], asyncio.Future[CachedToken | str]] = {}

    @staticmethod
    def key(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    def get(self, secret: str) -> CachedToken | None:
        """The cached token if it is fresh, of the current generation and not expired."""
        if self.ttl_s <= 0:
            return None
        entry = self._entries.get(self.key(secret))
        if entry is None:
            return None
        if (entry.generation != _generation
                or time.monotonic() - entry.cached_at_s >= self.ttl_s
                or (entry.expires_at is not None and entry.expires_at <= m.utcnow())):
            self._entries.pop(self.key(secret), None)
            return None
        return entry

    def put(self, secret: str, token: m.ApiToken, actor: str,
            expires_at: datetime | None, generation: int) -> CachedToken:
        """Keep a token verified while ``generation`` was current (read before the
        query, so a change committed during the query is not cached as unchanged).
        Returns the copy that is (or with ``ttl_s`` 0 would be) kept."""
        # A copy outside any session: the request's own instance is expired when its
        # session rolls back, and could then not be read by the next request.
        copy = m.ApiToken(id=token.id, name=token.name, role=token.role,
                          user_id=token.user_id, expires_at=expires_at)
        entry = CachedToken(copy, actor, expires_at, generation, time.monotonic())
        if self.ttl_s <= 0:
            return entry
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # unbounded distinct secrets: start over, stay small
        self._entries[self.key(secret)] = entry
        return entry

    async def verify_once(
        self, secret: str, lookup: Callable[[int], Awaitable[CachedToken | str]]
    ) -> tuple[CachedToken | str, bool]:
        """``lookup(generation)`` (the database's verdict: the verified token, or why it
        is refused), run once for all the requests of ``secret`` that arrive while it
        runs. Returns the verdict and whether this call ran the lookup itself (a request
        that shared another's gets the cached copy, as on a cache hit).

        Shared only within a generation: a request arriving after a commit that changed
        tokens or users makes a lookup of its own. An error of the lookup (the database
        locked or gone) reaches every request that waited for it; a lookup cancelled
        with its request (the client went away) leaves the others to look up again."""
        if self.ttl_s <= 0:
            return await lookup(generation()), True
        while True:
            gen = generation()
            key = (self.key(secret), gen)
            pending = self._pending.get(key)
            if pending is None:
                break
            try:
                # shield: a follower that is cancelled does not cancel the lookup.
                return await asyncio.shield(pending), False
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this request itself was cancelled
        fut: asyncio.Future[CachedToken | str] = asyncio.get_running_loop().create_future()
        # Retrieve an error nobody waited for, so asyncio does not log it as lost.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending[key] = fut
        try:
            verdict = await lookup(gen)
        except Exception as exc:
            fut.set_exception(exc)
            raise
        except BaseException:
            fut.cancel()
            raise
        else:
            fut.set_result(verdict)
            return verdict, True
        finally:
            self._pending.pop(key, None)


def generation() -> int:
    """The current generation, to pass to :meth:`TokenCache.put`."""
    return _generation
