"""The web app: a small threaded HTTP server (standard library only) in front of one batching worker.

    GET  /                           the page (static/index.html, app.js, app.css)
    GET  /api/status                 ready?, the model, defaults, limits, batching statistics
    POST /api/restore                multipart: image files + settings -> 202 {"job": id, ...}
    GET  /api/jobs/ID[?version=V&wait=S]   progress and results (long-polls up to S s for a change)
    GET  /api/jobs/ID/K/input.png | restored.png | sidecar.json,  /api/jobs/ID/results.zip
    GET  /api/sample.png?photo=coffee&type=noise&strength=1&seed=0   a bundled photo, degraded

Request threads decode and check uploads and answer polls; only the batcher's thread runs JAX.
Bound to 127.0.0.1 by default; while bound to a loopback address, requests naming another host
(DNS rebinding) or coming from another site's page (cross-site POST) are refused.
"""
import dataclasses
import http.server
import io
import ipaddress
import json
import os
import re
import socket
import threading
import time
import urllib.parse
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from diffrestorer_jax.app import forms, jobs, samples
from diffrestorer_jax.app.batching import Batcher, QueueFull, RestorerPool, Work
from diffrestorer_jax.data.image_io import ImageReadError, decode_image, encode_png
from diffrestorer_jax.infer.runner import COLOR_FIX_METHODS, Restorer, RestoreError, path_image_id

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclasses.dataclass
class AppConfig:
    batch_size: int = 4  # largest batch; powers of two below it are compiled too
    batch_mode: str = "map"
    batch_wait_ms: float = 20.0
    max_upload_bytes: int = 32 << 20
    max_pixels: int = 2048 * 2048
    max_images: int = 16
    max_pending: int = 128
    keep_jobs: int = 100
    keep_bytes: int = 512 << 20
    warm_sizes: Sequence[Tuple[int, int]] = ()
    idle_warm: bool = True
    limits: forms.Limits = forms.Limits()


def safe_stem(name: str) -> str:
    stem = os.path.splitext(os.path.basename(name))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"


def rss_bytes() -> Optional[int]:
    """This process's resident memory (Linux), for the load test and the status line."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class App:
    """Everything but HTTP: the restorer pool, the batcher, the job store, the sample photos."""

    def __init__(self, restorer: Restorer, config: AppConfig = AppConfig(), log: Callable[[str], None] = print):
        self.restorer, self.config, self.log = restorer, config, log
        self.pool = RestorerPool(restorer, config.batch_mode)
        self.batcher = Batcher(self.pool, config.batch_size, wait_s=config.batch_wait_ms / 1000.0,
                               max_pending=config.max_pending, idle_warm=config.idle_warm, log=log)
        self.jobs = jobs.JobStore(config.keep_jobs, config.keep_bytes)
        self.samples = samples.SamplePhotos(int(restorer.config.get("image_size", 512)))
        self.defaults = restorer.options
        self.started = time.time()

    def start(self) -> None:
        self.batcher.start(warm=[(self.defaults, hw) for hw in self.config.warm_sizes])

    def stop(self) -> None:
        self.batcher.stop()

    # ------------------------------------------------------------------ status
    def tile_choices(self) -> List[int]:
        step = self.restorer.multiple // self.restorer.nets.vae_factor
        native = max(step, self.restorer.latent_tile or step)
        return sorted({t for t in (native // 4, native // 2, native, native * 2) if t >= step and t % step == 0})

    @staticmethod
    def public_settings(r: Restorer) -> Dict[str, Any]:
        """The page's settings as a restorer resolves them (the config's values where not given)."""
        d, o = r.base_settings, r.options
        return {"steps": d.steps, "sampler": d.sampler, "seed": int(o.seed), "fidelity": float(r.knobs.fidelity_weight),
                "color_fix": o.color_fix, "samples": d.samples, "tile": "auto" if o.tile is None else o.tile}

    def status(self) -> Dict[str, Any]:
        r = self.restorer
        return {
            "ready": self.batcher.state == "ready", "state": self.batcher.state,
            "model": {"checkpoint": r.source, "image_size": int(r.config.get("image_size", 0)),
                      "size_multiple": r.multiple, "devices": r.num_devices,
                      "platform": r.mesh.devices.flat[0].platform},
            "defaults": self.public_settings(r),
            "choices": {"sampler": list(forms.SAMPLERS), "color_fix": list(COLOR_FIX_METHODS),
                        "tile": self.tile_choices(), "photo": list(samples.PHOTOS), "degradation": list(samples.TYPES)},
            "limits": {"max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels,
                       "max_images": self.config.max_images, "max_steps": self.config.limits.max_steps,
                       "max_samples": self.config.limits.max_samples,
                       "max_fidelity": self.config.limits.max_fidelity},
            "batching": {"batch_mode": self.config.batch_mode, **self.batcher.snapshot()},
            "memory": {"rss_bytes": rss_bytes(), "jobs_kept": len(self.jobs), "jobs_bytes": self.jobs.nbytes()},
            "uptime_s": round(time.time() - self.started, 1),
        }

    # ------------------------------------------------------------------ restore
    def submit(self, body: bytes, content_type: str) -> Tuple[int, Dict[str, Any]]:
        """A restore request -> (HTTP status, JSON). Bad images are reported by name, the rest go on."""
        parts = forms.parse_multipart(body, content_type)
        fields, images = forms.split_form(parts, self.config.max_images)
        options = forms.parse_settings(fields, self.defaults, self.config.limits)
        try:
            restorer = self.pool.get(options)  # the settings are runnable (tile multiple, ...)
        except RestoreError as e:
            raise forms.FormError(str(e).replace("--", "")) from None
        entries, decoded = [], []
        for k, part in enumerate(images):
            name = part.filename or f"image{k + 1}"
            try:
                image = decode_image(part.data, name, max_pixels=self.config.max_pixels)
            except ImageReadError as e:
                entries.append(jobs.Entry(name, error=e.reason))
                continue
            entry = jobs.Entry(name, size=image.shape[:2])
            entry.input_png = encode_png(image)
            entries.append(entry)
            decoded.append((len(entries) - 1, image))
        public = self.public_settings(restorer)
        if not decoded:
            return 400, {"error": "no usable image in the upload",
                         "files": [{"name": e.name, "error": e.error} for e in entries]}
        job = jobs.Job(entries, public)
        works = []
        for k, image in decoded:
            work = Work(image=image, image_id=path_image_id(entries[k].name), options=options,
                        done=self._on_done(job, k, options), started=self._on_start(job, k))
            entries[k].work = work
            works.append(work)
        try:
            self.batcher.submit(works)
        except QueueFull as e:
            raise forms.FormError(str(e), status=503) from None
        self.jobs.add(job)
        return 202, {"job": job.id, "url": f"/api/jobs/{job.id}",
                     "files": [{"name": e.name, "error": e.error} for e in entries if e.error]}

    def _on_start(self, job: jobs.Job, k: int):
        def started(call: Dict[str, Any]) -> None:
            job.update(k, state=jobs.RUNNING, call=call)
        return started

    def _on_done(self, job: jobs.Job, k: int, options):
        def done(restored, info, error) -> None:
            if error is not None:
                job.update(k, state=jobs.ERROR, error=error, work=None)
            else:
                entry = job.entries[k]
                common = self.pool.get(options).describe()
                common["batch_size"] = info["call_batch_size"]
                sidecar = {"input": entry.name, "output": f"{safe_stem(entry.name)}_restored.png", **info,
                           **common, "batch_mode": self.config.batch_mode, "job": job.id}
                job.update(k, state=jobs.DONE, restored_png=encode_png(restored), sidecar=sidecar, work=None)
            if job.finished:
                self.jobs.trim()
        return done

    def snapshot(self, job: jobs.Job) -> Dict[str, Any]:
        return job.snapshot(self.batcher.position, self.batcher.will_compile)

    def results_zip(self, job: jobs.Job) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for k, e in enumerate(job.entries):
                if e.state == jobs.DONE:
                    stem = f"{k + 1:02d}_{safe_stem(e.name)}_restored"
                    z.writestr(stem + ".png", e.restored_png)
                    z.writestr(stem + ".json", json.dumps(e.sidecar, indent=2))
        return buf.getvalue()

    def sample_png(self, query: Dict[str, str]) -> bytes:
        try:
            strength = float(query.get("strength", "1"))
            seed = int(query.get("seed", "0"))
        except ValueError:
            raise forms.FormError("strength must be a number and seed a whole number") from None
        try:
            image = self.samples.degraded(query.get("photo", ""), query.get("type", ""), strength, seed)
        except samples.SampleError as e:
            raise forms.FormError(str(e)) from None
        return encode_png(image)


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
        """While bound to loopback: the Host must be a loopback name and a cross-site Origin is refused."""
        if not self.loopback_only:
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if name not in LOOPBACK_NAMES and not is_loopback(name):
            return False
        origin = self.headers.get("Origin")
        if origin and origin != "null":
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
            m = re.fullmatch(r"/api/jobs/([A-Za-z0-9_-]+)(?:/(results\.zip|(\d+)/(input\.png|restored\.png|sidecar\.json)))?", path)
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
        """The request body, or None after answering 411 / 413 (the body is read and dropped first,
        up to 16 times the limit, so the browser sees the answer instead of a reset connection)."""
        limit = self.app.config.max_upload_bytes
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._error(411, "send the upload with a Content-Length (not chunked)")
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._error(411, "the upload has no Content-Length")
            return None
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


def make_server(app: App, host: str = "127.0.0.1", port: int = 7860) -> Server:
    """Bind (port 0: any free port; the bound one is server.server_address[1])."""
    handler = type("AppHandler", (Handler,), {"app": app, "loopback_only": is_loopback(host)})
    cls = Server
    if ":" in host:
        cls = type("Server6", (Server,), {"address_family": socket.AF_INET6})
    return cls((host, port), handler)


def serve_in_thread(server: Server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return thread
