"""Restore jobs: one upload's images, their progress and results, kept while memory allows.

A job holds each image's decoded input and restored PNG and its sidecar (settings, seed, type
probabilities); the page polls `snapshot` (long-polling on `wait`). The store keeps finished jobs
up to a count and a byte budget (`JobStore.trim`); jobs not finished are neither counted nor dropped.
"""
import secrets
import threading
import time
from typing import Any, Dict, List, Optional

QUEUED, RUNNING, DONE, ERROR = "queued", "running", "done", "error"


class Entry:
    """One image of a job."""

    def __init__(self, name: str, size=None, error: Optional[str] = None):
        self.name = name
        self.size = size  # (height, width) of the decoded input
        self.state = ERROR if error else QUEUED
        self.error = error
        self.input_png: Optional[bytes] = None
        self.restored_png: Optional[bytes] = None
        self.sidecar: Optional[Dict[str, Any]] = None
        self.call: Optional[Dict[str, Any]] = None  # the batch it ran in
        self.work = None  # its batching.Work while waiting

    def nbytes(self) -> int:
        return len(self.input_png or b"") + len(self.restored_png or b"")


class Job:
    def __init__(self, entries: List[Entry], settings: Dict[str, Any]):
        self.id = secrets.token_urlsafe(9)
        self.created = time.time()
        self.entries = entries
        self.settings = settings
        self.version = 0
        self.finished_at = time.monotonic() if self.finished else None  # when its last image finished
        self.cond = threading.Condition()

    def update(self, index: int, **fields) -> None:
        with self.cond:
            for k, v in fields.items():
                setattr(self.entries[index], k, v)
            if self.finished_at is None and self.finished:
                self.finished_at = time.monotonic()
            self.version += 1
            self.cond.notify_all()

    @property
    def finished(self) -> bool:
        return all(e.state in (DONE, ERROR) for e in self.entries)

    def wait(self, version: int, timeout: float) -> None:
        """Return when the job changed since `version`, is finished, or after timeout seconds."""
        with self.cond:
            self.cond.wait_for(lambda: self.version != version or self.finished, timeout)

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.entries)

    def snapshot(self, position=None, will_compile=None) -> Dict[str, Any]:
        """JSON for the page. position(work) -> images ahead; will_compile(work) -> bool."""
        with self.cond:
            images = []
            for k, e in enumerate(self.entries):
                item = {"index": k, "name": e.name, "state": e.state}
                if e.size:
                    item["height"], item["width"] = e.size
                    item["input_url"] = f"/api/jobs/{self.id}/{k}/input.png"
                if e.error:
                    item["error"] = e.error
                if e.state == QUEUED and e.work is not None and position is not None:
                    item["ahead"] = position(e.work)
                    item["needs_compile"] = bool(will_compile and will_compile(e.work))
                if e.call:
                    item["call"] = e.call
                if e.state == DONE:
                    s = e.sidecar
                    item.update(restored_url=f"/api/jobs/{self.id}/{k}/restored.png",
                                sidecar_url=f"/api/jobs/{self.id}/{k}/sidecar.json",
                                type_probs=s["type_probs"], predicted_type=s["predicted_type"],
                                color_fix_applied=s["color_fix_applied"])
                images.append(item)
            done = sum(e.state == DONE for e in self.entries)
            failed = sum(e.state == ERROR for e in self.entries)
            return {"job": self.id, "version": self.version, "finished": self.finished, "done": done,
                    "failed": failed, "total": len(self.entries), "settings": self.settings,
                    "images": images, "zip_url": f"/api/jobs/{self.id}/results.zip" if done else None}


class JobStore:
    def __init__(self, max_jobs: int = 100, max_bytes: int = 512 << 20):
        self.max_jobs, self.max_bytes = max_jobs, max_bytes
        self._jobs: Dict[str, Job] = {}  # oldest first
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
        self.trim()

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def nbytes(self) -> int:
        with self._lock:
            return sum(j.nbytes() for j in self._jobs.values())

    def trim(self) -> None:
        """Drop the finished jobs that finished first while the finished ones exceed either limit,
        but never the one that finished last (its page is about to fetch the results)."""
        with self._lock:
            done = sorted((j for j in self._jobs.values() if j.finished_at is not None),
                          key=lambda j: j.finished_at)
            count, total = len(done), sum(j.nbytes() for j in done)
            for job in done[:-1]:
                if count <= self.max_jobs and total <= self.max_bytes:
                    break
                count, total = count - 1, total - job.nbytes()
                del self._jobs[job.id]
