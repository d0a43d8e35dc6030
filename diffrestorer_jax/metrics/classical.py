"""A classical, type-aware restoration anchor for the demo: per degradation type, the best of a few
scikit-image methods (an oracle: it knows the type and keeps the best method for it).

Methods (each a fixed, reasonable setting; RGB float images in [0, 1]):
  nl_means     non-local means, h = 0.8 sigma, sigma estimated from the image (Immerkaer's method:
               scikit-image's `estimate_sigma` needs PyWavelets, which is not a dependency)
  tv           total-variation denoising (Chambolle), weight 0.08
  median       3x3 median filter per channel
  clahe        contrast-limited adaptive histogram equalisation (clip limit 0.01)
  stretch      percentile contrast stretch: the 1st..99th percentile (all channels) -> [0, 1]
  unsharp      unsharp mask, Gaussian sigma 1, amount 1
  deconv       Richardson-Lucy deconvolution (10 iterations) with a Gaussian PSF, sigma 1 px

`anchor(clean, lq, names)` scores every method on every type and picks, per type, the method with
the highest mean PSNR gain over the degraded input (mean over the photos). Picking on the very images
it is scored on makes it an optimistic anchor, on purpose: the learnt model has to beat the best a
person who knows the degradation could do with these tools.
"""
from typing import Callable, Dict, List, Sequence

import numpy as np


def noise_sigma(x: np.ndarray) -> float:
    """Immerkaer (1996) Gaussian noise estimate, averaged over channels: the mean absolute response to
    a Laplacian-difference mask that cancels locally linear signal."""
    from scipy.signal import convolve2d
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    h, w = x.shape[:2]
    sig = [np.sum(np.abs(convolve2d(x[..., c], mask, mode="valid"))) for c in range(x.shape[-1])]
    return float(np.mean(sig) * np.sqrt(np.pi / 2) / (6 * (w - 2) * (h - 2)))


def _nl_means(x):
    from skimage.restoration import denoise_nl_means
    sigma = noise_sigma(x)
    return denoise_nl_means(x, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True,
                            channel_axis=-1)


def _tv(x):
    from skimage.restoration import denoise_tv_chambolle
    return denoise_tv_chambolle(x, weight=0.08, channel_axis=-1)


def _median(x):
    from skimage.filters import median
    return np.stack([median(x[..., c], footprint=np.ones((3, 3), bool)) for c in range(x.shape[-1])], -1)


def _clahe(x):
    from skimage.exposure import equalize_adapthist
    return equalize_adapthist(x, clip_limit=0.01)


def _stretch(x):
    from skimage.exposure import rescale_intensity
    lo, hi = np.percentile(x, (1, 99))
    if hi - lo < 1e-6:
        return x
    return rescale_intensity(x, in_range=(float(lo), float(hi)), out_range=(0.0, 1.0))


def _unsharp(x):
    # x + amount * (x - gaussian(x)), written out: scikit-image 0.26's `unsharp_mask` returned
    # garbage for float64 RGB input with channel_axis here
    from skimage.filters import gaussian
    return x + 1.0 * (x - gaussian(x, sigma=1.0, channel_axis=-1))


def _gaussian_psf(sigma: float = 1.0, size: int = 7) -> np.ndarray:
    r = np.arange(size) - size // 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _deconv(x):
    from skimage.restoration import richardson_lucy
    psf = _gaussian_psf()
    return np.stack([richardson_lucy(x[..., c], psf, num_iter=10, clip=True) for c in range(x.shape[-1])], -1)


METHODS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "nl_means": _nl_means, "tv": _tv, "median": _median, "clahe": _clahe, "stretch": _stretch,
    "unsharp": _unsharp, "deconv": _deconv,
}


def apply(method: str, image: np.ndarray) -> np.ndarray:
    """One method on one image [H, W, 3] in [0, 1] -> float32 [H, W, 3] in [0, 1]."""
    out = METHODS[method](np.asarray(image, np.float64))
    return np.clip(np.asarray(out, np.float32), 0.0, 1.0)


def anchor(clean: np.ndarray, lq: np.ndarray, names: Sequence[str],
           methods: Sequence[str] = tuple(METHODS)) -> List[Dict]:
    """clean [P, H, W, 3], lq [P, T, H, W, 3] (T = len(names)) -> one row per type:
    {'type', 'method' (the best), 'psnr_degraded', 'psnr', 'ssim_degraded', 'ssim', 'per_method':
    {method: mean PSNR}} (PSNR / SSIM as the demo reports them: RGB, no border crop, mean over photos)."""
    from diffrestorer_jax.metrics.psnr_ssim import psnr, ssim
    rows = []
    for t, name in enumerate(names):
        d = lq[:, t]
        scores = {}
        for m in methods:
            r = np.stack([apply(m, img) for img in d])
            scores[m] = (float(np.mean(psnr(r, clean))), float(np.mean(ssim(r, clean))))
        best = max(scores, key=lambda m: scores[m][0])
        rows.append(dict(type=name, method=best,
                         psnr_degraded=float(np.mean(psnr(d, clean))), psnr=scores[best][0],
                         ssim_degraded=float(np.mean(ssim(d, clean))), ssim=scores[best][1],
                         per_method={m: s[0] for m, s in scores.items()}))
    return rows
