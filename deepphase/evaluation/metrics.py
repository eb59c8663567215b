"""Quality figures of a reconstructed phase against the truth.

A reconstructed phase has an arbitrary constant offset (the zero frequency is not measured), so every
figure here is offset-invariant. Only pixels finite in both images are compared.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError


def _common(reconstruction: np.ndarray, truth: np.ndarray):
    reconstruction = np.asarray(reconstruction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if reconstruction.shape != truth.shape:
        raise ShapeError(f"truth: shape {truth.shape} differs from the reconstruction's {reconstruction.shape}")
    valid = np.isfinite(reconstruction) & np.isfinite(truth)
    if valid.sum() < 2:
        raise ShapeError("reconstruction: fewer than two pixels are finite in both images")
    return reconstruction[valid], truth[valid]


def correlation(reconstruction: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation coefficient over the pixels finite in both images."""
    a, b = _common(reconstruction, truth)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def fitted_rmse(reconstruction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """RMSE (rad) after the least-squares fit ``truth ≈ scale · reconstruction + offset``; returns (rmse, scale).

    The scale tells whether the phase comes out at the right size (1 is right).
    """
    a, b = _common(reconstruction, truth)
    design = np.stack([a, np.ones_like(a)], axis=1)
    (scale, offset), *_ = np.linalg.lstsq(design, b, rcond=None)
    return float(np.sqrt(np.mean((scale * a + offset - b) ** 2))), float(scale)


def offset_rmse(reconstruction: np.ndarray, truth: np.ndarray) -> float:
    """RMSE (rad) after removing the mean difference only (scale kept as reconstructed)."""
    a, b = _common(reconstruction, truth)
    d = a - b
    return float(np.sqrt(np.mean((d - d.mean()) ** 2)))
