"""A real nginx started from the shipped cache configuration (docs/deploy/nginx/), for tests and benchmarks.

:class:`NginxProxy` renders ``nbiafs-cache.conf`` and the standalone ``nginx.conf`` exactly as a user
would (the three ``${...}`` placeholders filled in, nothing else touched, except ``user root;`` put in
front when running as root so that the workers can reach a temporary directory only root may enter),
checks them with ``nginx -t``, runs ``nginx -p DIR -c DIR/nginx.conf`` in the foreground on a free
127.0.0.1 port, waits until the port accepts connections, and stops it (graceful, then forced, the
workers included) in :meth:`NginxProxy.stop`.

:class:`SpringLikeUpstream` is a small NBIA-shaped server that answers the way the real Spring Boot
server marks its answers (``Cache-Control: no-cache, no-store, max-age=0, must-revalidate``,
``Pragma: no-cache``, ``Expires: 0``, a session cookie, CORS ``Vary``), records every request it gets,
and can be told to answer empty or change its content, for what the emulator cannot show.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from localhttp import LocalServer

from nbiafs import daemon

REPO = Path(__file__).resolve().parents[1]
DEPLOY_DIR = REPO / "docs" / "deploy" / "nginx"
SNIPPET = DEPLOY_DIR / "nbiafs-cache.conf"
STANDALONE = DEPLOY_DIR / "nginx.conf"
#: The only values a user sets, as ``${NAME}`` placeholders in the shipped snippet.
PLACEHOLDERS = ("NBIAFS_UPSTREAM", "NBIAFS_LISTEN", "NBIAFS_CACHE_DIR")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render(text: str, values: dict[str, str]) -> str:
    """``envsubst '${A} ${B}'`` semantics: replace ``${NAME}`` for the named variables only.

    nginx's own ``$variables`` are left alone; a ``${...}`` left without a value is an error (a
    placeholder renamed in the shipped file must not silently reach nginx).
    """
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"no value for the placeholder ${{{name}}}")
        return values[name]

    return _PLACEHOLDER.sub(one, text)


def placeholders_in(text: str) -> set[str]:
    return set(_PLACEHOLDER.findall(text))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx's workers, cache manager and loader)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(entry))
    return out


@dataclass(frozen=True)
class LogLine:
    """One line of the access log written in the shipped ``nbiafs_cache`` format."""

    method: str
    uri: str
    status: int
    cache: str      # HIT, MISS, BYPASS, EXPIRED, ... or "-" (a location that does not cache)
    auth: str       # "anon" or "token"


_LOG_LINE = re.compile(r'"(?P<method>\S+) (?P<uri>\S+)" (?P<status>\d{3}) \d+ cache=(?P<cache>\S*) '
                       r'auth=(?P<auth>\S+) ')


class NginxProxy:
    """nginx from the shipped config in front of ``upstream`` (a base URL), under ``workdir``."""

    def __init__(self, upstream: str, workdir: Path, *, nginx: str = "nginx") -> None:
        self.upstream = upstream.rstrip("/")
        self.workdir = Path(workdir)
        self.nginx = nginx
        self.cache_dir = self.workdir / "cache"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    # ---- paths -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def conf(self) -> Path:
        return self.workdir / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    def error_log_text(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def log_lines(self) -> list[LogLine]:
        """The access log so far (complete only for requests nginx has finished: see :meth:`stop`)."""
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            m = _LOG_LINE.search(line)
            if m:
                out.append(LogLine(m["method"], m["uri"], int(m["status"]), m["cache"] or "-", m["auth"]))
        return out

    # ---- lifecycle ---------------------------------------------------------------------------
    def render(self, port: int) -> None:
        """Write the shipped files, their placeholders filled in, into the working directory."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        values = {"NBIAFS_UPSTREAM": self.upstream, "NBIAFS_LISTEN": f"127.0.0.1:{port}",
                  "NBIAFS_CACHE_DIR": str(self.cache_dir)}
        (self.workdir / "nbiafs-cache.conf").write_text(render(SNIPPET.read_text(), values))
        standalone = render(STANDALONE.read_text(), values)
        if os.geteuid() == 0:
            # As root the master hands the work to an unprivileged user, who cannot enter pytest's
            # temporary directories (mode 0700): keep the workers root, in the test only.
            standalone = "user root;\n" + standalone
        self.conf.write_text(standalone)

    def start(self, timeout: float = 30.0, attempts: int = 5) -> NginxProxy:
        """Render, check (``nginx -t``) and start nginx; return once its port accepts connections."""
        for attempt in range(attempts):
            port = free_port()
            self.render(port)
            check = subprocess.run([self.nginx, "-t", "-q", "-p", str(self.workdir), "-c", str(self.conf)],
                                   capture_output=True, text=True, timeout=60)
            if check.returncode != 0:
                raise RuntimeError(f"nginx -t refused the rendered config:\n{check.stderr}\n{self.error_log_text()}")
            try:
                self.error_log.unlink()
            except FileNotFoundError:
                pass
            self.port = port
            self.process = subprocess.Popen([self.nginx, "-p", str(self.workdir), "-c", str(self.conf)],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
            if self._wait_listening(timeout):
                return self
            stderr = self._reap()
            text = stderr + self.error_log_text()
            if "Address already in use" in text and attempt + 1 < attempts:
                continue  # another program took the free port between our probe and nginx's bind
            raise RuntimeError(f"nginx did not start on port {port}:\n{text}")
        raise AssertionError("unreachable")

    def _wait_listening(self, timeout: float) -> bool:
        """Connect until the port answers; False as soon as nginx has exited (or at the timeout)."""
        end = time.monotonic() + timeout
        tick = threading.Event()
        while time.monotonic() < end:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return True
            except OSError:
                tick.wait(0.02)
        return False

    def _reap(self) -> str:
        proc, self.process = self.process, None
        if proc is None:
            return ""
        if proc.poll() is None:
            self._stop_process(proc, 5.0)
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        return stderr

    @staticmethod
    def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
        """SIGQUIT (graceful: running requests finish and are logged), then SIGKILL of all of them."""
        children = _children(proc.pid)
        for sig in (signal.SIGQUIT, signal.SIGTERM):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout)
        for pid in children:
            if not daemon.wait_for_exit(pid, timeout):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                daemon.wait_for_exit(pid, timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop nginx and every process it started. Idempotent; never leaves a process behind."""
        proc, self.process = self.process, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self._stop_process(proc, timeout)
        finally:
            if proc.stderr:
                proc.stderr.close()

    def __enter__(self) -> NginxProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------ a Spring-like server
SPRING_HEADERS = (
    ("Cache-Control", "no-cache, no-store, max-age=0, must-revalidate"),
    ("Pragma", "no-cache"),
    ("Expires", "0"),
    ("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
    ("Set-Cookie", "JSESSIONID=0123456789ABCDEF; Path=/nbia-api; HttpOnly"),
)


@dataclass(frozen=True)
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class SpringLikeUpstream(LocalServer):
    """NBIA-shaped answers with the real server's no-cache headers; records what reaches it.

    * ``GET .../v4/getSingleImage?SOPInstanceUID=X``: ``b"DICM-X-v<version>"``, or an empty 200 when X
      is in ``empty_instances``;
    * ``GET .../v4/getSeries``: ``listing`` (b"" = v4's empty result);
    * ``POST .../v4/getImageDrillDown`` (form ``list``): JSON naming the posted ``list`` values;
    * ``GET .../v2/getSeries``: JSON naming the bearer token it was asked with.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.version = 1
        self.empty_instances: set[str] = set()
        self.listing = b'[{"SeriesInstanceUID":"1.2.3"}]'
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                with owner.lock:
                    owner.seen.append(Seen(self.command, parts.path, parts.query,
                                           {k.lower(): v for k, v in self.headers.items()}, body))
                    version = owner.version
                status, payload, ctype = owner.answer(self.command, parts.path, parse_qs(parts.query),
                                                      parse_qs(body.decode("utf-8", "replace")),
                                                      self.headers.get("Authorization"), version)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in SPRING_HEADERS:
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_HEAD = _answer

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(Handler)

    def answer(self, method: str, path: str, query: dict[str, list[str]], form: dict[str, list[str]],
               authorization: str | None, version: int) -> tuple[int, bytes, str]:
        endpoint = path.rsplit("/", 1)[-1]
        if "/v4/" in path and endpoint == "getSingleImage":
            sop = (query.get("SOPInstanceUID") or [""])[0]
            if sop in self.empty_instances:
                return 200, b"", "application/dicom"
            return 200, f"DICM-{sop}-v{version}".encode(), "application/dicom"
        if "/v4/" in path and endpoint == "getSeries":
            return 200, self.listing, "application/json"
        if "/v4/" in path and endpoint == "getImageDrillDown" and method == "POST":
            return 200, json.dumps({"list": form.get("list", []), "version": version}).encode(), "application/json"
        if "/v2/" in path and endpoint == "getSeries":
            return 200, json.dumps({"token": authorization, "version": version}).encode(), "application/json"
        return 404, b"Not Found", "text/plain"

    def requests_to(self, endpoint: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path.rsplit("/", 1)[-1] == endpoint]
