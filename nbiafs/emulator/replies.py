"""What an endpoint handler is given (:class:`Request`) and what it gives back (:class:`Reply`).

Handlers are plain functions ``(emulator, request) -> Reply``; they never touch the socket. The
server's writer (:mod:`.server`) owns the wire: status line, headers, chunking, bandwidth shaping,
truncation and corruption of fixed-length bodies. So a reply says only *what* to send:

* ``body`` bytes, or ``file`` (a path streamed from disk in chunks, never read whole), both sent
  with a Content-Length;
* or ``stream``, an iterator of byte pieces sent with ``Transfer-Encoding: chunked`` (the zips).
  A stream applies a fault's truncation/corruption itself (a short zip, a corrupted member with a
  matching CRC), because only the producer knows where the members are.

``api`` marks an answer of the NBIA application itself (Spring Boot): it gets Spring Security's
default no-cache headers. Answers from a "proxy" (injected faults) and from other services
(DataCite, the control endpoints) do not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

#: Spring Security's default response headers (``HeadersConfigurer``): what a caching proxy in front
#: of the real server must be told to ignore.
SPRING_HEADERS: tuple[tuple[str, str], ...] = (
    ("Cache-Control", "no-cache, no-store, max-age=0, must-revalidate"),
    ("Pragma", "no-cache"),
    ("Expires", "0"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-XSS-Protection", "1; mode=block"),
    ("X-Frame-Options", "DENY"),
)


@dataclass(frozen=True, slots=True)
class Fault:
    """What a scheduled fault does to one call (see :mod:`.control`)."""

    endpoint: str
    status: int | None = None
    delay: float = 0.0
    truncate: bool = False
    corrupt: bool = False


@dataclass(frozen=True, slots=True)
class Call:
    """Who is calling which endpoint of which API: what a handler knows besides the request.

    ``api`` is ``v1``/``v2``/``v4`` (search), ``advanced``, ``oauth``, ``datacite``; ``user`` the
    account the call runs as (``None``: nobody, e.g. a v2 call with a dead token on an endpoint
    that hides it); ``style`` how dates are written (``v2``, ``v4`` or ``advanced``).
    """

    api: str
    name: str
    user: str | None = None

    @property
    def style(self) -> str:
        return {"v2": "v2", "advanced": "advanced"}.get(self.api, "v4")

    @property
    def versioned(self) -> str:
        return f"{self.api}/{self.name}"


@dataclass(slots=True)
class Request:
    """One parsed HTTP request. ``query`` and ``form`` are kept apart: v4 checks their names."""

    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    json_body: bytes
    headers: Message
    fault: Fault | None = None

    @property
    def params(self) -> dict[str, list[str]]:
        merged = {k: list(v) for k, v in self.query.items()}
        for key, values in self.form.items():
            merged.setdefault(key, []).extend(values)
        return merged

    def one(self, key: str, required: bool = False) -> str | None:
        """The first non-empty value of ``key`` (query first, then form); 400 when required and absent."""
        for source in (self.query, self.form):
            values = [v for v in source.get(key, ()) if v != ""]
            if values:
                return values[0]
        if required:
            raise bad_request(f"missing parameter {key}")
        return None

    def many(self, key: str) -> list[str]:
        """Every non-empty value of ``key``, comma-separated values split (forms like ``list=a,b``)."""
        out: list[str] = []
        for values in (self.query.get(key, ()), self.form.get(key, ())):
            for value in values:
                out += [part.strip() for part in value.split(",") if part.strip()]
        return out

    def bearer(self) -> str | None:
        header = self.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, value = header.strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" else header.strip()


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer. Exactly one of ``body``/``file``/``stream`` carries the content (``body`` by default)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    file: Path | None = None
    file_size: int | None = None
    stream: Iterable[bytes] | None = field(default=None, compare=False)
    api: bool = True


class HttpError(Exception):
    """Raised by a handler to answer an error status (a :class:`Reply` in exception form)."""

    def __init__(self, status: int, body: bytes = b"", content_type: str = "text/plain",
                 headers: tuple[tuple[str, str], ...] = (), api: bool = True) -> None:
        super().__init__(status)
        self.reply = Reply(status, body, content_type, headers, api=api)


def bad_request(message: str) -> HttpError:
    return HttpError(400, message.encode("utf-8"))


def not_found() -> HttpError:
    """What a server without the route answers (Spring Boot's default error page, as JSON)."""
    return HttpError(404, b'{"status":404,"error":"Not Found"}', "application/json")


def rows(data: list[dict[str, Any]], fmt: str | None = None) -> Reply:
    """JSON rows, or CSV with ``format=csv``; an empty result is 200 with an EMPTY body (not ``[]``)."""
    if not data:
        return Reply(200, b"", "application/json")
    if fmt is not None and fmt.lower() == "csv":
        from .tables import csv_text

        columns = list(dict.fromkeys(k for row in data for k in row))
        return Reply(200, csv_text(columns, [[row.get(c, "") for c in columns] for row in data]).encode("utf-8"),
                     "text/csv")
    return Reply(200, json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def text(body: str | bytes, content_type: str = "text/plain") -> Reply:
    return Reply(200, body.encode("utf-8") if isinstance(body, str) else body, content_type)


def proxy_page(status: int) -> Reply:
    """The page nginx answers an error with: what a client sees from a proxy in front of the server."""
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    title = f"{status} {phrase}"
    page = (f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
            "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
    return Reply(status, page.encode("ascii"), "text/html", (("Server", "nginx"),), api=False)


def iter_file(path: Path, chunk_size: int, corrupt_at: Iterable[int] = ()) -> Iterator[bytes]:
    """A file's bytes in chunks, with the bytes at ``corrupt_at`` offsets flipped."""
    from .control import flip

    marks = sorted(corrupt_at)
    offset = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            if marks:
                chunk = flip(chunk, offset, marks)
            offset += len(chunk)
            yield chunk
