"""Real HTTP servers on 127.0.0.1 for the client and token tests that `responses` cannot fake.

`LocalServer` owns the plumbing (free port, serving thread, shutdown); `DripServer` announces a body
and sends it one byte every few milliseconds, well within any read timeout, until it is closed.
"""

from __future__ import annotations

import http.server
import threading


class LocalServer:
    """Serve ``handler`` (a BaseHTTPRequestHandler class) on a free port until :meth:`close`."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class DripServer(LocalServer):
    """Answers every GET and POST with a 100000-byte body sent one ``filler`` byte at a time."""

    def __init__(self, filler: bytes = b"x", content_type: str | None = None) -> None:
        self.stop = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.command == "POST":
                    self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(200)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                try:
                    while not owner.stop.wait(0.005):  # each byte well within the read timeout
                        self.wfile.write(filler)
                        self.wfile.flush()
                except OSError:
                    pass  # the client gave up and closed the connection

            do_POST = do_GET

            def log_message(self, *args) -> None:
                pass

        super().__init__(Handler)

    def close(self) -> None:
        self.stop.set()
        super().close()
