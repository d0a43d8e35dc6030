"""The web app's service, everything but HTTP: the restorer pool, the batching worker, the jobs.

`App.submit` takes a restore request's body (multipart form) and queues its images; `App.status`,
`App.snapshot`, `App.results_zip` and `App.sample_png` answer the page. `server.py` serves them.
"""
import dataclasses
import io
import json
import os
import re
import time
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from diffrestorer_jax.app import forms, jobs, samples
from diffrestorer_jax.app.batching import Batcher, QueueFull, Work, compact
from diffrestorer_jax.app.pool import RestorerPool
from diffrestorer_jax.data.image_io import ImageReadError, decode_image, encode_png
from diffrestorer_jax.infer.program import COLOR_FIX_METHODS
from diffrestorer_jax.infer.restorer import Restorer, RestoreError, path_image_id


@dataclasses.dataclass
class AppConfig:
    batch_size: int = 4  # largest batch; powers of two below it are compiled too
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
        self.pool = RestorerPool(restorer)
        self.batcher = Batcher(self.pool, config.batch_size, wait_s=config.batch_wait_ms / 1000.0,
                               max_pending=config.max_pending, idle_warm=config.idle_warm, log=log)
        self.jobs = jobs.JobStore(config.keep_jobs, config.keep_bytes)
        self.samples = samples.SamplePhotos(int(restorer.config.get("image_size", 512)))
        self.defaults = restorer.options
        # Server-wide, from the command's --exact: an image's rows alone (bit for bit its output in
        # any batch) or the batch through the networks together (equal to float rounding).
        self.batch_mode = "exact" if restorer.options.exact else "batched"
        self.started = time.time()

    def start(self) -> None:
        self.batcher.start(warm=[(self.defaults, hw) for hw in self.config.warm_sizes])

    def stop(self) -> None:
        self.batcher.stop()

    # ------------------------------------------------------------------ status
    def tile_choices(self) -> List[int]:
        """Latent tiles the page offers: around the checkpoint's training size, and the restorer's own
        tile (the checkpoint's sampler.tile or --tile) when it tiles at all."""
        r = self.restorer
        step = r.multiple // r.nets.vae_factor
        native = max(step, int(r.config.image_size) // r.nets.vae_factor // step * step)
        choices = {t for t in (native // 4, native // 2, native, native * 2) if t >= step and t % step == 0}
        return sorted(choices | ({r.latent_tile} if r.latent_tile else set()))

    @staticmethod
    def public_settings(r: Restorer) -> Dict[str, Any]:
        """The page's settings as a restorer resolves them (the config's values where not given)."""
        d, o = r.base_settings, r.options
        return {"steps": d.steps, "sampler": d.sampler, "seed": int(o.seed),
                "fidelity": float(r.knobs.fidelity_weight), "color_fix": o.color_fix, "samples": d.samples,
                "tile": "auto" if o.tile is None else o.tile}

    def status(self) -> Dict[str, Any]:
        r = self.restorer
        return {
            "ready": self.batcher.state == "ready", "state": self.batcher.state,
            "model": {"checkpoint": r.source, "image_size": int(r.config.get("image_size", 0)),
                      "size_multiple": r.multiple, "devices": r.num_devices,
                      "platform": r.mesh.devices.flat[0].platform},
            "defaults": self.public_settings(r),
            "choices": {"sampler": list(forms.SAMPLERS), "color_fix": list(COLOR_FIX_METHODS),
                        "tile": self.tile_choices(), "photo": list(samples.PHOTOS),
                        "degradation": list(samples.TYPES)},
            "limits": {"max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels,
                       "max_images": self.config.max_images, "max_steps": self.config.limits.max_steps,
                       "max_samples": self.config.limits.max_samples,
                       "max_fidelity": self.config.limits.max_fidelity},
            "batching": {"batch_mode": self.batch_mode, **self.batcher.snapshot()},
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
            decoded.append((len(entries) - 1, compact(image)))  # uint8 while it waits, not float32
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
                           **common, "batch_mode": self.batch_mode, "job": job.id}
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
        if not 0 <= seed <= forms.MAX_SEED:
            raise forms.FormError(f"seed must be between 0 and {forms.MAX_SEED}, got {seed}")
        try:
            image = self.samples.degraded(query.get("photo", ""), query.get("type", ""), strength, seed)
        except samples.SampleError as e:
            raise forms.FormError(str(e)) from None
        return encode_png(image)
