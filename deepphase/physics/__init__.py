"""Physics: probes, the forward model with counting noise, the output geometry and scan positions."""

from .forward import (as_complex_tensor, diffraction_amplitude, diffraction_intensity, dose_per_area,
                      dose_per_pattern, exit_wave, far_field, incident_counts, poisson_counts)
from .geometry import Geometry, bin_image, crop_window, illuminated_mask, output_mask, upsample_nearest
from .probe import (ProbeParameters, angular_sampling, electron_wavelength, load_probe, probe_from_parameters,
                    real_space_sampling, reciprocal_sampling, reference_probe, shift_probe)
from .scan import REFERENCE_STEP_PX, raster_positions, validate_positions

__all__ = [n for n in dir() if not n.startswith("_")]
