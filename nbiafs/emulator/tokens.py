"""OAuth tokens of the emulator: password and refresh grants, expiry, logout, forced expiry for tests.

Thread-safe. Access tokens are random uuid4 strings as on the real server; refresh tokens are opaque
random strings. Lifetimes run on ``time.monotonic``. Tokens are never logged.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Grant:
    user: str
    expires_at: float


def _seconds(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class TokenStore:
    """Issues and checks tokens. ``refresh_ttl=None`` means the same lifetime as access tokens."""

    def __init__(self, token_ttl: float = 7200.0, refresh_ttl: float | None = None, *,
                 refuse_refresh: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.token_ttl = float(token_ttl)
        self.refresh_ttl = float(token_ttl if refresh_ttl is None else refresh_ttl)
        self._refuse_refresh = refuse_refresh
        self._clock = clock
        self._lock = threading.Lock()
        self._access: dict[str, _Grant] = {}
        self._refresh: dict[str, _Grant] = {}

    def set_refuse_refresh(self, refuse: bool) -> None:
        with self._lock:
            self._refuse_refresh = bool(refuse)

    def issue(self, user: str) -> dict[str, object]:
        """A new token pair for ``user``, as the token endpoint's JSON reply."""
        access, refresh = str(uuid.uuid4()), secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._drop_dead(now)
            self._access[access] = _Grant(user, now + self.token_ttl)
            self._refresh[refresh] = _Grant(user, now + self.refresh_ttl)
        return {
            "access_token": access,
            "expires_in": _seconds(self.token_ttl),
            "refresh_expires_in": _seconds(self.refresh_ttl),
            "refresh_token": refresh,
            "token_type": "Bearer",
            "not-before-policy": 0,
            "session_state": str(uuid.uuid4()),
            "scope": "openid profile email",
        }

    def refresh(self, refresh_token: str) -> dict[str, object] | None:
        """A new pair for a live refresh token; ``None`` when unknown, expired or refusing."""
        with self._lock:
            grant = self._refresh.get(refresh_token)
            if self._refuse_refresh or grant is None or grant.expires_at <= self._clock():
                return None
            user = grant.user
        return self.issue(user)

    def user_for(self, access_token: str | None) -> str | None:
        """The user of a live access token, or ``None`` (unknown, expired, logged out)."""
        if not access_token:
            return None
        with self._lock:
            grant = self._access.get(access_token)
            if grant is None or grant.expires_at <= self._clock():
                return None
            return grant.user

    def revoke(self, access_token: str) -> bool:
        with self._lock:
            return self._access.pop(access_token, None) is not None

    def expire_all(self) -> None:
        """Every access token issued so far is expired from now on (refresh tokens stay valid)."""
        now = self._clock()
        with self._lock:
            for grant in self._access.values():
                grant.expires_at = min(grant.expires_at, now)

    def _drop_dead(self, now: float) -> None:
        # keep expired grants a while (a day) so expiry stays distinguishable in logs, then forget them
        horizon = now - 86400.0
        for table in (self._access, self._refresh):
            for key in [k for k, g in table.items() if g.expires_at < horizon]:
                del table[key]
