"""Where the network's output lives: the illuminated mask, the crop and the upsampling.

The probe illuminates only a few real-space pixels strongly (|P|² > 0.16·max|P|²: a 3×3 block for
the reference probe). The network predicts the central ``crop_px × crop_px`` pixels of each probe
window, upsampled ``upsample``× (nearest) so that sub-pixel scan positions can be placed on a finer
grid when patches are stitched. The loss and the stitching use only the illuminated mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ShapeError, ValueRangeError


@dataclass(frozen=True)
class Geometry:
    """The seed's numbers are the defaults: 32-pixel windows, threshold 0.16, 8-pixel crop, 4× upsampling."""

    n_px: int = 32
    mask_threshold: float = 0.16
    crop_px: int = 8
    upsample: int = 4

    def __post_init__(self):
        if self.crop_px > self.n_px or self.crop_px < 1:
            raise ShapeError(f"crop_px: expected 1..{self.n_px} pixels, got {self.crop_px}")
        if self.upsample < 1:
            raise ValueRangeError(f"upsample: expected a positive integer, got {self.upsample}")
        if not 0 < self.mask_threshold < 1:
            raise ValueRangeError(f"mask_threshold: expected a fraction in (0, 1), got {self.mask_threshold}")

    @property
    def crop_start(self) -> int:
        """First row (and column) of the central crop inside the probe window."""
        return self.n_px // 2 - self.crop_px // 2

    @property
    def output_px(self) -> int:
        """Side of the network's output patch."""
        return self.crop_px * self.upsample

    def to_dict(self) -> dict:
        return asdict(self)


def illuminated_mask(probe: np.ndarray, threshold: float = 0.16) -> np.ndarray:
    """Real-space pixels where ``|P|² > threshold · max|P|²``."""
    intensity = np.abs(probe) ** 2
    return intensity > threshold * intensity.max()


def crop_window(array, geometry: Geometry):
    """The central ``crop_px × crop_px`` block of the last two axes (works for NumPy and torch)."""
    s, c = geometry.crop_start, geometry.crop_px
    return array[..., s : s + c, s : s + c]


def is_positive_number(value) -> bool:
    """A finite real number above zero (a bool is not one)."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and bool(np.isfinite(value)) and value > 0)


def check_positive(**values) -> None:
    """Refuse, naming it, any value that is not a positive number; each given as the value or (value, unit)."""
    for name, given in values.items():
        value, unit = given if isinstance(given, tuple) else (given, None)
        if not is_positive_number(value):
            raise ValueRangeError(f"{name}: expected a positive number{f' of {unit}' if unit else ''}, got {value!r}")


def _check_factor(factor) -> None:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueRangeError(f"factor: expected a positive whole number, got {factor!r}")


def upsample_nearest(array, factor: int):
    """Nearest-neighbour upsampling of the last two axes by an integer factor (NumPy or torch)."""
    _check_factor(factor)
    if factor == 1:
        return array
    return array.repeat_interleave(factor, -2).repeat_interleave(factor, -1) if hasattr(
        array, "repeat_interleave"
    ) else np.repeat(np.repeat(array, factor, -2), factor, -1)


#: A probe lighting fewer pixels than this leaves the network a phase of a pixel or two to predict.
MIN_LIT_PIXELS = 4


def output_mask(probe: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The illuminated mask on the network's output grid (cropped and upsampled), bool."""
    if probe.shape[-1] != geometry.n_px:
        raise ShapeError(f"probe: expected a {geometry.n_px}×{geometry.n_px} grid, got {probe.shape}")
    mask = crop_window(illuminated_mask(probe, geometry.mask_threshold), geometry)
    full = illuminated_mask(probe, geometry.mask_threshold)
    if 0 < full.sum() < MIN_LIT_PIXELS:
        raise ValueRangeError(
            f"probe: lights only {int(full.sum())} pixel(s) of its {geometry.n_px}×{geometry.n_px} grid (|P|² above "
            f"{geometry.mask_threshold} of its maximum): too narrow for a phase to be learnt under it (the reference "
            f"probe lights 9); expected a probe a few pixels across (from optics: a smaller --sampling or "
            "--semi-angle widens it in pixels)")
    if mask.sum() != full.sum():
        raise ShapeError(
            f"probe: the illuminated area ({int(full.sum())} pixels with |P|² above {geometry.mask_threshold} of its "
            f"maximum) extends beyond the central {geometry.crop_px}×{geometry.crop_px} pixels the network predicts; "
            f"expected a probe focused within them on its {geometry.n_px}×{geometry.n_px} grid (the reference probe "
            "lights 9 pixels of 32×32)"
        )
    if not mask.any():
        raise ValueRangeError("probe: no pixel is above the illumination threshold")
    return upsample_nearest(mask, geometry.upsample)


def bin_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor × factor`` blocks (the inverse of nearest upsampling); trims ragged edges."""
    _check_factor(factor)
    if factor == 1:
        return image
    r, c = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    return image[:r, :c].reshape(r // factor, factor, c // factor, factor).mean(axis=(1, 3))
