"""Restorers for the app: one per (settings, batch size), all sharing one set of device parameters."""
import dataclasses
import threading
from typing import Dict, Tuple

from diffrestorer_jax.infer.restorer import Options, Restorer


def batch_sizes(max_batch: int, num_devices: int) -> Tuple[int, ...]:
    """Powers of two (times the device count) up to max_batch, rounded as Restorer rounds it."""
    sizes, b = [], num_devices
    top = -(-max(1, max_batch) // num_devices) * num_devices
    while b < top:
        sizes.append(b)
        b *= 2
    sizes.append(top)
    return tuple(sizes)


def settings_key(options: Options) -> Tuple:
    """What must be equal for two images to share a call: every option but the batch layout."""
    fields = dataclasses.asdict(options)
    fields.pop("batch_size")
    fields.pop("num_devices")
    return tuple(sorted(fields.items()))


class RestorerPool:
    """Restorers by (options, batch size), all sharing the base's networks and device parameters.

    Building one is cheap (no copy of the parameters, no compile); their programs are cached per
    process by the library, so a new seed or fidelity reuses the compiled program.
    """

    def __init__(self, base: Restorer, max_restorers: int = 64):
        self.base = base
        self.max_restorers = max_restorers
        self._lock = threading.Lock()
        self._restorers: Dict[Tuple, Restorer] = {}

    def get(self, options: Options, batch_size: int = 1) -> Restorer:
        """Raises RestoreError (a message) for options the model cannot run."""
        options = dataclasses.replace(options, batch_size=batch_size, num_devices=self.base.num_devices)
        key = (settings_key(options), batch_size)
        with self._lock:
            r = self._restorers.pop(key, None)
            if r is None:
                b = self.base
                r = Restorer(b.config, b.nets, b.params, options, source=b.source)
            self._restorers[key] = r  # most recently used last
            while len(self._restorers) > self.max_restorers:
                self._restorers.pop(next(iter(self._restorers)))
            return r
