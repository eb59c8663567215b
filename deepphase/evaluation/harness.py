"""The evaluation harness: methods × specimens × doses on the same simulated scans, one report.

Every method sees the same diffraction data (one Poisson draw per specimen and dose) and returns a
phase on the object grid; every metric is computed on the same region (the pixels every method
covers, away from the scan's edge). A method is a plain function registered by name, so that a new
baseline slots in beside the others.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..data.simulate import SimulatedScan, required_object_shape, simulate_scan
from ..errors import DeepPhaseError, ValueRangeError
from ..io_utils import atomic_path, save_json
from ..physics.forward import dose_per_area, dose_per_pattern, incident_counts
from ..physics.scan import REFERENCE_STEP_PX, raster_positions
from . import metrics

SEED_DOSE = 27881.8  # electrons per pattern of the original training (the reference probe's own scale)


@dataclass
class Case:
    """One specimen at one dose: the truth on the object grid and the simulated scan."""

    specimen: str
    dose: float  # electrons per pattern
    scan_shape: tuple[int, int]
    step_px: float
    scan: SimulatedScan
    pixel_size: float | None  # Å per real-space pixel, where known

    @property
    def dose_per_area(self) -> float | None:
        if self.pixel_size is None:
            return None
        return dose_per_area(self.dose, self.step_px * self.pixel_size)


@dataclass
class MethodResult:
    phase: np.ndarray  # on the object grid, NaN where the method gives nothing
    seconds: float
    notes: dict = field(default_factory=dict)


Method = Callable[[Case, np.ndarray], MethodResult]
_METHODS: dict[str, tuple[Method, str]] = {}


def register_method(name: str, description: str):
    """Decorator: make ``fn(case, probe) -> MethodResult`` available to the harness under ``name``."""

    def wrap(fn: Method) -> Method:
        _METHODS[name] = (fn, description)
        return fn

    return wrap


def list_methods() -> dict[str, str]:
    return {name: desc for name, (_, desc) in _METHODS.items()}


# -------------------------------------------------------------------------------------------------
# Methods
# -------------------------------------------------------------------------------------------------

_MODEL_CACHE: dict[str, object] = {}


def _model(path):
    from ..models.modelfile import load_model

    key = str(path)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(path)
    return _MODEL_CACHE[key]


def network_method(model_path=None, stitching: str = "least-squares", remove_plane: bool = True) -> Method:
    """A method that runs :func:`deepphase.reconstruction.pipeline.reconstruct` with a model file."""

    def run(case: Case, probe: np.ndarray) -> MethodResult:
        from ..reconstruction.pipeline import reconstruct

        model = _model(model_path)
        t0 = time.perf_counter()
        rec = reconstruct(case.scan.amplitude, case.scan.positions, model, stitching=stitching,
                          remove_plane=remove_plane, progress=False)
        return MethodResult(rec.full.astype(np.float64), time.perf_counter() - t0,
                            {"model": model.name, "arch": model.arch, "stitching": stitching})

    return run


register_method("deepphase", "packaged default model, least-squares stitching, plane removed")(network_method())


@register_method("idpc", "integrated DPC from the centre of mass of each pattern (Fourier integration)")
def _idpc(case: Case, probe: np.ndarray) -> MethodResult:
    from scipy.ndimage import map_coordinates

    from .baselines import idpc_phase

    t0 = time.perf_counter()
    intensities = case.scan.amplitude.astype(np.float64) ** 2
    on_scan = idpc_phase(intensities, case.scan_shape, case.step_px)
    seconds = time.perf_counter() - t0
    return MethodResult(scan_grid_to_object(on_scan, case, probe.shape[-1]), seconds)


def scan_grid_to_object(on_scan: np.ndarray, case: Case, n_px: int) -> np.ndarray:
    """Resample an image sampled at the probe centres (scan grid) onto the object's pixel grid.

    The probe centre of a window at top-left ``p`` is object pixel ``p + n_px // 2`` (the FFT
    convention puts the probe's origin at index ``n // 2``). Pixels outside the scanned area are NaN.
    """
    from scipy.ndimage import map_coordinates

    positions = case.scan.positions
    origin = positions.min(axis=0) + n_px // 2
    shape = case.scan.truth.shape
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    # Raster index of each object pixel (the harness's scans are rasters with the row fastest).
    u = (rows - origin[0]) / case.step_px
    v = (cols - origin[1]) / case.step_px
    image = map_coordinates(on_scan, [u, v], order=1, mode="nearest")
    inside = (u >= 0) & (u <= case.scan_shape[0] - 1) & (v >= 0) & (v <= case.scan_shape[1] - 1)
    return np.where(inside, image, np.nan)


# -------------------------------------------------------------------------------------------------
# Cases and the run
# -------------------------------------------------------------------------------------------------

PRESETS = {
    # Under 10 minutes on a 2-core CPU.
    "fast": {"scan_shape": (48, 48), "specimens": ["twisted-hbn", "cameraman"],
             "material_specimens": ["hbn", "mos2"], "doses": [2.8e2, 2.8e3, SEED_DOSE, 2.8e5]},
    # For a GPU: every specimen, a fine dose series, the reference scan size of a quarter field.
    "full": {"scan_shape": (128, 128), "specimens": ["twisted-hbn", "cameraman"],
             "material_specimens": "all", "doses": [1e2, 3e2, 1e3, 3e3, 1e4, SEED_DOSE, 1e5, 3e5, 1e6]},
}


def specimen_image(name: str, shape, seed: int = 0) -> tuple[np.ndarray, float | None]:
    """A specimen's phase (rad) and its pixel size in Å (None for the procedural built-ins)."""
    from ..data.specimens import BUILTIN_SPECIMENS, builtin_specimen

    if name in BUILTIN_SPECIMENS:
        return builtin_specimen(name, shape, seed=seed), None
    from ..data import materials

    if name not in materials.MATERIAL_SPECIMENS:
        raise ValueRangeError(
            f"specimen: unknown {name!r}; expected one of {', '.join(BUILTIN_SPECIMENS + materials.MATERIAL_SPECIMENS)}"
        )
    return materials.material_specimen(name, shape=shape, seed=seed), materials.DEFAULT_SAMPLING


def materials_available() -> bool:
    try:
        import abtem  # noqa: F401
        import ase  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueRangeError(f"preset: unknown {preset!r}; expected one of {', '.join(PRESETS)}")
    config = dict(PRESETS[preset])
    mats = config.pop("material_specimens")
    if materials_available():
        from ..data import materials

        mats = list(materials.MATERIAL_SPECIMENS) if mats == "all" else mats
        config["specimens"] = list(config["specimens"]) + list(mats)
    return config


def make_cases(specimens, doses, probe, scan_shape=(48, 48), step_px: float = REFERENCE_STEP_PX, seed: int = 0):
    """One simulated scan per specimen and dose (phase-object forward model, Poisson noise)."""
    positions = raster_positions(scan_shape, step_px, fastest="row")
    shape = required_object_shape(positions, probe.shape[-1])
    for name in specimens:
        truth, pixel_size = specimen_image(name, shape, seed=seed)
        for dose in doses:
            scan = simulate_scan(truth, probe, positions, dose=float(dose), seed=seed, progress=False)
            yield Case(name, float(dose), tuple(scan_shape), step_px, scan, pixel_size)


def _evaluation_region(phases: list[np.ndarray], n_px: int) -> np.ndarray:
    """Pixels finite for every method, shrunk by a margin of half a probe window from the scan edge."""
    from scipy.ndimage import binary_erosion

    valid = np.logical_and.reduce([np.isfinite(p) for p in phases])
    return binary_erosion(valid, iterations=n_px // 4, border_value=0)


def run_evaluation(methods, specimens, doses, probe, scan_shape=(48, 48), step_px=REFERENCE_STEP_PX, seed=0,
                   progress: bool | None = None):
    """Every method on every case; returns (rows of figures, images for the montage)."""
    unknown = [m for m in methods if m not in _METHODS]
    if unknown:
        raise ValueRangeError(f"methods: unknown {', '.join(unknown)}; expected some of {', '.join(_METHODS)}")
    rows, images = [], {}
    cases = list(specimens)
    total = len(cases) * len(doses)
    bar = tqdm(total=total * len(methods), desc="evaluating", disable=None if progress is None else not progress)
    for case in make_cases(specimens, doses, probe, scan_shape, step_px, seed):
        results = {}
        for name in methods:
            fn, _ = _METHODS[name]
            results[name] = fn(case, probe)
            bar.update()
        region = _evaluation_region([r.phase for r in results.values()], probe.shape[-1])
        rr, cc = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
        box = (slice(rr[0], rr[-1] + 1), slice(cc[0], cc[-1] + 1))
        truth = np.where(region, case.scan.truth, np.nan)[box]
        for name, res in results.items():
            phase = np.where(region, res.phase, np.nan)[box]
            figures = metrics.evaluate(phase, truth, pixel_size=case.pixel_size)
            rows.append({"specimen": case.specimen, "dose_e_per_pattern": case.dose,
                         "dose_e_per_A2": case.dose_per_area, "method": name, "seconds": round(res.seconds, 3),
                         **{k: v for k, v in figures.items()}, **({"notes": res.notes} if res.notes else {})})
            images[(case.specimen, case.dose, name)] = phase
        images[(case.specimen, case.dose, "truth")] = truth
    bar.close()
    return rows, images


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

_TABLE_COLUMNS = [("specimen", "{}"), ("dose_e_per_pattern", "{:,.0f}"), ("dose_e_per_A2", "{:,.3g}"),
                  ("method", "{}"), ("correlation", "{:.3f}"), ("correlation_aligned", "{:.3f}"),
                  ("fitted_rmse", "{:.3f}"), ("scale", "{:.2f}"), ("ssim", "{:.3f}"),
                  ("frc_resolution_0.5", "{:.2f}"), ("frc_resolution_1/7", "{:.2f}"), ("seconds", "{:.2f}")]


def markdown_table(rows) -> str:
    head = "| " + " | ".join(c for c, _ in _TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(_TABLE_COLUMNS)]
    for row in rows:
        cells = []
        for col, fmt in _TABLE_COLUMNS:
            value = row.get(col)
            cells.append("–" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _montage(images, specimens, dose, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["truth"] + list(methods)
    fig, axes = plt.subplots(2 * len(specimens), len(cols), figsize=(2.2 * len(cols), 4.4 * len(specimens)),
                             squeeze=False)
    for i, spec in enumerate(specimens):
        truth = images[(spec, dose, "truth")]
        for j, name in enumerate(cols):
            image = images[(spec, dose, name)]
            if name != "truth":  # show every method at the truth's scale and offset
                valid = np.isfinite(image) & np.isfinite(truth)
                a = np.stack([image[valid], np.ones(valid.sum())], 1)
                coef, *_ = np.linalg.lstsq(a, truth[valid], rcond=None)
                image = image * coef[0] + coef[1]
            ax = axes[2 * i, j]
            ax.imshow(image, cmap="magma", vmin=np.nanpercentile(truth, 1), vmax=np.nanpercentile(truth, 99))
            ax.set_title(f"{spec}\n{name}" if j == 0 else name, fontsize=8)
            ax.axis("off")
            diff = axes[2 * i + 1, j]
            if name == "truth":
                diff.axis("off")
                diff.text(0.5, 0.5, "difference\n(method − truth,\nafter scale/offset fit)", ha="center",
                          va="center", fontsize=8, transform=diff.transAxes)
                continue
            span = np.nanpercentile(np.abs(truth - np.nanmean(truth)), 99)
            diff.imshow(image - truth, cmap="RdBu_r", vmin=-span, vmax=span)
            diff.axis("off")
    fig.suptitle(f"{dose:,.0f} electrons per pattern", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _dose_series(rows, specimens, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [("correlation", "correlation"), ("fitted_rmse", "RMSE after fit (rad)"), ("ssim", "SSIM")]
    fig, axes = plt.subplots(len(figures), len(specimens), figsize=(3.2 * len(specimens), 2.6 * len(figures)),
                             squeeze=False)
    for j, spec in enumerate(specimens):
        for i, (key, label) in enumerate(figures):
            ax = axes[i, j]
            for name in methods:
                pts = sorted((r["dose_e_per_pattern"], r[key]) for r in rows if r["specimen"] == spec and r["method"] == name)
                ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log")
            ax.set_xlabel("electrons per pattern")
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title(spec)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_report(rows, images, out_dir, settings: dict, overwrite: bool = False) -> Path:
    """results.json, results.md, montage.png and dose_series.png in ``out_dir``."""
    from ..errors import OutputExistsError

    out_dir = Path(out_dir)
    if (out_dir / "results.json").exists() and not overwrite:
        raise OutputExistsError(f"out: {str(out_dir)!r} already holds a report; choose another folder or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    specimens = list(dict.fromkeys(r["specimen"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    doses = sorted({r["dose_e_per_pattern"] for r in rows})
    montage_dose = min(doses, key=lambda d: abs(np.log(d / SEED_DOSE)))
    _montage(images, specimens, montage_dose, methods, out_dir / "montage.png")
    _dose_series(rows, specimens, methods, out_dir / "dose_series.png")
    table = markdown_table(rows)
    with atomic_path(out_dir / "results.md") as tmp:
        Path(tmp).write_text(f"# deepphase evaluate\n\n```\n{json.dumps(settings, indent=1)}\n```\n\n{table}\n")
    save_json(out_dir / "results.json", {"settings": settings, "results": rows})
    return out_dir


def evaluate(preset: str = "fast", out_dir="deepphase-evaluation", methods=None, specimens=None, doses=None,
             scan_shape=None, seed: int = 0, overwrite: bool = False, progress: bool | None = None) -> tuple[list, str]:
    """Run the harness and write the report; returns (rows, markdown table)."""
    import deepphase
    import torch

    from ..physics.probe import reference_probe

    config = resolve_preset(preset)
    methods = list(methods or _METHODS)
    specimens = list(specimens or config["specimens"])
    doses = [float(d) for d in (doses or config["doses"])]
    if any(not d > 0 for d in doses):
        raise ValueRangeError(f"doses: expected positive electrons per pattern, got {doses}")
    scan_shape = tuple(scan_shape or config["scan_shape"])
    probe = reference_probe()
    t0 = time.perf_counter()
    rows, images = run_evaluation(methods, specimens, doses, probe, scan_shape, seed=seed, progress=progress)
    settings = {"preset": preset, "methods": {m: _METHODS[m][1] for m in methods}, "specimens": specimens,
                "doses_e_per_pattern": doses, "scan_shape": list(scan_shape), "step_px": REFERENCE_STEP_PX,
                "probe": "reference", "forward_model": "phase object, Poisson noise", "seed": seed,
                "deepphase": deepphase.__version__, "torch": torch.__version__, "numpy": np.__version__,
                "machine": f"{platform.machine()}, {platform.system()}", "wall_s": round(time.perf_counter() - t0, 1)}
    write_report(rows, images, out_dir, settings, overwrite=overwrite)
    return rows, markdown_table(rows)
