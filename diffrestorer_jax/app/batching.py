"""One worker thread that batches images from concurrent requests into the compiled programs.

Every uploaded image waits in one queue as a `Work`. The worker takes the oldest one, gathers the
other waiting images that run in the same compiled program (same restore settings and seed, same
shape bucket), and restores them in one call. So N users uploading at once are served in fewer
calls than N, and an image of a size seen before never compiles anything.

Batch sizes are powers of two up to the server's `--batch-size` (1, 2, 4, 8): a call takes the
smallest compiled batch that holds everything waiting for its program, because a padded row costs
a real row's compute (`lax.map` on the CPU; on accelerators less, but not nothing). Which batch
sizes exist for a program: at warm-up every one for the warmed sizes; for a new size or setting
the first call compiles the one it needs, and the others are compiled while the server is idle
(`idle_warm`). Once a (settings, bucket) pair has a compiled batch size, its calls use only
compiled ones, so a seen size never waits for a compile. A warm-up compile that fails (out of device
memory for a large batch, say) is logged and that batch size is skipped; the server goes on serving.

Queued images keep the compact integer form `compact` gives them (uint8 for 8-bit files: 1 byte per
channel) and become float32 (`expand`) only when their batch runs, exactly as decoded.

All JAX work happens on this one thread; request threads only enqueue and wait.
"""
import dataclasses
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from diffrestorer_jax.app.pool import RestorerPool, batch_sizes, settings_key
from diffrestorer_jax.infer.compile_cache import CompileClock
from diffrestorer_jax.infer.restorer import Options, Restorer
from diffrestorer_jax.parallel.sharding import CompileCounter


class QueueFull(Exception):
    """The server takes no more images (queue full, shutting down, worker stopped): a message for the user."""


def compact(image: np.ndarray) -> np.ndarray:
    """A decoded float32 image as uint8 (or uint16) when `expand` gives it back bit for bit, else as is."""
    for dtype, peak in ((np.uint8, 255), (np.uint16, 65535)):
        small = np.round(image * peak).astype(dtype)
        if np.array_equal(expand(small), image):
            return small
    return image


def expand(image: np.ndarray) -> np.ndarray:
    """`compact`'s inverse: float32 in [0, 1], computed as the decoder computes it."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return (image / 65535.0).astype(np.float32)
    return image


@dataclasses.dataclass(eq=False)
class Work:
    """One image to restore and where its result goes. `done(restored, info, error)` is called once,
    on the worker thread, with (array, info, None) or (None, None, message)."""
    image: np.ndarray  # [H, W, 3]: `compact`'s uint8 / uint16, or float32 in [0, 1]
    image_id: int
    options: Options
    done: Callable[[Optional[np.ndarray], Optional[Dict], Optional[str]], None]
    started: Callable[[Dict], None] = lambda info: None
    group: Tuple = ()  # (settings key, bucket): images that can share a call
    program: Tuple = ()  # (settings, colour fix, bucket): the compiled program family
    enqueued: float = 0.0


@dataclasses.dataclass
class Stats:
    calls: int = 0  # compiled-program calls made for requests
    images: int = 0  # images restored for requests
    padded_rows: int = 0  # rows of those calls that were copies (a batch not full)
    failed: int = 0
    compiles: int = 0  # XLA compilations of restore programs (cache loads included)
    cache_hits: int = 0  # of those, loaded from the persistent compilation cache
    warm_calls: int = 0  # calls made to compile programs (start-up and idle warming)
    calls_by_batch: Dict[int, int] = dataclasses.field(default_factory=dict)


class Batcher:
    """The queue and its worker thread; see the module docstring."""

    def __init__(self, pool: RestorerPool, max_batch: int, wait_s: float = 0.02, max_pending: int = 128,
                 idle_warm: bool = True, idle_s: float = 0.5, log: Callable[[str], None] = print):
        self.pool = pool
        self.sizes = batch_sizes(max_batch, pool.base.num_devices)
        self.wait_s, self.max_pending = wait_s, max_pending
        self.idle_warm, self.idle_s = idle_warm, idle_s
        self.log = log
        self.stats = Stats()
        self.state = "starting"  # starting | warming | ready | stopped
        self.status = ""  # what the worker is doing, for people
        self._cond = threading.Condition()
        self._pending: List[Work] = []
        self._running: List[Work] = []
        self._compiled: Dict[Tuple, set] = {}  # program -> batch sizes compiled
        self._seen: Dict[Tuple, Options] = {}  # program -> options that use it (for idle warming)
        self._failed: set = set()  # (program, batch size) whose warm-up compile failed: skipped
        self._warm_list: List[Tuple[Options, Tuple[int, int]]] = []
        self._stop = False
        self._last_activity = time.monotonic()
        self._counter = CompileCounter("restore_bucket")
        self._clock = CompileClock()  # persistent-cache hits while the worker runs (JAX's events)
        self._listening = False
        self._thread = threading.Thread(target=self._run, name="restore-batcher", daemon=True)

    # ------------------------------------------------------------------ public, any thread
    def start(self, warm: List[Tuple[Options, Tuple[int, int]]] = ()) -> None:
        """Start the worker; it first compiles every batch size for each (options, (h, w)) in warm."""
        self._warm_list = list(warm)
        if not self._listening:
            self._clock.__enter__()
            self._listening = True
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._listening:
            self._clock.__exit__(None, None, None)
            self._listening = False

    def program_of(self, options: Options, height: int, width: int) -> Tuple[Tuple, Tuple]:
        """(group, program) of an image; raises RestoreError for options the model cannot run."""
        r = self.pool.get(options)
        bucket = r.bucket(height, width)
        return (settings_key(options), bucket), (r.settings_for(bucket), options.color_fix, bucket)

    def submit(self, works: List[Work]) -> None:
        """Queue images (all or none: QueueFull when they do not fit or the worker has stopped)."""
        now = time.monotonic()
        for w in works:
            w.group, w.program = self.program_of(w.options, *w.image.shape[:2])
            w.enqueued = now
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if self.state == "stopped":
                raise QueueFull("the server's restore worker has stopped (see the server's log); "
                                "it must be restarted")
            if len(self._pending) + len(works) > self.max_pending:
                raise QueueFull(f"the server is busy ({len(self._pending)} images waiting, at most "
                                f"{self.max_pending}); try again in a moment")
            self._pending.extend(works)
            self._cond.notify_all()

    def position(self, work: Work) -> Optional[int]:
        """Images queued before this one (None: not waiting any more)."""
        with self._cond:
            for i, w in enumerate(self._pending):
                if w is work:
                    return i
        return None

    def will_compile(self, work: Work) -> bool:
        with self._cond:
            return not self._compiled.get(work.program)

    def snapshot(self) -> Dict[str, Any]:
        with self._cond:
            s = dataclasses.asdict(self.stats)
            s["calls_by_batch"] = {str(k): v for k, v in sorted(self.stats.calls_by_batch.items())}
            s.update(state=self.state, status=self.status, waiting=len(self._pending),
                     running=len(self._running), batch_sizes=list(self.sizes),
                     programs={f"{p[2][0]}x{p[2][1]} {p[0].sampler} {p[0].steps} steps"
                               + (f" tile {p[0].tile}" if p[0].tile else "")
                               + (f" x{p[0].samples}" if p[0].samples > 1 else "")
                               + (f" colour fix {p[1]}" if p[1] != "none" else ""): sorted(b)
                               for p, b in self._compiled.items()},
                     pending_warm=len(self._missing()))
            return s

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        status = "stopped"
        try:
            with self._counter:
                self._warm_start()
                while True:
                    batch = self._next_batch()
                    if batch is None:
                        break
                    if batch:
                        self._restore(*batch)
                    else:
                        self._warm_one_idle()
        except Exception as e:  # noqa: BLE001  a bug must not leave requests waiting forever
            self.log(f"error: the restore worker stopped: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            status = f"stopped by an internal error ({type(e).__name__}: {e})"
        finally:
            with self._cond:  # however the thread ends, submit refuses from now on
                self.state, self.status = "stopped", status
                pending, self._pending, self._running = self._running + self._pending, [], []
            for w in pending:
                w.done(None, None, "the server's restore worker stopped (see its log)")

    def _warm_start(self) -> None:
        todo = [(o, hw, b) for o, hw in self._warm_list for b in self.sizes]
        with self._cond:
            self.state = "warming" if todo else "ready"
        t0 = time.monotonic()
        for k, (options, (h, w), b) in enumerate(todo):
            if self._stop:
                return
            self._set_status(f"warming up: program {k + 1} of {len(todo)} ({h}x{w}, batch {b})")
            group, program = self.program_of(options, h, w)
            self._try_warm(options, program, b)
            with self._cond:
                self._seen.setdefault(program, options)
        if todo:
            self.log(f"ready: {len(todo) - len(self._failed)} program(s) warmed in {time.monotonic() - t0:.1f} s "
                     f"({self.stats.cache_hits} loaded from the compilation cache)")
        with self._cond:
            self.state, self.status = "ready", ""

    def _set_status(self, text: str) -> None:
        with self._cond:
            self.status = text

    def _missing(self) -> List[Tuple[Options, Tuple, int]]:
        """(options, program, batch size) not compiled yet for programs in use (lock held)."""
        out = []
        for program, options in self._seen.items():
            done = self._compiled.get(program, set())
            out.extend((options, program, b) for b in self.sizes
                       if b not in done and (program, b) not in self._failed)
        return out

    def _next_batch(self):
        """None: stop; []: idle with warming to do; else (restorer, works, batch size)."""
        with self._cond:
            while True:
                if self._stop:
                    return None
                if self._pending:
                    first = self._pending[0]
                    group = [w for w in self._pending if w.group == first.group]
                    sizes = sorted(self._compiled.get(first.program) or self.sizes)
                    fits = [b for b in sizes if b >= len(group)]
                    if not fits or fits[0] == len(group):  # a full batch: go now
                        b = fits[0] if fits else sizes[-1]
                    else:
                        left = first.enqueued + self.wait_s - time.monotonic()
                        if left > 0:  # a moment for concurrent uploads to arrive
                            self._cond.wait(left)
                            continue
                        b = fits[0]
                    take = group[:b]
                    taken = set(map(id, take))
                    self._pending = [w for w in self._pending if id(w) not in taken]
                    self._running = take
                    return self.pool.get(first.options, b), take, b
                idle = time.monotonic() - self._last_activity
                if self.idle_warm and self._missing() and idle >= self.idle_s:
                    return []
                self._cond.wait(self.idle_s - idle if self.idle_warm and self._missing() else None)

    def _compile_events(self) -> Tuple[int, int]:
        return self._counter.count, self._clock.cache_hits

    def _account(self, before: Tuple[int, int]) -> bool:
        compiles, hits = self._compile_events()
        with self._cond:
            self.stats.compiles += compiles - before[0]
            self.stats.cache_hits += hits - before[1]
        return compiles > before[0]

    def _warm_call(self, options: Options, program: Tuple, b: int) -> None:
        r = self.pool.get(options, b)
        h, w = program[2]
        before = self._compile_events()
        r.restore_batch(np.zeros((b, h, w, 3), np.float32), np.zeros(b, np.int64))
        self._account(before)
        with self._cond:
            self._compiled.setdefault(program, set()).add(b)
            self.stats.warm_calls += 1

    def _try_warm(self, options: Options, program: Tuple, b: int) -> None:
        """`_warm_call`; a failure is logged and that batch size skipped from then on."""
        try:
            self._warm_call(options, program, b)
        except Exception as e:  # noqa: BLE001  e.g. out of device memory for this batch size
            self.log(f"warning: compiling {program[2][0]}x{program[2][1]} batch {b} failed, so that batch "
                     f"size is not used: {type(e).__name__}: {e}")
            with self._cond:
                self._failed.add((program, b))

    def _warm_one_idle(self) -> None:
        with self._cond:
            missing = self._missing()
        if not missing:
            return
        options, program, b = missing[0]
        self._set_status(f"compiling in the background: {program[2][0]}x{program[2][1]}, batch {b}")
        self._try_warm(options, program, b)
        with self._cond:
            self.status = ""
            self._last_activity = time.monotonic()

    def _restore(self, restorer: Restorer, works: List[Work], b: int) -> None:
        program = works[0].program
        compiling = not self._compiled.get(program)
        bucket = program[2]
        self._set_status(("compiling a program for " if compiling else "restoring ")
                         + f"{bucket[0]}x{bucket[1]} (batch of {len(works)}"
                         + (f" padded to {b})" if b > len(works) else ")"))
        with self._cond:
            call = self.stats.calls + 1
        shared = {"call": call, "batch_size": b, "rows": len(works), "compiling": compiling}
        for w in works:
            w.started(shared)
        before = self._compile_events()
        t0 = time.monotonic()
        try:
            results = list(restorer.restore_stream((w, expand(w.image), w.image_id) for w in works))
        except Exception as e:  # noqa: BLE001  one bad call must not take the server down
            self.log(f"error: restore call failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            with self._cond:
                self.stats.failed += len(works)
                self._running = []
                self._last_activity = time.monotonic()
            for w in works:
                w.done(None, None, f"restoring failed on the server ({type(e).__name__}: {e})")
            return
        seconds = time.monotonic() - t0
        compiled = self._account(before)
        with self._cond:
            self._compiled.setdefault(program, set()).add(b)
            self._seen.setdefault(program, works[0].options)
            self.stats.calls += 1
            self.stats.images += len(works)
            self.stats.padded_rows += b - len(works)
            self.stats.calls_by_batch[b] = self.stats.calls_by_batch.get(b, 0) + 1
            self._running = []
            self.status = ""
            self._last_activity = time.monotonic()
        for w, restored, info in results:
            info = dict(info, call=call, call_rows=len(works), call_batch_size=b,
                        call_seconds=round(seconds, 3), compiled_in_call=compiled)
            w.done(restored, info, None)

