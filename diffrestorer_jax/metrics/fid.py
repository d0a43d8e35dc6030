"""Frechet Inception Distance from activation statistics (Heusel et al. 2017).

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), computed on the host in float64 with
scipy's matrix square root, because the 2048x2048 covariances of Inception pool features are badly
conditioned and float32 square roots visibly change the score. The Inception network and its weights
are the user's to supply (e.g. the pt_inception-2015-12-05 weights used by pytorch-fid/clean-fid);
this module only needs its [N, D] activations.
"""
import numpy as np
from scipy import linalg


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


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    When the product is singular (fewer images than dimensions), `eps` is added to both diagonals,
    the usual remedy; a tiny imaginary part from round-off is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g}); the covariances are not valid")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
