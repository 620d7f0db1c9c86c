"""``POST /oauth/token`` (password and refresh grants) and ``GET /logout``, as the real server answers them.

Only servers with logins have these routes (``Emulator(oauth=False)`` has none: see :mod:`.routes`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .accounts import check_password
from .replies import Reply, Request

if TYPE_CHECKING:
    from .server import Emulator


def _refuse(status: int, error: str, description: str) -> Reply:
    return Reply(status, json.dumps({"error": error, "error_description": description}).encode())


def token(emu: Emulator, req: Request) -> Reply:
    params = req.params

    def one(key: str) -> str | None:
        values = params.get(key)
        return values[0] if values else None

    client_id, grant = one("client_id"), one("grant_type")
    if client_id is None or client_id.lower() != "nbia":
        return _refuse(401, "unauthorized_client", "Invalid client or Invalid client credentials")
    if grant == "password":
        user, password = one("username"), one("password")
        if user is None or password is None or not check_password(emu.passwords, user, password):
            return _refuse(401, "invalid_grant", "Invalid user credentials")
        reply = emu.tokens.issue(user)
    elif grant == "refresh_token":
        refreshed = emu.tokens.refresh(one("refresh_token") or "")
        if refreshed is None:
            return _refuse(401, "invalid_grant", "Invalid refresh token")
        reply = refreshed
    else:
        return _refuse(400, "unsupported_grant_type", "Unsupported grant_type")
    return Reply(200, json.dumps(reply).encode())


def logout(emu: Emulator, req: Request) -> Reply:
    bearer = req.bearer()
    if bearer:
        emu.tokens.revoke(bearer)
    return Reply(200, b"You Have Logged Out successfully.", "text/plain")
