"""deepphase: phase images from 4D-STEM data with a convolutional network (PRL 130, 016101).

Data flow: physics → data → models → training / reconstruction → evaluation, with a thin CLI on top.

The main entry points, importable from here (each loads its module, and torch, only when first used):

- :func:`load_scan` — open a 4D-STEM file lazily (``deepphase.data.io``)
- :func:`calibrate` — detector patterns onto a model's grid (``deepphase.data.calibration``)
- :func:`load_model` — a packaged model by name (``"default"``, ``"neighbourhood"``, ``"probe-aware"``, ...) or a
  model folder (``deepphase.models.modelfile``)
- :func:`reconstruct_file` — a 4D-STEM file → a :class:`Reconstruction` (and, given a folder, its files), as
  ``deepphase reconstruct`` makes it: positions, calibration, rotation and probe checks
  (``deepphase.reconstruction.from_file``)
- :func:`reconstruct` — diffraction amplitudes and scan positions → a :class:`Reconstruction`
  (``deepphase.reconstruction.pipeline``); :func:`write_outputs` writes it with its metadata
- :func:`simulate_scan` — a scan of a phase object (``deepphase.data.simulate``)
- :func:`raster_positions` — the positions of a raster scan (``deepphase.physics.scan``)
"""

__version__ = "0.1.0"

from .errors import DeepPhaseError, DeepPhaseNote  # noqa: E402

_ENTRY_POINTS = {
    "load_scan": "deepphase.data.io",
    "calibrate": "deepphase.data.calibration",
    "load_model": "deepphase.models.modelfile",
    "reconstruct": "deepphase.reconstruction.pipeline",
    "reconstruct_file": "deepphase.reconstruction.from_file",
    "Reconstruction": "deepphase.reconstruction.pipeline",
    "write_outputs": "deepphase.reconstruction.pipeline",
    "simulate_scan": "deepphase.data.simulate",
    "raster_positions": "deepphase.physics.scan",
}

__all__ = ["DeepPhaseError", "DeepPhaseNote", "__version__", *_ENTRY_POINTS]


def __getattr__(name: str):
    # Looked up on first use (PEP 562): `import deepphase` and `deepphase --help` stay free of torch.
    if name in _ENTRY_POINTS:
        import importlib

        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'deepphase' has no attribute {name!r}")
