"""The emulator's HTTP server: lifecycle, request parsing, dispatch, and writing answers on the wire.

What each URL is lives in :mod:`.routes` (and the handlers it names), what tests steer in
:mod:`.control` and :mod:`.controlapi`, how fast bytes may go in :mod:`.shaping`. This module owns:

* :class:`Emulator`, the public object: start/stop, the archive it serves (swapped atomically by
  :meth:`Emulator.add_series`: a handler reads ``emu.archive`` once and keeps that snapshot), and
  the Python side of every control (faults, stats, shaping, tokens).
* the per-request pipeline: count the call, wait the latency, take a fault (a status fault answers
  with a proxy's HTML page), authorize, run the handler, write its :class:`~.replies.Reply`.
* the writer: bodies go out in 64 KiB pieces, each paced by the connection's and the link's caps
  and counted in the byte stats; files are streamed from disk; ``stream`` replies are chunked;
  truncation (half the body, then the connection is cut) and length-preserving corruption of
  fixed-length bodies happen here. NBIA answers carry Spring Security's no-cache headers.

One stdlib ``ThreadingHTTPServer``, HTTP/1.1 keep-alive, a thread per connection (tracked, so
``stop()`` closes every connection and joins every thread).
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import controlapi, routes
from .accounts import account_passwords
from .archive import Archive, ensure_archive
from .control import FaultBook, Stats, corrupt_offsets, flip
from .replies import SPRING_HEADERS, Fault, HttpError, Reply, Request, iter_file, not_found, proxy_page
from .shaping import CHUNK_SIZE, Shaper
from .tokens import TokenStore

log = logging.getLogger(__name__)

#: Kept for importers of the old module layout.
from .downloads import NO_AUTH_BODY  # noqa: E402
from .routes import HIDES_AUTH_FAILURE  # noqa: E402

__all__ = ["Emulator", "NO_AUTH_BODY", "HIDES_AUTH_FAILURE"]


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that tracks its connection threads so that stop() can close and join them."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: Emulator) -> None:
        self.emulator = emulator
        self._conn_lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
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

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (a zip read only in part, a reader killed) is normal: logged, no trace."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, TimeoutError)):
            log.debug("connection from %s closed by the client: %s", client_address, exc)
            return
        super().handle_error(request, client_address)

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
    """An NBIA-compatible server over an archive. See :mod:`nbiafs.emulator` and ``docs/architecture.md``.

    ``profile``: which archive to build in an empty ``data_dir`` (``None``: the sample archive, or
    whatever archive ``data_dir`` already holds; see :func:`~.archive.ensure_archive`). ``oauth``,
    ``v4``, ``datacite``: the server's shape (:class:`~.routes.ServerShape`). ``latency`` (seconds
    before each answer), ``per_connection`` and ``link`` (bytes/s caps, ``None`` = unlimited): the
    shaping, changeable at run time with :meth:`set_shaping`.
    """

    def __init__(self, data_dir: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0,
                 token_ttl: float = 7200.0, refresh_ttl: float | None = None, refuse_refresh: bool = False,
                 latency: float = 0.0, *, profile: str | None = None, oauth: bool = True, v4: bool = True,
                 datacite: bool = True, per_connection: float | None = None, link: float | None = None) -> None:
        self.shape = routes.ServerShape(oauth=oauth, v4=v4, datacite=datacite)
        self.archive: Archive = ensure_archive(data_dir, profile=profile)
        self.host, self._port = host, port
        self.shaper = Shaper(latency, per_connection, link)
        self.tokens = TokenStore(token_ttl, refresh_ttl, refuse_refresh=refuse_refresh)
        self.passwords = account_passwords()
        self._stats = Stats()
        self._faults = FaultBook()
        self._mutate_lock = threading.Lock()
        self._reported_sizes: dict[str, int] = {}  # sop uid -> the size the drill-downs claim (a lie)
        self._scratch: Path | None = None
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

    # ---- statistics ----------------------------------------------------------------------------
    def count(self, endpoint: str, versioned: str | None = None) -> None:
        self._stats.call(endpoint, versioned or endpoint)

    def stats(self) -> collections.Counter[str]:
        """Calls per plain endpoint name (``getSingleImage``, ``getSeries``, ``token``, ``logout``, ``dois``)."""
        return self._stats.calls()

    def versioned_stats(self) -> collections.Counter[str]:
        """Calls per versioned name: ``v2/getSeries``, ``v4/getSeries``, ``advanced/getImageDrillDown``,
        ``oauth/token``, ``datacite/dois``..."""
        return self._stats.calls(versioned=True)

    def bytes_sent(self, versioned: bool = False) -> collections.Counter[str]:
        """Body bytes written per endpoint (plain or versioned names), truncated bodies counted as sent."""
        return self._stats.bytes_sent(versioned)

    def served_instance(self, sop_uid: str) -> None:
        self._stats.instance_served(sop_uid)

    def instance_fetches(self) -> collections.Counter[str]:
        """``getSingleImage`` answers per SOPInstanceUID since the last reset."""
        return self._stats.instances()

    def stats_snapshot(self) -> dict[str, dict[str, int]]:
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self._stats.reset()

    # ---- tokens --------------------------------------------------------------------------------
    def expire_tokens(self) -> None:
        self.tokens.expire_all()

    def set_refuse_refresh(self, refuse: bool) -> None:
        self.tokens.set_refuse_refresh(refuse)

    # ---- faults --------------------------------------------------------------------------------
    def inject_fault(self, endpoint: str, *, status: int | None = None, count: int = 1, delay: float = 0.0,
                     truncate: bool = False, corrupt: bool = False) -> None:
        """The next ``count`` calls of ``endpoint`` misbehave.

        ``endpoint``: a plain name (``getSeries``: any API version), a versioned one (``v4/getSeries``)
        or ``*``. ``status``: answer it, with an nginx-style HTML page (a proxy in front of the
        server). ``delay``: wait first. ``truncate``: a short zip for the zip endpoints, a body cut off
        before its announced Content-Length elsewhere. ``corrupt``: flip a few bytes, keeping the
        length (inside a zip: the first image, in a well-formed entry; the md5s stay true).
        """
        self._faults.add(endpoint, status=status, count=count, delay=delay, truncate=truncate, corrupt=corrupt)

    def clear_faults(self) -> None:
        self._faults.clear()

    def take_fault(self, endpoint: str, versioned: str | None = None) -> Fault | None:
        return self._faults.take(endpoint, versioned or endpoint)

    # ---- shaping -------------------------------------------------------------------------------
    @property
    def latency(self) -> float:
        return self.shaper.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self.shaper.set(latency=seconds)

    def set_shaping(self, *, latency: float | None = None, per_connection: float | None | str = "keep",
                    link: float | None | str = "keep") -> None:
        """Change shaping while serving. Rates in bytes/s; ``None`` or 0 = unlimited; ``"keep"`` = unchanged."""
        self.shaper.set(latency=latency, per_connection=per_connection, link=link)

    def set_latency(self, seconds: float) -> None:
        self.shaper.set(latency=seconds)

    def set_bandwidth(self, per_connection: float | None = None, link: float | None = None) -> None:
        """Set both caps (bytes/s, ``None`` = unlimited)."""
        self.shaper.set(per_connection=per_connection, link=link)

    def shaping(self) -> dict[str, float | None]:
        return self.shaper.settings()

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` (latency, injected delays, pacing); returns at once when the emulator stops."""
        if seconds > 0:
            self._stopping.wait(seconds)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def change_password(self, user: str, password: str) -> None:
        """The identity provider now expects ``password`` for ``user`` (a password changed elsewhere)."""
        self.passwords = {**self.passwords, user: password}

    # ---- metadata that lies -------------------------------------------------------------------
    def report_size(self, sop_uid: str, size: int | None) -> None:
        """Make the drill-downs claim ``size`` bytes for instance ``sop_uid`` (0, negative or wrong, as
        a real database can), while ``getSingleImage`` keeps sending the true file; None: the truth."""
        with self._mutate_lock:
            if size is None:
                self._reported_sizes.pop(sop_uid, None)
            else:
                self._reported_sizes[sop_uid] = int(size)

    def reported_size(self, sop_uid: str, true_size: int) -> int:
        """The size the drill-downs give for ``sop_uid``."""
        with self._mutate_lock:
            return self._reported_sizes.get(sop_uid, true_size)

    # ---- changing the archive while serving ----------------------------------------------------
    def add_series(self, collection: str, *, patient_id: str | None = None, study_uid: str | None = None,
                   like: str | None = None, count: int | None = None, description: str | None = None,
                   modality: str | None = None) -> Any:
        """Publish a new series now; returns its :class:`~.addseries.AddedSeries` (the new UIDs).

        See :func:`.addseries.add_series` for the arguments. Thread-safe: the new archive is built
        beside the current one and swapped in with one assignment, so a request in flight keeps
        the archive it started with.
        """
        from .addseries import add_series

        with self._mutate_lock:
            new_archive, added = add_series(self.archive, self._scratch_dir(), collection, patient_id=patient_id,
                                            study_uid=study_uid, like=like, count=count,
                                            description=description, modality=modality)
            self.archive = new_archive
        log.info("added series %s (%d instances) to %s", added.series_uid, len(added.sop_uids), collection)
        return added

    def _scratch_dir(self) -> Path:
        """Where added series' files live: a temporary folder removed when this object goes away."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="nbiafs-emulator-added-"))
            weakref.finalize(self, shutil.rmtree, str(self._scratch), True)
        return self._scratch


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "NBIA-emulator"
    timeout = 120  # an idle keep-alive connection is closed after two minutes
    # Headers and body go out as separate writes; with Nagle on, the body waits for the client's
    # delayed ACK of the headers (~40 ms a request), which would make the emulator far slower than
    # its --latency says and hide the mount's own costs in every test and benchmark.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self._pacer = self.server.emulator.shaper.connection()

    # ---- plumbing ------------------------------------------------------------------------------
    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
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
            raise HttpError(411, b"chunked request bodies are not supported")
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _request(self, method: str) -> Request:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        body = self._read_body()  # always drained, or the next request on this connection would be garbled
        form: dict[str, list[str]] = {}
        json_body = b""
        if method == "POST":
            ctype = self.headers.get("Content-Type", "")
            if "json" in ctype:
                json_body = body
            elif body:
                form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return Request(method, parts.path, query, form, json_body, self.headers)

    def _dispatch(self, method: str) -> None:
        self._headers_sent = False
        path = urlsplit(self.path).path
        endpoint: str | None = None
        versioned: str | None = None
        fault: Fault | None = None
        try:
            req = self._request(method)
            if path.startswith("/emulator/"):
                self._write(controlapi.handle(self.emu, req, path[len("/emulator/"):]), endpoint, versioned)
                return
            route = routes.resolve(self.emu.shape, method, path)
            if route is None:
                raise not_found()
            endpoint, versioned = route.name, route.versioned
            self.emu.count(endpoint, versioned)
            self.emu.pause(self.emu.latency)
            fault = self.emu.take_fault(endpoint, versioned)
            if fault is not None:
                self.emu.pause(fault.delay)
                if fault.status is not None:
                    self._write(proxy_page(fault.status), endpoint, versioned)
                    return
                req.fault = fault
            call = routes.authorize(self.emu, req, route)
            self._write(route.handler(self.emu, req, call), endpoint, versioned, fault)
        except HttpError as err:
            self._write(err.reply, endpoint, versioned)
        except (TimeoutError, BrokenPipeError, ConnectionResetError) as exc:
            log.debug("client went away during %s: %s", endpoint, exc)
            self.close_connection = True
        except Exception:  # a bug in the emulator must show as a 500, not a dead connection
            log.exception("emulator failure on %s %s", method, self.path)
            if self._headers_sent:
                self.close_connection = True
                return
            try:
                self._write(Reply(500, b"emulator internal error", "text/plain"), endpoint, versioned)
            except OSError:
                self.close_connection = True

    # ---- the writer ----------------------------------------------------------------------------
    def _write(self, reply: Reply, endpoint: str | None, versioned: str | None, fault: Fault | None = None) -> None:
        """Send ``reply``; its body bytes count for ``endpoint`` (``None``: not an NBIA call, not counted)."""
        stream = reply.stream is not None
        truncate = fault is not None and fault.truncate and not stream
        corrupt = fault is not None and fault.corrupt and not stream
        own = dict(reply.headers)
        self.log_request(reply.status)
        self.send_response_only(reply.status)
        self.send_header("Server", own.pop("Server", self.version_string()))
        self.send_header("Date", self.date_time_string())
        self.send_header("Content-Type", reply.content_type)
        size = 0
        if stream:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            size = reply.file_size if reply.file is not None and reply.file_size is not None else (
                reply.file.stat().st_size if reply.file is not None else len(reply.body))
            self.send_header("Content-Length", str(size))
        for name, value in own.items():
            self.send_header(name, value)
        if reply.api and urlsplit(self.path).path.startswith("/nbia-api/"):
            for name, value in SPRING_HEADERS:
                self.send_header(name, value)
        if truncate:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._headers_sent = True
        if stream:
            assert reply.stream is not None
            if not self._send_pieces(reply.stream, endpoint, versioned, chunked=True):
                return
            self.wfile.write(b"0\r\n\r\n")
            return
        marks = corrupt_offsets(size) if corrupt else ()
        if reply.file is not None:
            pieces: Iterable[bytes] = iter_file(reply.file, CHUNK_SIZE, marks)
        else:
            pieces = _slices(flip(reply.body, 0, marks) if marks else reply.body)
        if truncate:
            pieces = _first_bytes(pieces, size // 2)
        self._send_pieces(pieces, endpoint, versioned, chunked=False)
        if truncate:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_pieces(self, pieces: Iterable[bytes], endpoint: str | None, versioned: str | None, *,
                     chunked: bool) -> bool:
        """Write ``pieces`` paced and counted; False when the emulator stopped meanwhile (connection closed)."""
        emu = self.emu
        for piece in pieces:
            for part in _slices(piece):
                if emu.stopping:
                    self.close_connection = True
                    return False
                self._pacer.before_send(len(part), emu.pause)
                if emu.stopping:
                    self.close_connection = True
                    return False
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                if endpoint is not None:
                    emu._stats.sent(endpoint, versioned or endpoint, len(part))
        return True


def _slices(data: bytes) -> Iterator[bytes]:
    if len(data) <= CHUNK_SIZE:
        if data:
            yield data
        return
    view = memoryview(data)
    for start in range(0, len(data), CHUNK_SIZE):
        yield bytes(view[start:start + CHUNK_SIZE])


def _first_bytes(pieces: Iterable[bytes], limit: int) -> Iterator[bytes]:
    left = limit
    for piece in pieces:
        if left <= 0:
            return
        yield piece[:left]
        left -= len(piece)
