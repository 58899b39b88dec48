"""``dinolab serve``: a local web page to explore features of a folder of images (standard library only).

Routes (all answers to ``/api/*`` are JSON; a refusal is ``{"error": "..."}`` with a 4xx status):

    GET  /                       the page (static/index.html)
    GET  /static/<name>          page assets (only files shipped in dinolab/viz/static)
    GET  /api/config             patch size, image size, upload limit
    GET  /api/images             ids of the folder's images
    GET  /api/image?id=ID        the image as the model sees it (PNG)
    POST /api/upload             raw image bytes, Content-Type image/* -> {"id": "upload:..."}
    GET  /api/pca?id=A&id=B      PCA maps coloured together
    GET  /api/similarity?src=ID&row=R&col=C&id=A&id=B   cosine similarity of one patch
    GET  /api/neighbours?id=ID&k=K                        nearest folder images by class token

It binds 127.0.0.1 by default and has no authentication: anyone who can reach the port can read
the served folder's images, so only bind another address on a trusted network.

Each connection has its own thread; a client silent for :attr:`ExplorerHandler.timeout` seconds
(sending nothing, or not reading the answer) is disconnected, so slow clients cannot pile up
threads. A refused upload (413 over the limit, 411, 400) is answered before its body is read; the
server then ends its side and reads and drops the body (bounded), so that the client, still sending,
gets the answer instead of a reset connection.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import torch

from dinolab.viz.explorer import ApiError, Explorer, ExplorerConfig

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """Defaults of ``dinolab serve``.

    Attributes:
        root: folder whose images (recursively) the page offers.
        arch, weights: the backbone (``weights=None``: random initialisation, for trying the tool only).
        host, port: where to listen; port 0 picks a free port.
        quiet: no request log on stderr.
        explorer: image size and input limits.
    """

    root: str = "."
    arch: str = "vits14"
    weights: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    quiet: bool = False
    explorer: ExplorerConfig = field(default_factory=ExplorerConfig)


class ExplorerServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the :class:`Explorer` its handlers query."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], explorer: Explorer, quiet: bool = False) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6  # read by the base class when it creates the socket
        super().__init__(address, ExplorerHandler)
        self.explorer, self.quiet = explorer, quiet

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _query_int(query: dict[str, list[str]], name: str, default: int | None = None) -> int:
    values = query.get(name)
    if not values:
        if default is None:
            raise ApiError(400, f"missing parameter {name!r}")
        return default
    try:
        return int(values[0])
    except ValueError:
        raise ApiError(400, f"parameter {name!r} must be an integer, got {values[0]!r}") from None


def _query_str(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    if not values or not values[0]:
        raise ApiError(400, f"missing parameter {name!r}")
    return values[0]


class ExplorerHandler(BaseHTTPRequestHandler):
    """Routes requests to the server's :class:`Explorer`; turns :class:`ApiError` into JSON errors."""

    server: ExplorerServer
    protocol_version = "HTTP/1.1"
    # Seconds a socket read or write may wait (socketserver applies it to each connection): a client
    # that sends nothing (or stops mid-request, or never reads) is disconnected and its thread ends.
    timeout: float | None = 30.0
    # After refusing an upload whose body is unread, read and drop at most this much of it, for at
    # most this long, before closing: closing with unread data would reset the connection, and the
    # client (still sending) would see a broken pipe instead of the 413.
    drain_bytes = 64 * 2**20
    drain_seconds = 10.0
    _unread: int | None = 0  # body bytes of the current request not read yet (None: unknown)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's signature)
        if not self.server.quiet:
            super().log_message(format, *args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def _dispatch(self, route) -> None:
        url = urlsplit(self.path)
        self._unread = 0
        try:
            try:
                route(url.path, parse_qs(url.query))
            except ApiError as err:
                if self.command == "POST":
                    self.close_connection = True  # a refused body may be unread: never reuse the connection
                self._send_json({"error": err.message}, err.status)
                if self.command == "POST" and self._unread != 0:
                    self._discard_unread_body()
            except (TimeoutError, ConnectionError):
                raise
            except Exception:  # noqa: BLE001 (a bug must not kill the server nor leak a traceback to the page)
                traceback.print_exc(file=sys.stderr)
                self._send_json({"error": "internal error (see the server log)"}, 500)
        except (TimeoutError, ConnectionError) as err:  # the client is too slow or gone: drop the connection
            self.close_connection = True
            self.log_error("connection dropped: %r", err)

    def _get(self, path: str, query: dict[str, list[str]]) -> None:
        ex = self.server.explorer
        if path in ("/", "/index.html"):
            self._send_static("index.html")
        elif path.startswith("/static/"):
            self._send_static(path.removeprefix("/static/"))
        elif path == "/api/config":
            self._send_json({"patch_size": ex.model.patch_size, "size": ex.cfg.size,
                             "max_upload_bytes": ex.cfg.max_upload_bytes, "max_selection": ex.cfg.max_selection})
        elif path == "/api/images":
            self._send_json({"images": ex.list_images()})
        elif path == "/api/image":
            self._send_bytes(ex.image_png(_query_str(query, "id")), "image/png")
        elif path == "/api/pca":
            self._send_json({"images": ex.pca(query.get("id", []))})
        elif path == "/api/similarity":
            row, col = _query_int(query, "row"), _query_int(query, "col")
            self._send_json({"maps": ex.similarity(_query_str(query, "src"), row, col, query.get("id", []))})
        elif path == "/api/neighbours":
            self._send_json({"neighbours": ex.neighbours(_query_str(query, "id"), _query_int(query, "k", 8))})
        elif path == "/api/upload":
            raise ApiError(405, "use POST to upload an image")
        else:
            raise ApiError(404, f"no such page {path!r}")

    def _post(self, path: str, query: dict[str, list[str]]) -> None:
        length_header = self.headers.get("Content-Length")
        try:
            length = None if length_header is None else int(length_header)
        except ValueError:
            length = None
        self._unread = length if length is not None and length >= 0 else None
        if path != "/api/upload":
            raise ApiError(404 if not path.startswith("/api/") else 405, f"cannot POST to {path!r}")
        limit = self.server.explorer.cfg.max_upload_bytes
        if length_header is None:
            self.close_connection = True
            raise ApiError(411, "upload needs a Content-Length header")
        if length is None:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {length_header!r}")
        if length > limit or length < 0:
            # Refused before reading the body (the answer comes first, then the body is drained).
            self.close_connection = True
            raise ApiError(413, f"upload of {length} bytes is over the limit of {limit} bytes")
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self._unread, self.close_connection = 0, True  # a stalled client: answer (if it reads) and close
            raise ApiError(408, f"upload body not received within {self.timeout} s") from None
        self._unread = 0
        if len(data) < length:
            self.close_connection = True
            raise ApiError(400, f"upload body ended after {len(data)} of {length} bytes")
        image_id = self.server.explorer.add_upload(data, self.headers.get("Content-Type", ""))
        self._send_json({"id": image_id})

    def _discard_unread_body(self) -> None:
        """Lingering close after a refusal: end our side (the answer is complete), then read and drop
        the unread body (``Content-Length`` bytes, or until the client stops if unknown), at most
        :attr:`drain_bytes` / :attr:`drain_seconds`; the connection is closed afterwards."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            return
        remaining = self.drain_bytes if self._unread is None else min(self._unread, self.drain_bytes)
        deadline = time.monotonic() + self.drain_seconds
        try:
            while remaining > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.connection.settimeout(min(left, self.timeout) if self.timeout else left)
                chunk = self.rfile.read1(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:  # timed out or reset: nothing more to do, the connection is closed next
            pass
        self._unread = 0

    def _send_static(self, name: str) -> None:
        static = resources.files("dinolab.viz") / "static"
        # Only names of files shipped in static/ are served: no path arithmetic on user input.
        shipped = {entry.name: entry for entry in static.iterdir() if entry.is_file()}
        if name not in shipped or Path(name).suffix not in STATIC_TYPES:
            raise ApiError(404, f"no such file {name!r}")
        self._send_bytes(shipped[name].read_bytes(), STATIC_TYPES[Path(name).suffix])

    def _send_json(self, obj: dict, status: int = 200) -> None:
        self._send_bytes(json.dumps(obj).encode("utf-8"), "application/json", status)

    def _send_bytes(self, body: bytes, content_type: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def make_server(cfg: ServeConfig, model: torch.nn.Module | None = None) -> ExplorerServer:
    """Build (but do not start) the server; ``model`` overrides ``cfg.arch``/``cfg.weights`` (tests)."""
    if model is None:
        from dinolab.viz.patches import load_model

        model = load_model(cfg.arch, cfg.weights)
    return ExplorerServer((cfg.host, cfg.port), Explorer(model, cfg.root, cfg.explorer), quiet=cfg.quiet)


def serve(cfg: ServeConfig, model: torch.nn.Module | None = None) -> None:
    """Run the explorer until Ctrl-C."""
    server = make_server(cfg, model)
    if cfg.host not in LOOPBACK:
        print(f"warning: listening on {cfg.host}: the explorer has no authentication", file=sys.stderr)
    print(f"dinolab serve: {server.explorer.root} at {server.url} (Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
