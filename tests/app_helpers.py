"""Run `diffrestorer-app` as a real process on loopback and talk to it over HTTP (standard library only)."""
import contextlib
import fcntl
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]  # tests/ is one level below the repo
DEMO_CHECKPOINT = ROOT / "demo" / "checkpoint"


def png_bytes(array: np.ndarray, mode: Optional[str] = None) -> bytes:
    im = Image.fromarray(array)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random picture (uint8 [h, w, 3]): distinct per seed, natural enough for the model."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def multipart(files: Sequence[Tuple[str, bytes]], fields: Dict[str, str] = None) -> Tuple[bytes, str]:
    """(body, content type) as a browser's FormData sends it: `image` file parts + text fields."""
    boundary = "----test" + uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                  f'Content-Type: application/octet-stream\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# The programs every app test module warms (1 sampling step, batches of 1 and 2, the model's 64 x 64;
# --exact, so an image's output is the same bit for bit in any batch):
# the first module compiles them into a compilation cache shared by the session, the others load them.
WARM_ARGS = ["--steps", "1", "--batch-size", "2", "--warm", "64x64", "--exact"]


@contextlib.contextmanager
def shared_cache(tmp_path_factory):
    """The session's compilation cache folder, held exclusively while a server warms up: JAX writes
    cache entries in place, so no server may read one that another is still writing."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = root / "app_jax_cache"
    cache.mkdir(exist_ok=True)
    with open(root / "app_jax_cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield cache
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start_warm(args, tmp_path_factory) -> "AppServer":
    """A started, warmed server with WARM_ARGS + args on the session's shared cache."""
    with shared_cache(tmp_path_factory) as cache:
        server = AppServer(WARM_ARGS + list(args), cache).start()
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
    return server


class Response:
    def __init__(self, status: int, body: bytes, headers):
        self.status, self.body, self.headers = status, body, headers

    def json(self):
        return json.loads(self.body)


class AppServer:
    """`python -m diffrestorer_jax.cli.app ...` on a free loopback port."""

    def __init__(self, args: Sequence[str], cache_dir: str, checkpoint=DEMO_CHECKPOINT, env=None):
        self.cmd = [sys.executable, "-m", "diffrestorer_jax.cli.app", "--checkpoint", str(checkpoint),
                    "--port", "0", "--compile-cache", str(cache_dir), *args]
        # One CPU device (the suite's conftest asks for 8 fake ones), no LLVM optimisation: compiles
        # dominate these tests and the tiny model runs as fast without it.
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                        XLA_FLAGS="--xla_backend_optimization_level=0", **(env or {}))
        self.proc: Optional[subprocess.Popen] = None
        self.url = None
        self.stderr: List[str] = []

    def start(self, timeout: float = 120.0) -> "AppServer":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env, cwd=str(ROOT))
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()  # "serving on http://127.0.0.1:PORT/"
        if not line.startswith("serving on "):
            self.proc.wait(timeout=max(1, deadline - time.monotonic()))
            time.sleep(0.2)
            raise RuntimeError(f"the app did not start ({self.proc.returncode}): {line}{''.join(self.stderr)}")
        self.url = line.split()[-1].rstrip("/")
        return self

    def wait_ready(self, timeout: float = 600.0) -> Dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.get("/api/status").json()
            if s["state"] == "ready":
                return s
            if s["state"] == "stopped" or self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"the app did not get ready: {''.join(self.stderr)}")

    def wait_idle(self, timeout: float = 300.0) -> Dict:
        """Until nothing is queued, running or waiting to be compiled in the background."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            b = self.get("/api/status").json()["batching"]
            if not (b["waiting"] or b["running"] or b["pending_warm"] or b["status"]):
                return b
            time.sleep(0.3)
        raise RuntimeError("the app did not become idle")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, body: bytes = None, headers: Dict[str, str] = None,
                timeout: float = 120.0) -> Response:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Response(r.status, r.read(), r.headers)
        except urllib.error.HTTPError as e:
            return Response(e.code, e.read(), e.headers)

    def get(self, path: str, **kw) -> Response:
        return self.request("GET", path, **kw)

    def post_images(self, files: Sequence[Tuple[str, bytes]], fields: Dict[str, str] = None) -> Response:
        body, ctype = multipart(files, fields)
        return self.request("POST", "/api/restore", body, {"Content-Type": ctype})

    def wait_job(self, job_id: str, timeout: float = 300.0) -> Dict:
        deadline = time.monotonic() + timeout
        version = -1
        while time.monotonic() < deadline:
            snap = self.get(f"/api/jobs/{job_id}?version={version}&wait=10").json()
            if snap["finished"]:
                return snap
            version = snap["version"]
        raise RuntimeError(f"job {job_id} did not finish in {timeout} s")

    def restore(self, files: Sequence[Tuple[str, bytes]], fields: Dict[str, str] = None) -> Dict:
        r = self.post_images(files, fields)
        assert r.status == 202, r.body
        return self.wait_job(r.json()["job"])
