"""Image-quality metrics of the quality study (issue #18): pure functions on numpy arrays.

* `frechet_distance`: the FID formula on any feature sets (here the digit classifier's penultimate layer,
  `digits.load_classifier(OUT).features`): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with the
  covariances' matrix square root by scipy.linalg.sqrtm. As in pytorch-fid, a product whose square root is not
  finite is retried with 1e-6 added to both diagonals, and the tiny imaginary part rounding leaves is dropped
  (refused if it is not tiny). The result is clipped at 0: rounding makes identical sets give about -1e-12.
* `class_accuracy`: the fraction of images a classifier labels as their class.
* `psnr`, `ssim`: shiva_export.generate's PSNR and SSIM (Wang et al. 2004, 11x11 Gaussian window, L = 1) for
  grayscale images in [0, 1]: one [H, W] image gives a float, a stack [n, H, W] gives one value per image.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from shiva_export import generate
from shiva_export.errors import ConfigError


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two [n, d] feature sets (n >= 2 each, same d)."""
    from scipy import linalg

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ConfigError(f"frechet_distance: expected two [n >= 2, d] feature sets, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ConfigError("frechet_distance: features are not finite")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():     # singular covariances (n <= d) warn; the result is checked below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():
            offset = np.eye(len(cov_a)) * eps
            root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ConfigError(f"frechet_distance: imaginary part {np.abs(root.imag).max():.3g} in the covariance "
                              "root; the features are degenerate")
        root = root.real
    diff = mu_a - mu_b
    return max(0.0, float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root)))


def class_accuracy(classifier, images: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Fraction of [n, H, W] images whose `classifier.predict` equals their label."""
    labels = np.asarray(labels)
    predicted = np.asarray(classifier.predict(images))
    if predicted.shape != labels.shape:
        raise ConfigError(f"class_accuracy: {predicted.shape[0]} predictions for {labels.shape} labels")
    return float(np.mean(predicted == labels))


def _per_image(fn, reference: np.ndarray, image: np.ndarray, name: str) -> float | np.ndarray:
    ref, img = np.asarray(reference, np.float64), np.asarray(image, np.float64)
    if ref.shape != img.shape or ref.ndim not in (2, 3):
        raise ConfigError(f"{name}: expected two [H, W] images or [n, H, W] stacks of one shape, got {ref.shape} "
                          f"and {img.shape}")
    if ref.ndim == 2:
        return fn(ref, img)
    return np.array([fn(r, i) for r, i in zip(ref, img)])


def psnr(reference: np.ndarray, image: np.ndarray) -> float | np.ndarray:
    """PSNR in dB of grayscale images in [0, 1] (inf when equal); per image for [n, H, W] stacks."""
    return _per_image(generate.psnr, reference, image, "psnr")


def ssim(reference: np.ndarray, image: np.ndarray) -> float | np.ndarray:
    """SSIM of grayscale images in [0, 1] (1 when equal); per image for [n, H, W] stacks."""
    return _per_image(lambda r, i: generate.ssim(r[..., None], i[..., None]), reference, image, "ssim")
