"""`unet-ray dashboard`: a small threaded http.server app over one experiment folder.

Routes (GET only; anything else is 404):
    /                       the page (live mode)
    /static/plotly.min.js   plotly.js from the plotly package
    /api/state              trials, statuses and figures as JSON (rebuilt when a file changes)
    /api/predictions        the best checkpoint's masks for a few validation pairs
    /files/<path>           a text file of the experiment folder (params.json, result.json, ...)

It binds to 127.0.0.1 by default. Requests are read-only; /files/ refuses any path that is
absolute, has a `..` part or resolves (through symlinks) outside the experiment folder. On a
loopback address the Host header must name a loopback host, so a web page elsewhere cannot reach
the dashboard through DNS rebinding.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import socket
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from unet_ray.dashboard.page import PLOTLY_ROUTE, REFRESH_SECONDS, page_state, plotly_js, render_page, to_json
from unet_ray.dashboard.predictions import best_predictions
from unet_ray.dashboard.results import DashboardError, Snapshot, check_experiment, fingerprint, read_experiment

TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".txt", ".log", ".yaml", ".yml"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# The page runs only its own inline script and plotly.js from this server; Plotly needs eval.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; font-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class Dashboard:
    """The experiment folder and what was last computed from it (shared by request threads)."""

    def __init__(self, experiment: str | Path, refresh_s: float = REFRESH_SECONDS):
        self.experiment = check_experiment(experiment)
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._cached: tuple[str, bytes] | None = None

    def snapshot(self) -> Snapshot:
        """The experiment read afresh; DashboardError when its folder went away or turned unreadable
        while the server runs (the page shows the message and keeps polling)."""
        try:
            return read_experiment(self.experiment)
        except OSError as e:  # removed or made unreadable in the middle of a read
            raise DashboardError(f"cannot read the results folder {self.experiment} ({e.strerror or e})") from None

    def state_json(self) -> bytes:
        # Fingerprint first: a file that changes while it is read changes the next fingerprint.
        files_version = fingerprint(self.experiment)
        snapshot = self.snapshot()
        statuses = "|".join(f"{t.trial_id}:{t.status}" for t in snapshot.trials)
        version = hashlib.sha1(f"{files_version}|{snapshot.sweep_status}|{statuses}".encode()).hexdigest()[:16]
        with self._lock:
            if self._cached and self._cached[0] == version:
                return self._cached[1]
        body = to_json(page_state(snapshot, version)).encode()
        with self._lock:
            self._cached = (version, body)
        return body

    def predictions_json(self) -> bytes:
        snapshot = self.snapshot()
        return to_json(best_predictions(snapshot.best, snapshot.prepared)).encode()

    def file_path(self, raw: str) -> tuple[HTTPStatus, Path | None]:
        """The experiment file a /files/ request names, or why it is refused."""
        relative = unquote(raw)
        pure = PurePosixPath(relative)
        if not relative or "\x00" in relative or "\\" in relative or pure.is_absolute() or ".." in pure.parts:
            return HTTPStatus.FORBIDDEN, None
        target = (self.experiment / pure).resolve()
        if not target.is_relative_to(self.experiment):  # a symlink pointing out of the folder
            return HTTPStatus.FORBIDDEN, None
        if not target.is_file():
            return HTTPStatus.NOT_FOUND, None
        if target.suffix.lower() not in TEXT_SUFFIXES:
            return HTTPStatus.FORBIDDEN, None
        return HTTPStatus.OK, target


class Handler(BaseHTTPRequestHandler):
    server: "DashboardServer"
    server_version = "unet-ray-dashboard"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if not self._host_allowed():
            return self._send_error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        path = urlsplit(self.path).path
        dashboard = self.server.dashboard
        try:
            if path == "/":
                page = render_page(dashboard.experiment.name, "live", refresh_s=dashboard.refresh_s)
                return self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8", page=True)
            if path == "/" + PLOTLY_ROUTE:
                return self._send(HTTPStatus.OK, plotly_js().encode(), "text/javascript; charset=utf-8", cache=True)
            if path == "/api/state":
                return self._send(HTTPStatus.OK, dashboard.state_json(), "application/json")
            if path == "/api/predictions":
                return self._send(HTTPStatus.OK, dashboard.predictions_json(), "application/json")
            if path.startswith("/files/"):
                status, file = dashboard.file_path(path[len("/files/"):])
                if file is None:
                    return self._send_error(status, "outside the experiment folder" if status == HTTPStatus.FORBIDDEN else "no such file")
                return self._send(HTTPStatus.OK, file.read_bytes(), "text/plain; charset=utf-8")
            return self._send_error(HTTPStatus.NOT_FOUND, "no such page")
        except (BrokenPipeError, ConnectionResetError):
            return None  # the browser went away mid-answer
        except DashboardError as e:  # the experiment folder is gone or unreadable: say so, no traceback
            return self._send_error(HTTPStatus.SERVICE_UNAVAILABLE, str(e))
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the server; logged below
            traceback.print_exc(file=sys.stderr)
            return self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")

    def _host_allowed(self) -> bool:
        if not self.server.loopback_only:
            return True
        host = (self.headers.get("Host") or "").strip()
        if host.startswith("["):  # [::1]:8050
            host = host[1:].split("]", 1)[0]
        else:
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return host.lower() in LOOPBACK_NAMES

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, page: bool = False, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if page:
            self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: HTTPStatus, message: str) -> None:
        body = to_json({"error": message, "status": int(status)}).encode()
        self._send(status, body, "application/json")

    def log_request(self, code="-", size="-") -> None:
        # The page polls every few seconds: log only what went wrong.
        if isinstance(code, HTTPStatus):
            code = code.value
        if isinstance(code, int) and code >= 400:
            super().log_request(code, size)


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C must not wait for a browser's open connection

    def __init__(self, dashboard: Dashboard, host: str, port: int):
        self.dashboard = dashboard
        self.loopback_only = _is_loopback(host)
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(experiment: str | Path, host: str = "127.0.0.1", port: int = 8050,
                refresh_s: float = REFRESH_SECONDS) -> DashboardServer:
    """A bound server (port 0: any free port; see `.url`); DashboardError when it cannot start."""
    dashboard = Dashboard(experiment, refresh_s)
    try:
        return DashboardServer(dashboard, host, port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise DashboardError(f"port {port} on {host} is in use: pass another --port (0 picks a free one)") from None
        raise DashboardError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def serve(experiment: str | Path, host: str = "127.0.0.1", port: int = 8050, refresh_s: float = REFRESH_SECONDS) -> None:
    server = make_server(experiment, host, port, refresh_s)
    print(f"dashboard of {server.dashboard.experiment} at {server.url}  (Ctrl-C to stop)", flush=True)
    if not server.loopback_only:
        print(f"note: listening on {host}: anyone who can reach this machine can read the results", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("dashboard stopped", flush=True)
    finally:
        server.server_close()
