"""The emulator's HTTP server: NBIA endpoints, quirks included, plus fault injection and statistics.

Routes (base ``/nbia-api``): ``POST /oauth/token``, ``GET /logout``, the search API under
``/services/v2/`` (token) and ``/services/v1/``, ``/services/v4/`` (anonymous, public data only), and
the advanced API under ``/services/`` (token). ``/emulator/...`` are control endpoints for tests and
benchmarks running in another process. How each endpoint answers is described in
``/work/shared/nbia-api.md``; answer shapes live in :mod:`.responses`.

One stdlib ``ThreadingHTTPServer``, HTTP/1.1 keep-alive, a thread per connection (tracked, so
``stop()`` closes every connection and joins every thread).
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import os
import random
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import responses as R
from .accounts import GUEST_USER, account_passwords, check_password
from .archive import Archive, InstanceEntry, SeriesEntry, ensure_archive
from .tokens import TokenStore
from .zipstream import iter_zip

log = logging.getLogger(__name__)

#: The exact body of a v2 call made without an Authorization header (48 bytes).
NO_AUTH_BODY = b"Server was not able to process your request\nnull"

#: v2 endpoints that answer 200 with an empty body (instead of 401) for an expired or unknown token.
HIDES_AUTH_FAILURE = frozenset({"getSeries", "getPatient", "getPatientStudy", "getSOPInstanceUIDs",
                                "getSeriesSize"})
SEARCH_ENDPOINTS = frozenset({"getCollectionValues", "getPatient", "getPatientStudy", "getSeries",
                              "getSOPInstanceUIDs", "getSeriesSize", "getSingleImage", "getImage",
                              "getImageWithMD5Hash", "getM5HashForImage", "getUpdatedSeries"})
ADVANCED_ENDPOINTS = frozenset({"getStudyDrillDownWithSeriesIds", "getImageDrillDown",
                                "getCollectionDescriptions", "getLicenses"})


@dataclass
class Fault:
    """A scheduled misbehaviour: the next ``count`` calls of ``endpoint`` ("*" = any) misbehave."""

    endpoint: str
    status: int | None = None
    count: int = 1
    delay: float = 0.0
    truncate: bool = False


class _HttpError(Exception):
    def __init__(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


def _bad_request(message: str) -> _HttpError:
    return _HttpError(400, message.encode("utf-8"))


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that tracks its connection threads so that stop() can close and join them."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: Emulator) -> None:
        self.emulator = emulator
        self._conn_lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address),
                                  name="nbia-emulator-conn", daemon=True)
        with self._conn_lock:
            self._conns[request] = thread
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._conns.pop(request, None)

    def close_connections(self, timeout: float) -> None:
        with self._conn_lock:
            items = list(self._conns.items())
        for sock, _ in items:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in items:
            thread.join(timeout)


class Emulator:
    """An NBIA-compatible server over a sample archive. See the module docstring of :mod:`nbiafs.emulator`."""

    def __init__(self, data_dir: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0,
                 token_ttl: float = 7200.0, refresh_ttl: float | None = None, refuse_refresh: bool = False,
                 latency: float = 0.0) -> None:
        self.archive: Archive = ensure_archive(data_dir)
        self.host, self._port = host, port
        self.latency = float(latency)
        self.tokens = TokenStore(token_ttl, refresh_ttl, refuse_refresh=refuse_refresh)
        self.passwords = account_passwords()
        self._stats: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Emulator:
        """Bind and serve from a daemon thread; returns once the socket is listening."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self.host, self._port), self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="nbia-emulator", daemon=True)
        self._thread.start()
        log.info("NBIA emulator serving %s", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: close the socket and every connection, join the threads."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    # ---- statistics and control ----------------------------------------------------------------
    def count(self, endpoint: str) -> None:
        with self._lock:
            self._stats[endpoint] += 1

    def stats(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()

    def expire_tokens(self) -> None:
        self.tokens.expire_all()

    def set_refuse_refresh(self, refuse: bool) -> None:
        self.tokens.set_refuse_refresh(refuse)

    def inject_fault(self, endpoint: str, *, status: int | None = None, count: int = 1, delay: float = 0.0,
                     truncate: bool = False) -> None:
        """The next ``count`` calls of ``endpoint`` ("*" = any) answer ``status``, wait ``delay`` seconds
        first, and/or send a truncated body (a short zip for the zip endpoints, a body cut off before
        its announced Content-Length elsewhere)."""
        if not endpoint or count < 1 or delay < 0 or (status is not None and not 100 <= status <= 599):
            raise ValueError("bad fault: need an endpoint, count >= 1, delay >= 0, status 100-599")
        with self._lock:
            self._faults.append(Fault(endpoint, status, int(count), float(delay), bool(truncate)))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def take_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.endpoint in (endpoint, "*") and fault.count > 0:
                    fault.count -= 1
                    if fault.count == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` (latency, injected delays); returns at once when the emulator stops."""
        if seconds > 0:
            self._stopping.wait(seconds)


def _parse_date(text: str) -> dt.date:
    for fmt in ("%d/%m/%Y", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    raise _bad_request(f"bad fromDate {text!r}: use dd/MM/yyyy or yyyy-MM-dd")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "NBIA-emulator"
    timeout = 120  # an idle keep-alive connection is closed after two minutes
    # Headers and body go out as separate writes; with Nagle on, the body waits for the client's
    # delayed ACK of the headers (~40 ms a request), which would make the emulator far slower than
    # its --latency says and hide the mount's own costs in every test and benchmark.
    disable_nagle_algorithm = True
    server: _Server

    # ---- plumbing ------------------------------------------------------------------------------
    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    @property
    def emu(self) -> Emulator:
        return self.server.emulator

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _HttpError(411, b"chunked request bodies are not supported")
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _params(self, method: str) -> dict[str, list[str]]:
        query = urlsplit(self.path).query
        params = parse_qs(query, keep_blank_values=True)
        body = self._read_body()  # always drained, or the next request on this connection would be garbled
        if method == "POST":
            ctype = self.headers.get("Content-Type", "")
            if body and "json" not in ctype:
                for key, values in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items():
                    params.setdefault(key, []).extend(values)
            self._json_body = body if "json" in ctype else b""
        return params

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              truncate: bool = False, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        if truncate:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if truncate else body)
        if truncate:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_rows(self, rows: list[dict[str, Any]], truncate: bool = False) -> None:
        body = b"" if not rows else json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self._send(200, body, "application/json", truncate)

    def _send_zip(self, members: list[tuple[str, Any]], filename: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Disposition", f'attachment; filename="{filename}"')
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in iter_zip(members):
            if self.emu._stopping.is_set():
                self.close_connection = True
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def _dispatch(self, method: str) -> None:
        self._json_body = b""
        path = urlsplit(self.path).path
        endpoint = "unknown"
        try:
            if path.startswith("/emulator/"):
                self._control(method, path[len("/emulator/"):], self._params(method))
                return
            params = self._params(method)
            route = self._route(method, path)
            if route is None:
                raise _HttpError(404, b"Not Found")
            endpoint, handler = route
            self.emu.count(endpoint)
            self.emu.pause(self.emu.latency)
            fault = self.emu.take_fault(endpoint)
            truncate = False
            if fault is not None:
                self.emu.pause(fault.delay)
                if fault.status is not None:
                    raise _HttpError(fault.status, b"injected fault")
                truncate = fault.truncate
            handler(params, truncate)
        except _HttpError as err:
            self._send(err.status, err.body, err.content_type)
        except (BrokenPipeError, ConnectionResetError, socket.timeout) as exc:
            log.debug("client went away during %s: %s", endpoint, exc)
            self.close_connection = True
        except Exception:  # a bug in the emulator must show as a 500, not a dead connection
            log.exception("emulator failure on %s %s", method, self.path)
            try:
                self._send(500, b"emulator internal error", "text/plain")
            except OSError:
                self.close_connection = True

    def _route(self, method: str, path: str) -> tuple[str, Any] | None:
        if path == "/nbia-api/oauth/token" and method == "POST":
            return "token", self._token
        if path == "/nbia-api/logout":
            return "logout", self._logout
        prefix = "/nbia-api/services/"
        if not path.startswith(prefix):
            return None
        rest = path[len(prefix):].strip("/").split("/")
        if len(rest) == 2 and rest[0] in ("v1", "v2", "v4") and rest[1] in SEARCH_ENDPOINTS:
            version, name = rest
            return name, lambda params, truncate: self._search(version, name, params, truncate)
        if len(rest) == 1 and rest[0] in ADVANCED_ENDPOINTS:
            name = rest[0]
            return name, lambda params, truncate: self._advanced(name, params, truncate)
        return None

    # ---- auth ----------------------------------------------------------------------------------
    def _bearer(self) -> str | None:
        header = self.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, value = header.strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" else header.strip()

    def _token(self, params: dict[str, list[str]], truncate: bool) -> None:
        def one(key: str) -> str | None:
            values = params.get(key)
            return values[0] if values else None

        def refuse(status: int, error: str, description: str) -> None:
            body = json.dumps({"error": error, "error_description": description}).encode()
            self._send(status, body, "application/json")

        client_id, grant = one("client_id"), one("grant_type")
        if client_id is None or client_id.lower() != "nbia":
            return refuse(401, "unauthorized_client", "Invalid client or Invalid client credentials")
        if grant == "password":
            user, password = one("username"), one("password")
            if user is None or password is None or not check_password(self.emu.passwords, user, password):
                return refuse(401, "invalid_grant", "Invalid user credentials")
            reply = self.emu.tokens.issue(user)
        elif grant == "refresh_token":
            refreshed = self.emu.tokens.refresh(one("refresh_token") or "")
            if refreshed is None:
                return refuse(401, "invalid_grant", "Invalid refresh token")
            reply = refreshed
        else:
            return refuse(400, "unsupported_grant_type", "Unsupported grant_type")
        self._send(200, json.dumps(reply).encode(), "application/json", truncate)

    def _logout(self, params: dict[str, list[str]], truncate: bool) -> None:
        token = self._bearer()
        if token:
            self.emu.tokens.revoke(token)
        self._send(200, b"You Have Logged Out successfully.", "text/plain", truncate)

    # ---- search API ----------------------------------------------------------------------------
    def _search(self, version: str, name: str, params: dict[str, list[str]], truncate: bool) -> None:
        if version == "v2":
            token = self._bearer()
            if token is None:
                raise _HttpError(500, NO_AUTH_BODY)
            user = self.emu.tokens.user_for(token)
            if user is None and name not in HIDES_AUTH_FAILURE:
                raise _HttpError(401, b'{"error":"invalid_token","error_description":"Invalid access token"}',
                                 "application/json")
        else:
            user = GUEST_USER
        arch = self.emu.archive
        style = "v2" if version == "v2" else "v4"

        def one(key: str, required: bool = False) -> str | None:
            values = params.get(key)
            if not values or values[0] == "":
                if required:
                    raise _bad_request(f"missing parameter {key}")
                return None
            return values[0]

        def visible_series(uid: str) -> SeriesEntry | None:
            entry = arch.series_by_uid(uid)
            return entry if entry is not None and arch.is_visible(entry.collection, user) else None

        if name == "getCollectionValues":
            rows = [{"Collection": c.name} for c in arch.visible_collections(user)]
            return self._send_rows(rows, truncate)
        if name == "getPatient":
            coll = one("Collection")
            rows = [R.patient_row(p) for p in arch.patients
                    if arch.is_visible(p.collection, user) and coll in (None, p.collection)]
            return self._send_rows(rows, truncate)
        if name == "getPatientStudy":
            coll, pid, suid = one("Collection"), one("PatientID"), one("StudyInstanceUID")
            if coll is None and pid is None and suid is None:
                raise _bad_request("one of Collection, PatientID, StudyInstanceUID is required")
            rows = [R.study_row(arch, s, style) for s in arch.studies
                    if arch.is_visible(s.collection, user) and coll in (None, s.collection)
                    and pid in (None, s.patient_id) and suid in (None, s.uid)]
            return self._send_rows(rows, truncate)
        if name == "getSeries":
            filters = {key: one(key) for key in ("Collection", "PatientID", "StudyInstanceUID", "Modality",
                                                 "BodyPartExamined", "Manufacturer", "ManufacturerModelName",
                                                 "SeriesInstanceUID")}
            rows = [R.series_row(arch, s, style) for s in arch.series
                    if arch.is_visible(s.collection, user) and R.series_matches(s, filters)]
            return self._send_rows(rows, truncate)
        if name == "getUpdatedSeries":
            since = _parse_date(one("fromDate", required=True) or "")
            rows = [R.series_row(arch, s, style) for s in arch.series
                    if arch.is_visible(s.collection, user) and s.timestamp.date() >= since]
            return self._send_rows(rows, truncate)
        if name == "getSOPInstanceUIDs":
            entry = visible_series(one("SeriesInstanceUID", required=True) or "")
            instances = arch.instances_of(entry.uid) if entry else []
            random.Random(entry.uid if entry else 0).shuffle(instances)  # deterministic, not instance order
            return self._send_rows([{"SOPInstanceUID": i.sop_uid} for i in instances], truncate)
        if name == "getSeriesSize":
            entry = visible_series(one("SeriesInstanceUID", required=True) or "")
            rows = [{"TotalSizeInBytes": entry.file_size, "ObjectCount": entry.image_count}] if entry else []
            return self._send_rows(rows, truncate)
        if name == "getSingleImage":
            series_uid = one("SeriesInstanceUID", required=True) or ""
            sop_uid = one("SOPInstanceUID", required=True) or ""
            entry = visible_series(series_uid)
            inst = arch.instance_by_uid(sop_uid)
            if entry is None or inst is None or inst.series_uid != entry.uid:
                raise _HttpError(500, NO_AUTH_BODY)
            data = Path(inst.path).read_bytes()
            return self._send(200, data, "application/dicom", truncate,
                              headers=[("Content-Disposition", f'attachment; filename="{sop_uid}.dcm"')])
        if name == "getM5HashForImage":
            inst = arch.instance_by_uid(one("SOPInstanceUid", required=True) or "")
            if inst is None or not visible_series(inst.series_uid):
                raise _HttpError(500, NO_AUTH_BODY)
            return self._send(200, inst.md5.encode(), "text/plain", truncate)
        if name in ("getImage", "getImageWithMD5Hash"):
            series_uid = one("SeriesInstanceUID", required=True) or ""
            entry = visible_series(series_uid)
            if entry is None:
                raise _bad_request("series not found or not authorized")
            instances = arch.instances_of(entry.uid)
            if truncate:  # what the real server does when files are missing: a short zip, status 200
                instances = instances[: len(instances) // 2]
            if name == "getImage":
                new_names = (one("NewFileNames") or "").lower() == "yes"
                members = [("LICENSE", lambda: R.license_text(arch, entry).encode("utf-8"))]
                members += [(R.zip_name(pos, new_names), _reader(inst)) for pos, inst in enumerate(instances, 1)]
            else:
                members = [(f"{pos:08d}.dcm", _reader(inst)) for pos, inst in enumerate(instances, 1)]
                csv = "Filename,MD5Hash\n" + "".join(f"{pos:08d}.dcm,{inst.md5}\n"
                                                      for pos, inst in enumerate(instances, 1))
                members.append(("md5hashes.csv", lambda: csv.encode()))
            return self._send_zip(members, f"{entry.uid}.zip")
        raise _HttpError(404, b"Not Found")

    # ---- advanced API --------------------------------------------------------------------------
    def _advanced(self, name: str, params: dict[str, list[str]], truncate: bool) -> None:
        user = self.emu.tokens.user_for(self._bearer())
        if user is None:
            raise _HttpError(401, b'{"error":"invalid_token","error_description":"Full authentication is '
                                  b'required to access this resource"}', "application/json")
        arch = self.emu.archive
        if name == "getStudyDrillDownWithSeriesIds":
            uids = [u for u in params.get("list", []) if u]
            if not uids:
                raise _bad_request("missing parameter list")
            chosen = [s for s in (arch.series_by_uid(u) for u in dict.fromkeys(uids))
                      if s is not None and arch.is_visible(s.collection, user)]
            return self._send_rows(R.study_drilldown(arch, chosen), truncate)
        if name == "getImageDrillDown":
            raw = [v for v in params.get("list", []) if v]
            if not raw:
                raise _bad_request("missing parameter list")
            try:
                pks = [int(v) for v in raw]
            except ValueError as exc:
                raise _bad_request("list must hold seriesPkId integers") from exc
            rows: list[dict[str, Any]] = []
            for pk in dict.fromkeys(pks):
                entry = arch.series_by_pk(pk)
                if entry is None or not arch.is_visible(entry.collection, user):
                    continue
                instances = arch.instances_of(entry.uid)
                random.Random(pk).shuffle(instances)  # the real order is the database's, not instance order
                rows += [R.image_drilldown_row(entry, inst) for inst in instances]
            return self._send_rows(rows, truncate)
        if name == "getCollectionDescriptions":
            wanted = (params.get("collectionName") or [""])[0] or None
            rows = [R.collection_description_row(c) for c in arch.visible_collections(user)
                    if wanted in (None, c.name)]
            return self._send_rows(rows, truncate)
        if name == "getLicenses":
            return self._send_rows([R.license_row(x) for x in arch.licenses], truncate)
        raise _HttpError(404, b"Not Found")

    # ---- control endpoints ---------------------------------------------------------------------
    def _control(self, method: str, action: str, params: dict[str, list[str]]) -> None:
        emu = self.emu
        ok = b'{"ok":true}'
        if action == "stats" and method == "GET":
            return self._send(200, json.dumps(dict(emu.stats()), sort_keys=True).encode())
        if method != "POST":
            raise _HttpError(405, b"use POST")
        if action == "reset-stats":
            emu.reset_stats()
        elif action == "expire-tokens":
            emu.expire_tokens()
        elif action == "clear-faults":
            emu.clear_faults()
        elif action in ("faults", "refuse-refresh"):
            try:
                spec = json.loads(self._json_body or b"{}")
                if not isinstance(spec, dict):
                    raise ValueError("the body must be a JSON object")
                if action == "refuse-refresh":
                    emu.set_refuse_refresh(bool(spec.get("refuse", True)))
                else:
                    unknown = set(spec) - {"endpoint", "status", "count", "delay", "truncate"}
                    if unknown:
                        raise ValueError(f"unknown keys {sorted(unknown)}")
                    emu.inject_fault(str(spec.get("endpoint", "")), status=spec.get("status"),
                                     count=int(spec.get("count", 1)), delay=float(spec.get("delay", 0.0)),
                                     truncate=bool(spec.get("truncate", False)))
            except (ValueError, TypeError) as exc:
                raise _bad_request(f"bad {action} request: {exc}") from exc
        else:
            raise _HttpError(404, b"Not Found")
        self._send(200, ok)


def _reader(inst: InstanceEntry) -> Any:
    return lambda: Path(inst.path).read_bytes()
