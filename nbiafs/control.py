"""The mount's control socket: how ``nbiafs refresh`` (and other commands) ask a running mount to act.

A mount process listens on a Unix socket in the per-user runtime directory (beside its run record,
both private to the user: the directory is 0700, the socket 0600). A request is one line of JSON
(``{"op": "refresh", "path": "/Coll"}``), the answer one line of JSON (``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``). One thread accepts; each connection is served by its own thread, so a
slow refresh never blocks another request. Handlers raise NbiaError for a clear refusal; anything
else is logged and answered as an internal error. Nothing secret is ever sent or logged.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import NbiaError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_REQUEST = 64 * 1024
#: How long a client waits for an answer by default (a refresh lists a folder: a call's deadline).
DEFAULT_TIMEOUT = 180.0


class ControlServer:
    """Serves ``handlers`` (op -> handler) on the Unix socket ``path`` until :meth:`close`."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        owner = self

        class Connection(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                owner._serve(self)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self._handlers = handlers
        try:
            path.unlink()  # a socket left by a process that was killed
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self._server = Server(str(path), Connection)
        finally:
            os.umask(old)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="nbiafs-control", daemon=True)
        self._thread.start()

    def _serve(self, conn: socketserver.StreamRequestHandler) -> None:
        line = conn.rfile.readline(MAX_REQUEST)
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            handler = self._handlers.get(str(request.get("op")))
            if handler is None:
                reply: dict[str, Any] = {"ok": False, "error": f"unknown request {request.get('op')!r}"}
            else:
                reply = {"ok": True, **handler(request)}
        except ValueError as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        except NbiaError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}"}
        try:
            conn.wfile.write((json.dumps(reply, ensure_ascii=False) + "\n").encode("utf-8"))
        except OSError:
            pass  # the client went away

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        try:
            self.path.unlink()
        except OSError:
            pass


def request(path: str | Path, message: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Send ``message`` to the control socket at ``path``; its answer. NbiaError when it cannot be asked."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall((json.dumps(message) + "\n").encode("utf-8"))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        raise NbiaError(f"the mount did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise NbiaError(f"cannot reach the mount's control socket {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise NbiaError("the mount's answer was not understood") from None
    if not isinstance(reply, dict):
        raise NbiaError("the mount's answer was not understood")
    return reply
