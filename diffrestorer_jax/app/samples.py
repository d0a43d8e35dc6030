"""A first try without one's own photos: the held-out demo photos, degraded on request.

`strength` blends the drawn degradation with the clean photo (1: the degradation as drawn from the
training ranges, 0.5: half of it), so one compiled degradation function serves every strength; the
seed draws the degradation's parameters (the blur's path, the rain's streaks, the noise).
"""
import functools
import threading
from typing import Tuple

import numpy as np

from diffrestorer_jax.data import degradations, demo_photos

PHOTOS = demo_photos.HELD_OUT
TYPES = degradations.DEGRADATION_TYPES + ("mixed",)


class SampleError(ValueError):
    """A request for a photo or degradation that does not exist: a message."""


class SamplePhotos:
    def __init__(self, size: int):
        self.size = int(size)
        self._fn = None
        self._lock = threading.Lock()

    @functools.lru_cache(maxsize=4)
    def clean(self, photo: str) -> np.ndarray:
        if photo not in PHOTOS:
            raise SampleError(f"unknown photo {photo!r}; choose one of {', '.join(PHOTOS)}")
        return demo_photos.load_photos([photo], self.size)[0]

    def degraded(self, photo: str, kind: str, strength: float, seed: int) -> np.ndarray:
        """float32 [size, size, 3] in [0, 1]."""
        if kind not in TYPES:
            raise SampleError(f"unknown degradation {kind!r}; choose one of {', '.join(TYPES)}")
        if not 0.0 <= strength <= 1.0:
            raise SampleError(f"strength must be between 0 and 1, got {strength}")
        return self._degraded(photo, kind, round(float(strength), 3), int(seed))

    @functools.lru_cache(maxsize=32)
    def _degraded(self, photo: str, kind: str, strength: float, seed: int) -> np.ndarray:
        import jax
        clean = self.clean(photo)
        with self._lock:  # one compile, even when the first requests come together
            if self._fn is None:
                self._fn = degradations.make_degrade_fn(degradations.default_degradation_config())
        lq, _ = self._fn(jax.random.key(seed), clean[None], np.array([degradations.type_id(kind)], np.int32))
        lq = np.asarray(lq[0], np.float32)
        return np.clip(clean + strength * (lq - clean), 0.0, 1.0)

    @staticmethod
    def choices() -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        return PHOTOS, TYPES
