"""A first look at a 4D-STEM file: what deepphase reads from it, and what ``reconstruct`` would do with it.

:func:`inspect_scan` reads a sample of the patterns (and, for a virtual bright-field image, all of them once) and
returns plain dicts and arrays; :func:`plot_inspection` draws the mean pattern with the disk found and the virtual
image. ``deepphase inspect FILE`` prints and draws them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DeepPhaseError, ShapeError, ValueRangeError
from .io import infer_kind, load_scan, sample_patterns, scan_shape_to_read

#: Patterns read (spread over the scan) for the mean pattern and the calibration.
INSPECT_SAMPLE = 2048
#: Patterns read at once for the virtual image.
_VIRTUAL_BATCH = 1024


def inspect_scan(path, *, dataset: str | None = None, scan_shape=None, fastest: str | None = None,
                 kind: str | None = None, gain: float = 1.0, model="default", virtual_image: bool = True,
                 sample: int = INSPECT_SAMPLE, progress: bool | None = None) -> tuple[dict, dict]:
    """What a 4D-STEM file holds, and how ``deepphase reconstruct`` would read it.

    Parameters
    ----------
    path : str or Path
        Any file :func:`deepphase.data.io.load_scan` opens.
    dataset : str, optional
        The array inside an HDF5 or zarr file.
    scan_shape : (rows, cols), optional
        For (N, k, k) frames or a detector file that does not record it.
    fastest : "row" or "col", optional
        The scan axis that varies fastest between frames (default: "col" for a file that records its scan, "row"
        for (N, k, k) frames, as ``reconstruct`` reads them).
    kind : "counts" or "amplitude", optional
        What the values are (default: what the file says, else told from the values).
    gain : float
        Detector units per electron.
    model : a packaged model's name, a model folder or a PhaseModel
        Whose grid the patterns are compared with.
    virtual_image : bool
        Also read every pattern once for a virtual bright-field image (the counts inside the disk), where the scan
        shape is known.
    sample : int
        Patterns read for the mean pattern and the calibration (spread over the scan).
    progress : bool, optional
        A progress bar for the virtual image (None: on a terminal).

    Returns
    -------
    summary : dict
        JSON-ready: the file (format, patterns, their shape and dtype, the scan shape and whence), what it records
        (scan step, energy, detector sampling), the values (kind, electrons per pattern, largest value, patterns zero
        everywhere in the sample), the bright-field disk (centre, radius, level, background, how the radius was
        measured), masked detector pixels, the model's grid (the zoom that would put the patterns on it, and whether
        ``reconstruct`` calibrates them) and the notes the calibration makes.
    arrays : dict
        ``mean_pattern`` (counts) and ``virtual_bright_field`` ((rows, cols) counts inside the disk, or None).
    """
    from ..models.modelfile import load_model
    from ..reconstruction.checks import saturation_note
    from .calibration import dark_level_note, disk_edge_note, measure_calibration

    if fastest not in (None, "row", "col"):
        raise ValueRangeError(f"fastest: expected 'row', 'col' or None, got {fastest!r}")
    if kind not in (None, "counts", "amplitude"):
        raise ValueRangeError(f"input: expected 'counts', 'amplitude' or None (told from the values), got {kind!r}")
    model = model if hasattr(model, "geometry") else load_model(model)
    scan = load_scan(path, dataset, scan_shape_to_read(path, scan_shape))
    try:
        frames = scan.frames
        n, height, width = (int(s) for s in frames.shape)
        shape, whence = scan.scan_shape, "the file's"
        if shape is not None and scan_shape is not None and tuple(int(v) for v in scan_shape) != tuple(shape):
            raise ShapeError(f"scan-shape: {scan_shape[0]}×{scan_shape[1]} given, but the file's scan is "
                             f"{shape[0]}×{shape[1]}; leave --scan-shape out")
        if shape is None and scan_shape is not None:
            shape, whence = tuple(int(s) for s in scan_shape), "given"
            if shape[0] * shape[1] != n:
                raise ShapeError(f"scan-shape: {shape[0]}×{shape[1]} = {shape[0] * shape[1]} positions do not match "
                                 f"the {n} patterns")
        order = fastest or ("col" if scan.scan_shape is not None else "row")
        summary = {"file": str(path), "format": scan.info.get("format"), "dataset": scan.info.get("dataset"),
                   "patterns": n, "pattern_shape": [height, width], "dtype": scan.info.get("dtype"),
                   "scan_shape": None if shape is None else list(shape), "scan_shape_from": whence if shape else None,
                   "fastest": order if shape else None,
                   "recorded": {k: scan.info[k] for k in ("scan_step_angstrom", "energy_kev", "detector_sampling",
                                                        "pixel_size_angstrom", "truncated") if k in scan.info}}
        _, block = sample_patterns(frames, min(256, n))
        kind = kind or scan.kind or infer_kind(block)
        counts = (block**2 if kind == "amplitude" else block) / gain
        summary["values"] = {
            "kind": kind, "gain_units_per_electron": gain,
            "electrons_per_pattern": float(counts.sum(axis=(1, 2)).mean()),
            "largest_pixel": float(block.max()),
            "patterns_zero_everywhere_in_sample": int((~block.reshape(len(block), -1).any(axis=1)).sum()),
            "sample": int(len(block))}
        notes = [text for text in (saturation_note(block, kind),) if text]
        try:
            info, arrays = measure_calibration(frames, model, kind=kind, gain=gain, max_frames=sample,
                                               what=f"data ({Path(path).name})")
        except DeepPhaseError as exc:  # no disk to find: said, and the rest still shown
            summary["disk"], info, arrays = {"found": False, "why": str(exc)}, None, None
        model_grid = (height, width) == (model.geometry.n_px,) * 2
        decision = None
        if model_grid:  # what reconstruct decides, by its own rule (the review, s41: a distance here, another rule)
            from ..reconstruction.checks import off_disk_calibration

            moved, text = off_disk_calibration(block, kind, model.probe, "auto")
            decision = ("calibrated: --gain converts the counts" if gain != 1 else
                        "calibrated: the disk is off the model's" if moved else "used as they are")
            notes += [text] if text and not moved else []
        if info is not None:
            off = float(np.abs(np.subtract(info["center_px"], info["model_disk"]["center_px"])).max()) if model_grid \
                else None
            summary["disk"] = {"found": True, "center_px": info["center_px"], "radius_px": info["radius_px"],
                               "radius_from": info["radius_from"], "level_counts": info["disk_level_counts"],
                               "background_counts": info["background_counts"]}
            summary["masked_pixels"] = info["masked_pixels"]["count"]
            summary["model"] = {"name": model.name, "grid_px": model.geometry.n_px,
                                "disk_radius_px": info["model_disk"]["radius_px"], "zoom": info["zoom"],
                                "zoom_from": info["zoom_source"], "on_its_grid": model_grid,
                                "reconstruct": decision or "calibrated onto its grid",
                                **({"disk_offset_px": off} if off is not None else {})}
            notes += [text for text in (dark_level_note(info), disk_edge_note(info)) if text]
        summary["notes"] = notes
        mean = arrays["mean_pattern"] if arrays is not None else counts.mean(axis=0)
        image = None
        if virtual_image and shape is not None and info is not None:
            image = _virtual_bright_field(frames, kind, gain, info["center_px"], info["radius_px"], shape, order,
                                          progress)
        return summary, {"mean_pattern": mean, "virtual_bright_field": image}
    finally:
        scan.close()


def _virtual_bright_field(frames, kind, gain, center, radius, shape, fastest, progress) -> np.ndarray:
    """Counts inside the disk (radius ``radius`` px around ``center``) of every pattern, as the (rows, cols) scan."""
    n, height, width = frames.shape
    rows, cols = np.indices((height, width))
    inside = np.hypot(rows - center[0], cols - center[1]) <= radius
    values = np.empty(n)
    with tqdm(total=n, desc="virtual bright field", unit="pattern", leave=False,
              disable=None if progress is None else not progress) as bar:
        for start in range(0, n, _VIRTUAL_BATCH):
            batch = np.asarray(frames[start : start + _VIRTUAL_BATCH], dtype=np.float64)
            counts = (batch**2 if kind == "amplitude" else batch) / gain
            values[start : start + len(batch)] = counts[:, inside].sum(axis=1)
            bar.update(len(batch))
    r, c = shape
    return values.reshape(r, c) if fastest == "col" else values.reshape(c, r).T


def plot_inspection(summary: dict, arrays: dict, path: str | Path) -> None:
    """A PNG: the mean pattern (log scale) with the disk found, and the virtual bright-field image where there is one.

    Parameters
    ----------
    summary, arrays : what :func:`inspect_scan` returns.
    path : where the PNG is written (atomically).
    """
    from matplotlib.patches import Circle

    from ..io_utils import new_figure, save_png

    image = arrays.get("virtual_bright_field")
    fig, axes = new_figure(1, 2 if image is not None else 1, figsize=(10 if image is not None else 5.2, 4.6),
                           squeeze=False)
    fig.set_layout_engine("constrained")  # (the colour bars' labels ran into the next panel's)
    axes = axes[0]
    mean = np.asarray(arrays["mean_pattern"], dtype=np.float64)
    shown = axes[0].imshow(np.log10(np.clip(mean, 0, None) + 1e-3 * max(float(mean.max()), 1e-12)), cmap="magma")
    fig.colorbar(shown, ax=axes[0], label="log₁₀ counts per pixel")
    disk = summary.get("disk", {})
    if disk.get("found"):
        (r0, c0), rad = disk["center_px"], disk["radius_px"]
        axes[0].add_patch(Circle((c0, r0), rad, fill=False, color="cyan", lw=1.2))
        axes[0].set_title(f"mean pattern; disk r = {rad:.2f} px at ({r0:.1f}, {c0:.1f})", fontsize=9)
    else:
        axes[0].set_title("mean pattern; no bright-field disk found", fontsize=9)
    axes[0].set_xlabel("detector column (px)")
    axes[0].set_ylabel("detector row (px)")
    if image is not None:
        shown = axes[1].imshow(image, cmap="gray")
        fig.colorbar(shown, ax=axes[1], label="counts inside the disk")
        axes[1].set_title("virtual bright field (scan as rows × columns)", fontsize=9)
        axes[1].set_xlabel("scan column")
        axes[1].set_ylabel("scan row")
    fig.suptitle(f"{Path(summary['file']).name}: {summary['patterns']:,} patterns of "
                 f"{summary['pattern_shape'][0]}×{summary['pattern_shape'][1]}", fontsize=10)
    save_png(fig, path)
