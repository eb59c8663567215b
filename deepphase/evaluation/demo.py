"""The demo: simulate a built-in specimen, reconstruct it with the packaged model, compare with the truth."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..data.simulate import required_object_shape, simulate_scan
from ..data.specimens import builtin_specimen
from ..errors import OutputExistsError
from ..io_utils import UNFINISHED_MARK, save_npy, unfinished_mark
from ..models.modelfile import load_model
from ..physics.scan import REFERENCE_STEP_PX, raster_positions
from ..reconstruction.pipeline import FIGURES, OUTPUT_FILES, plot_phase, reconstruct, write_outputs
from .metrics import correlation, fitted_rmse

DEMO_SCAN = (64, 64)


# What the demo writes besides write_outputs' files.
DEMO_FILES = ("truth.npy", "comparison.png")


def run_demo(out_dir: str | Path = "deepphase-demo", specimen: str = "twisted-hbn", scan_shape=DEMO_SCAN,
             dose: float | None = None, model=None, seed: int = 0, progress: bool | None = None,
             stitching: str = "pairwise", command: str | None = None) -> dict:
    """Simulate ``specimen`` at the seed's step and dose, reconstruct it, and write the outputs.

    Returns the metadata, which holds the correlation with the truth (``command``: the command line to record, as
    ``deepphase demo`` gives it). A folder that holds anything but an earlier demo's outputs is refused.
    """
    out_dir = Path(out_dir)
    meta_path = out_dir / "metadata.json"
    overwrite = (out_dir / UNFINISHED_MARK).exists()
    if meta_path.exists() and not overwrite:
        try:
            record = json.loads(meta_path.read_text())
            # ("command": "demo" marked a demo's folder before the record held the command line)
            overwrite = isinstance(record, dict) and (record.get("demo") is True or record.get("command") == "demo")
        except (json.JSONDecodeError, UnicodeDecodeError):
            overwrite = False
        if not overwrite:
            raise OutputExistsError(f"out: {str(out_dir)!r} holds results that are not a demo's; choose another folder")
    mine = [name for name in (*OUTPUT_FILES, *FIGURES, *DEMO_FILES) if (out_dir / name).exists()]
    if mine and not overwrite:  # a demo's own names, but no demo's metadata beside them: the user's files
        raise OutputExistsError(f"out: {str(out_dir)!r} holds {', '.join(mine)}, which the demo would replace; choose "
                                "another folder")
    t0 = time.perf_counter()
    model = load_model(model)
    positions = raster_positions(scan_shape, REFERENCE_STEP_PX, fastest="row")
    shape = required_object_shape(positions, model.geometry.n_px)
    truth = builtin_specimen(specimen, shape, seed=seed)
    scan = simulate_scan(truth, model.probe, positions, dose=dose, seed=seed, progress=progress)
    t1 = time.perf_counter()
    rec = reconstruct(scan.amplitude, positions, model, stitching=stitching, progress=progress)
    r0, c0 = rec.origin_px
    truth_crop = truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]]
    corr = correlation(rec.phase, truth_crop)
    rmse, scale = fitted_rmse(rec.phase, truth_crop)
    # The demo's own files first: metadata.json, written last, marks a finished set. An earlier demo's goes before
    # them, else an interruption leaves it describing this demo's truth.npy (the failure audit, s36).
    out_dir.mkdir(parents=True, exist_ok=True)
    # (an interrupted demo's files are then known as a demo's, which the next demo replaces, not the user's)
    with unfinished_mark(out_dir, (*OUTPUT_FILES, *DEMO_FILES)):
        meta_path.unlink(missing_ok=True)
        save_npy(out_dir / "truth.npy", truth_crop.astype(np.float32))
        plot_phase(rec.phase, out_dir / "comparison.png", truth=truth_crop,
                   title=f"{specimen}: {np.prod(scan_shape)} patterns, {scan.dose:.0f} e/pattern, "
                         f"correlation {corr:.3f}")
        meta = write_outputs(rec, out_dir, {
            **rec.metadata,  # what the scan checks found (the demo's geometry is right: no notes)
            "demo": True, "command": command or f"deepphase.evaluation.demo.run_demo({str(out_dir)!r})",
            "specimen": specimen, "scan_shape": list(scan_shape), "step_px": REFERENCE_STEP_PX,
            "dose_electrons_per_pattern": scan.dose, "stitching": stitching,
            "correlation_with_truth": corr, "fitted_rmse_rad": rmse, "fitted_scale": scale,
            "simulate_s": round(t1 - t0, 3), "total_s": round(time.perf_counter() - t0, 3),
            "title": f"demo: {specimen}, correlation {corr:.3f}",
        }, overwrite=overwrite, replacing=mine)  # (an earlier demo's: its record went first, above)
    return meta
