"""Training metrics to TensorBoard event files (tensorboardX) and a console progress bar (tqdm).

Only process 0 writes; other hosts get a no-op writer, so the loop calls it unconditionally.
The log folder may be a URL (gs://...): event files are then written through etils.epath, like
every other file of a run (`_UrlRecordWriter`).
"""
import io
import logging
import os
from typing import Dict, Mapping

import jax
import numpy as np

from diffrestorer_jax import paths


class _UrlRecordWriter:
    """An event file on an object store: kept in memory, the whole object rewritten at each flush
    (object stores cannot append; tensorboardX's own gs:// and s3:// writers do the same)."""

    def __init__(self, path: str):
        self.path, self.buffer = paths.path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _UrlWriterFactory:
    def open(self, path):
        return _UrlRecordWriter(path)

    def directory_check(self, path):
        paths.path(path).mkdir(parents=True, exist_ok=True)


def _summary_writer(logdir):
    from tensorboardX import SummaryWriter, record_writer
    logdir = os.fspath(logdir)
    if paths.is_url(logdir):  # tensorboardX picks a writer by the scheme before '://'
        record_writer.register_writer_factory(logdir.split("://")[0], _UrlWriterFactory())
    else:
        os.makedirs(logdir, exist_ok=True)
    return SummaryWriter(logdir)


class MetricsWriter:
    def __init__(self, logdir: str, total_steps: int, initial_step: int = 0, enabled=None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = self._bar = None
        if not self.enabled:
            return
        from tqdm import tqdm
        self._tb = _summary_writer(logdir)
        self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, desc="train",
                         mininterval=1.0)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._tb.add_scalar(f"train/{name}", float(value), step)
        self._tb.flush()
        shown = {k: f"{float(values[k]):.4g}" for k in ("loss", "accuracy", "lr") if k in values}
        self._bar.set_postfix(shown, refresh=False)
        logging.info("step %d: %s", step, ", ".join(f"{k}={float(v):.5g}" for k, v in values.items()))

    def images(self, step: int, images: Dict[str, np.ndarray]) -> None:
        """Each value [N, H, W, 3] in [0, 1] -> one TensorBoard image grid (a row of N)."""
        if not self.enabled:
            return
        for name, batch in images.items():
            batch = np.clip(np.asarray(batch, np.float32), 0.0, 1.0)
            row = np.concatenate(list(batch), axis=1)
            self._tb.add_image(f"samples/{name}", row, step, dataformats="HWC")
        self._tb.flush()

    def print(self, line: str) -> None:
        """Print a line of the run's log above the progress bar (a bare print() would land in the
        middle of the bar's line: "train: 40%|████ | 4/10 [...]step 4 loss=...")."""
        if self.enabled:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self._bar.update(n)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
