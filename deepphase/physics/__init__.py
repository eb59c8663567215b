"""Physics: probes, the forward model with counting noise, the output geometry and scan positions.

The names below are loaded from their module at first use, so that a light import (scan positions, the
probe, the geometry: NumPy only) does not import torch with the forward model; the CLI builds its parser
and answers ``--help`` without it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "forward": ("as_complex_tensor", "diffraction_amplitude", "diffraction_intensity", "dose_per_area",
                "dose_per_pattern", "exit_wave", "far_field", "incident_counts", "poisson_counts"),
    "geometry": ("Geometry", "bin_image", "crop_window", "illuminated_mask", "output_mask", "upsample_nearest"),
    "probe": ("ProbeParameters", "angular_sampling", "electron_wavelength", "load_probe", "probe_from_parameters",
              "real_space_sampling", "reciprocal_sampling", "reference_probe", "shift_probe"),
    "scan": ("REFERENCE_STEP_PX", "flip_patterns", "object_in_scan_frame", "raster_from_positions",
             "raster_positions", "validate_positions"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
