"""The ``/emulator/...`` control endpoints: how a test or benchmark in another process steers the emulator.

=====================================  ==========================================================
``GET  /emulator/stats``               calls per plain endpoint name (``{"getSeries": 2, ...}``)
``GET  /emulator/stats?detail=1``      ``{"calls", "versioned", "bytes", "versioned_bytes", "instances"}``
                                       (``instances``: getSingleImage answers per SOPInstanceUID)
``POST /emulator/reset-stats``         zero every counter
``POST /emulator/faults``              JSON ``{"endpoint", "status", "count", "delay", "truncate",
                                       "corrupt"}`` (endpoint plain or versioned, ``*`` = any)
``POST /emulator/clear-faults``        drop every scheduled fault
``POST /emulator/expire-tokens``       every access token issued so far is dead
``POST /emulator/refuse-refresh``      JSON ``{"refuse": true|false}``
``GET  /emulator/shaping``             ``{"latency", "per_connection", "link"}``
``POST /emulator/shaping``             JSON with any of those keys (bytes/s; null or 0 = unlimited)
``POST /emulator/add-series``          JSON: see :meth:`.server.Emulator.add_series`; answers the new UIDs
=====================================  ==========================================================

Every answer is JSON; a malformed request is 400 with the reason.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .replies import HttpError, Reply, Request, bad_request

if TYPE_CHECKING:
    from .server import Emulator

_OK = Reply(200, b'{"ok":true}', api=False)
_FAULT_KEYS = {"endpoint", "status", "count", "delay", "truncate", "corrupt"}
_SHAPING_KEYS = {"latency", "per_connection", "link"}
_ADD_KEYS = {"collection", "patient_id", "study_uid", "like", "count", "description", "modality"}


def _json(data: Any) -> Reply:
    return Reply(200, json.dumps(data, sort_keys=True).encode(), api=False)


def _spec(req: Request, allowed: set[str]) -> dict[str, Any]:
    spec = json.loads(req.json_body or b"{}")
    if not isinstance(spec, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    return spec


def handle(emu: Emulator, req: Request, action: str) -> Reply:
    if req.method == "GET" and action == "stats":
        if (req.one("detail") or "").lower() in ("1", "true", "yes"):
            return _json(emu.stats_snapshot())
        return _json(dict(emu.stats()))
    if req.method == "GET" and action == "shaping":
        return _json(emu.shaping())
    if req.method != "POST":
        raise HttpError(405, b"use POST", api=False)
    try:
        if action == "reset-stats":
            emu.reset_stats()
        elif action == "expire-tokens":
            emu.expire_tokens()
        elif action == "clear-faults":
            emu.clear_faults()
        elif action == "refuse-refresh":
            emu.set_refuse_refresh(bool(_spec(req, {"refuse"}).get("refuse", True)))
        elif action == "faults":
            spec = _spec(req, _FAULT_KEYS)
            emu.inject_fault(str(spec.get("endpoint", "")), status=spec.get("status"),
                             count=int(spec.get("count", 1)), delay=float(spec.get("delay", 0.0)),
                             truncate=bool(spec.get("truncate", False)), corrupt=bool(spec.get("corrupt", False)))
        elif action == "shaping":
            spec = _spec(req, _SHAPING_KEYS)
            emu.set_shaping(**spec)
            return _json(emu.shaping())
        elif action == "add-series":
            spec = _spec(req, _ADD_KEYS)
            return _json(emu.add_series(**spec).as_json())
        else:
            raise HttpError(404, b'{"error":"no such control endpoint"}', "application/json", api=False)
    except (ValueError, TypeError, KeyError) as exc:
        raise bad_request(f"bad {action} request: {exc}") from exc
    return _OK
