"""The web app: a small threaded HTTP server (standard library only) in front of one batching worker.

    GET  /                           the page (static/index.html, app.js, app.css)
    GET  /api/status                 ready?, the model, defaults, limits, batching statistics
    POST /api/restore                multipart: image files + settings -> 202 {"job": id, ...}
    GET  /api/jobs/ID[?version=V&wait=S]   progress and results (long-polls up to S s for a change)
    GET  /api/jobs/ID/K/input.png | restored.png | sidecar.json,  /api/jobs/ID/results.zip
    GET  /api/sample.png?photo=coffee&type=noise&strength=1&seed=0   a bundled photo, degraded

Request threads decode and check uploads and answer polls; only the batcher's thread runs JAX.
Bound to 127.0.0.1 by default; while bound to a loopback address, requests naming another host
(DNS rebinding) or coming from another site's page (cross-site POST, `Origin: null` included) are
refused.
"""
import http.server
import ipaddress
import json
import os
import re
import socket
import threading
import urllib.parse
from typing import Any, Dict, Optional

from diffrestorer_jax.app import forms, jobs
from diffrestorer_jax.app.service import App, safe_stem

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# /api/jobs/ID, /api/jobs/ID/results.zip, /api/jobs/ID/K/(input.png|restored.png|sidecar.json)
JOB_PATH = re.compile(r"/api/jobs/([A-Za-z0-9_-]+)"
                      r"(?:/(results\.zip|(\d+)/(input\.png|restored\.png|sidecar\.json)))?")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Handler(http.server.BaseHTTPRequestHandler):
    app: App = None  # set by make_server
    loopback_only = True
    timeout = 60  # seconds a client may stall mid-request
    server_version = "diffrestorer-app"
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------------ plumbing
    def log_message(self, fmt, *args):  # noqa: D102  requests are logged only when they fail
        pass

    def _send(self, status: int, body: bytes, content_type: str, headers: Dict[str, str] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str, **extra) -> None:
        if status >= 500 or self.command == "POST":
            self.app.log(f"{self.command} {self.path}: {status} {message}")
        self._json(status, {"error": message, **extra})

    def _host_ok(self) -> bool:
        """While bound to loopback: the Host must be a loopback name and a cross-site Origin is refused
        (for a POST, the opaque `null` of a sandboxed frame or a local file's page too)."""
        if not self.loopback_only:
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if name not in LOOPBACK_NAMES and not is_loopback(name):
            return False
        origin = self.headers.get("Origin")
        if origin == "null":
            return self.command != "POST"
        if origin:
            oname = (urllib.parse.urlsplit(origin).hostname or "").lower()
            if oname not in LOOPBACK_NAMES and not is_loopback(oname):
                return False
        return True

    # ------------------------------------------------------------------ routes
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        if not self._host_ok():
            return self._error(403, "this server only answers requests for localhost")
        url = urllib.parse.urlsplit(self.path)
        path, query = url.path, dict(urllib.parse.parse_qsl(url.query))
        try:
            if path in ("/", "/index.html"):
                return self._static("index.html")
            if path.startswith("/static/"):
                return self._static(path[len("/static/"):])
            if path == "/api/status":
                return self._json(200, self.app.status())
            if path == "/api/sample.png":
                return self._send(200, self.app.sample_png(query), "image/png")
            m = JOB_PATH.fullmatch(path)
            if m:
                return self._job(m, query)
        except forms.FormError as e:
            return self._error(e.status, str(e))
        return self._error(404, f"no such page: {path}")

    def _static(self, name: str):
        if not re.fullmatch(r"[A-Za-z0-9_-]+\.[a-z]+", name) or os.path.splitext(name)[1] not in STATIC_TYPES:
            return self._error(404, f"no such file: {name}")
        try:
            with open(os.path.join(STATIC, name), "rb") as f:
                body = f.read()
        except OSError:
            return self._error(404, f"no such file: {name}")
        self._send(200, body, STATIC_TYPES[os.path.splitext(name)[1]])

    def _job(self, m, query):
        job = self.app.jobs.get(m.group(1))
        if job is None:
            return self._error(404, "no such job: it finished long ago and was dropped to save memory, "
                                    "or the server restarted; restore the image again")
        if m.group(2) is None:
            try:
                version = int(query["version"]) if "version" in query else None
                wait = min(30.0, max(0.0, float(query.get("wait", "0"))))
            except ValueError:
                return self._error(400, "version must be a whole number and wait a number of seconds")
            if version is not None and wait:
                job.wait(version, wait)
            return self._json(200, self.app.snapshot(job))
        if m.group(2) == "results.zip":
            return self._send(200, self.app.results_zip(job), "application/zip",
                              {"Content-Disposition": f'attachment; filename="restored_{job.id}.zip"'})
        k, what = int(m.group(3)), m.group(4)
        if k >= len(job.entries):
            return self._error(404, f"the job has {len(job.entries)} image(s); there is no image {k}")
        e = job.entries[k]
        stem = safe_stem(e.name)
        if what == "input.png" and e.input_png:
            return self._send(200, e.input_png, "image/png",
                              {"Content-Disposition": f'inline; filename="{stem}_input.png"'})
        if e.state != jobs.DONE:
            return self._error(404 if e.state == jobs.ERROR else 409,
                               f"{e.name}: {e.error}" if e.error else f"{e.name} is not restored yet ({e.state})")
        if what == "restored.png":
            return self._send(200, e.restored_png, "image/png",
                              {"Content-Disposition": f'inline; filename="{stem}_restored.png"'})
        return self._send(200, json.dumps(e.sidecar, indent=2).encode(), "application/json",
                          {"Content-Disposition": f'attachment; filename="{stem}_restored.json"'})

    def do_POST(self):
        if not self._host_ok():
            self.close_connection = True
            return self._error(403, "this server only answers requests from pages on localhost")
        if urllib.parse.urlsplit(self.path).path != "/api/restore":
            self.close_connection = True
            return self._error(404, f"no such endpoint: POST {self.path}")
        body = self._read_body()
        if body is None:
            return
        try:
            status, payload = self.app.submit(body, self.headers.get("Content-Type", ""))
        except forms.FormError as e:
            return self._error(e.status, str(e))
        self._json(status, payload)

    def _read_body(self) -> Optional[bytes]:
        """The request body, or None after answering 400 / 411 / 413 (for 413 the body is read and
        dropped first, up to 16 times the limit, so the browser sees the answer, not a reset connection)."""
        limit = self.app.config.max_upload_bytes
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._error(411, "send the upload with a Content-Length (not chunked)")
            return None
        text = (self.headers.get("Content-Length") or "").strip()
        if not text:
            self.close_connection = True
            self._error(411, "the upload has no Content-Length")
            return None
        if not re.fullmatch(r"[0-9]+", text):
            self.close_connection = True
            self._error(400, f"Content-Length must be a whole number of bytes, got {text[:40]!r}")
            return None
        length = int(text)
        if length > limit:
            self.close_connection = True
            left = length if length <= 16 * limit else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            self._error(413, f"the upload is {length / 2**20:.1f} MiB; this server accepts at most "
                             f"{limit / 2**20:.1f} MiB per request (--max-upload-mb)")
            return None
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return None  # the client went away mid-upload: nobody to answer
        return body

    def do_PUT(self):
        self._error(405, "use GET or POST")

    do_DELETE = do_PATCH = do_PUT


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def make_server(host: str = "127.0.0.1", port: int = 7860, app: Optional[App] = None) -> Server:
    """Bind (port 0: any free port; the bound one is server.server_address[1]). The app may be
    attached later (`attach`), so a taken port is reported before the model is loaded."""
    handler = type("AppHandler", (Handler,), {"app": app, "loopback_only": is_loopback(host)})
    cls = Server
    if ":" in host:
        cls = type("Server6", (Server,), {"address_family": socket.AF_INET6})
    return cls((host, port), handler)


def attach(server: Server, app: App) -> None:
    server.RequestHandlerClass.app = app


def serve_in_thread(server: Server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return thread
