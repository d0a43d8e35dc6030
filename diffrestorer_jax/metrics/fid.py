"""Frechet Inception Distance (Heusel et al. 2017): the features, the statistics, the distance.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), on the host in float64, because the
2048x2048 covariances of Inception pool features are badly conditioned and float32 visibly changes
the score. The trace term is computed exactly from symmetric eigen-decompositions (or, for fewer
images than dimensions, from the images' own Gram matrix) rather than pytorch-fid's general matrix
square root: same value up to round-off (pytorch-fid's 1e-6 diagonal offset for singular products
aside), no complex parts to drop, and about 5x faster at 2048 dimensions.

The activations are the 2048-d pool features of FID's Inception-v3 (`models.inception`, weights from
pytorch-fid's pt_inception-2015-12-05-6726825d.pth via `convert.inception.load_fid_inception`);
`inception_features(module, params)` makes the [N, H, W, 3] -> [N, 2048] function. FID is a
statistic of a set: with fewer images than feature dimensions (2048) the covariance is singular
and the score is biased upwards, so scores are comparable only between sets of the same size, and
published tables use thousands of images.
"""
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

FEW_IMAGES = 2048  # below this many images per set, FID is biased (singular covariances)


class RunningStatistics:
    """Mean and covariance of activations accumulated batch by batch (float64 sums), so an
    evaluation over thousands of images never holds all activations at once."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, acts) -> None:
        a = np.asarray(acts, np.float64).reshape(-1, self.sum.shape[0])
        self.n += a.shape[0]
        self.sum += a.sum(axis=0)
        self.outer += a.T @ a

    def finalize(self):
        """(mu, sigma) with the unbiased (N - 1) covariance, as np.cov(rowvar=False) gives."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


def activation_statistics(acts):
    """(mu, sigma) of [N, D] activations in float64."""
    stats = RunningStatistics(np.shape(acts)[-1])
    stats.update(acts)
    return stats.finalize()


def _psd_sqrt(s):
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1, s2) -> float:
    """tr((S1 S2)^(1/2)) for symmetric positive semi-definite S1, S2.

    S1 S2 has the eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2), all real and >= 0, so the
    trace of its square root is the sum of their square roots (round-off negatives clipped).
    """
    r = _psd_sqrt(np.asarray(s1, np.float64))
    m = r @ np.asarray(s2, np.float64) @ r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (covariances symmetric PSD)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))


def fid_from_features(a, b) -> float:
    """FID between two sets of [N, D] features (each N >= 2), exactly.

    With fewer images than dimensions, S_i = A_i^T A_i / (n_i - 1) for the centred features A_i, and
    the non-zero eigenvalues of S1 S2 are the squared singular values of A1 A2^T / sqrt((n1-1)(n2-1)):
    an n1 x n2 problem instead of a D x D one.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    if len(a) + len(b) > a.shape[1]:
        return frechet_distance(*activation_statistics(a), *activation_statistics(b))
    ca, cb = a - a.mean(0), b - b.mean(0)
    ka, kb = len(a) - 1, len(b) - 1
    diff = a.mean(0) - b.mean(0)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(ka * kb)
    return float(diff @ diff + (ca * ca).sum() / ka + (cb * cb).sum() / kb - 2.0 * cross)


def inception_features(module, params, batch_size: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping NHWC images in [0, 1] (any size, any count) to [N, 2048] float64 features.

    Images are resized to 299 by one small program per input size, then go through the network in
    batches of `batch_size` (the last one padded), so the network is compiled once.
    """
    import jax
    import jax.numpy as jnp

    prepare = jax.jit(lambda x: module.apply({}, x, method="preprocess"))
    network = jax.jit(lambda p, x: module.apply({"params": p}, x, method="features"))

    def features(images) -> np.ndarray:
        x = prepare(jnp.asarray(images, jnp.float32))
        out = []
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start:start + batch_size]
            pad = batch_size - chunk.shape[0]
            if pad:
                chunk = jnp.concatenate([chunk, jnp.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            out.append(np.asarray(network(params, chunk), np.float64)[:batch_size - pad])
        return np.concatenate(out) if out else np.zeros((0, 2048))

    return features


class FidByType:
    """FID of restored vs ground-truth images, per degradation type and over all images.

    `add(type, restored, gt)` takes one HWC pair in [0, 1] (sizes may differ between pairs) and keeps
    only its two feature vectors (float32, 8 KB each), never the images.
    """

    def __init__(self, features: Callable[[np.ndarray], np.ndarray]):
        self.features = features
        self.sets: Dict[str, Tuple[List[np.ndarray], List[np.ndarray]]] = {}

    def add(self, type_name: str, restored, gt) -> None:
        restored_set, gt_set = self.sets.setdefault(type_name, ([], []))
        restored_set.append(np.asarray(self.features(np.asarray(restored)[None])[0], np.float32))
        gt_set.append(np.asarray(self.features(np.asarray(gt)[None])[0], np.float32))

    def results(self) -> Dict[str, Any]:
        def score(restored, gt):
            return fid_from_features(np.stack(restored), np.stack(gt)) if len(restored) >= 2 else None
        every = ([f for r, _ in self.sets.values() for f in r], [f for _, g in self.sets.values() for f in g])
        counts = {t: len(r) for t, (r, _) in sorted(self.sets.items())}
        return {"computed": True, "per_type": {t: score(*self.sets[t]) for t in counts},
                "all_images": score(*every), "images": counts,
                "note": (f"restored vs GT per type; biased upwards below {FEW_IMAGES} images per set "
                         "(singular covariance): compare only sets of equal size")}
