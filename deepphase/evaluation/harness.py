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
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..data.simulate import SimulatedScan, required_object_shape, simulate_scan
from ..errors import DeepPhaseNote, ValueRangeError
from ..wording import in_callers_words
from ..io_utils import atomic_path, save_json, save_png
from ..physics.forward import REFERENCE_DOSE, dose_per_area
from ..physics.scan import REFERENCE_STEP_PX, raster_positions
from ..runtime import package_versions
from . import metrics

SEED_DOSE = REFERENCE_DOSE  # electrons per pattern of the original training (the reference probe's own scale)


@dataclass
class Case:
    """One specimen at one dose: the truth on the object grid and the simulated scan."""

    specimen: str
    dose: float  # electrons per pattern
    scan_shape: tuple[int, int]
    step_px: float
    scan: SimulatedScan
    pixel_size: float | None  # Å per real-space pixel, where known
    forward: str = "phase-object"  # or "multislice"
    source_size_px: float = 0.0  # σ of the finite source the data were simulated with (multislice: SOURCE_SIZE)

    @property
    def label(self) -> str:
        """The specimen's name, with the forward model when it is not the phase-object one."""
        return self.specimen if self.forward == "phase-object" else f"{self.specimen} ({self.forward})"

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
    sigma: np.ndarray | None = None  # per-pixel standard deviation on the object grid, if the method gives one


Method = Callable[[Case, np.ndarray], MethodResult]
_METHODS: dict[str, tuple[Method, str]] = {}


def register_method(name: str, description: str):
    """Decorator: make ``fn(case, probe) -> MethodResult`` available to the harness under ``name``."""

    def wrap(fn: Method) -> Method:
        _METHODS[name] = (fn, description)
        return fn

    return wrap


def list_methods() -> dict[str, str]:
    """Every registered method and its description."""
    return {name: desc for name, (_, desc) in _METHODS.items()}


def available_methods() -> list[str]:
    """The registered methods that can run here (packaged model present, optional packages installed)."""
    from ..models.modelfile import packaged_models

    out = []
    for name in _METHODS:
        if name == "seed-method" and "seed" not in packaged_models():
            continue
        if name in ("deepphase-mc", "deepphase-no-deblur"):  # 9× the cost; an ablation: ask for them by name
            continue
        if name == "ptychography":
            from .ptychography import external_python

            if not (_importable("py4DSTEM") or external_python()):
                continue
        out.append(name)
    return out


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


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


def network_method(model_path=None, stitching: str = "pairwise", remove_plane: bool = True,
                   uncertainty_samples: int = 0, ensemble=(), sigma_scale: float | None = None,
                   deblur: bool | str = "auto", sigma_head: bool = False) -> Method:
    """A method that runs :func:`deepphase.reconstruction.pipeline.reconstruct` with a model file.

    ``ensemble``: further model folders; the image is the members' mean and σ their spread (× ``sigma_scale``).
    ``sigma_head``: σ from the model's σ head (a model trained with ``--sigma-head``), with its fitted factor.
    The notes carry the factor applied to σ (``sigma_scale``), from which the harness also scores the raw σ.
    A probe-aware model is told what the probe check measures on each scan, as ``deepphase reconstruct`` tells it
    (in the method's time).
    """

    noted = []  # (the note on a model for another probe, once)

    def run(case: Case, probe: np.ndarray) -> MethodResult:
        from ..data.aberrations import told_for_scan
        from ..reconstruction.pipeline import reconstruct

        model = _model(model_path)
        own_probe = model.probe.shape == probe.shape and np.allclose(model.probe, probe, rtol=0,
                                                                      atol=1e-6 * np.abs(probe).max())
        if not own_probe and not model.probe_aware and not noted:
            noted.append(True)
            warnings.warn(f"model {model.name!r} was made for another probe than the one the cases are simulated "
                          "with (the reference probe): its scores measure it on data it was not made for",
                          DeepPhaseNote, stacklevel=2)
        t0 = time.perf_counter()
        told = None
        if model.probe_aware:
            model, told = told_for_scan(model, case.scan.amplitude, case.scan.positions)
        rec = reconstruct(case.scan.amplitude, case.scan.positions, model, stitching=stitching,
                          remove_plane=remove_plane, progress=False, uncertainty_samples=uncertainty_samples,
                          ensemble=[_model(m) for m in ensemble], sigma_scale=sigma_scale, deblur=deblur,
                          sigma_head=sigma_head, checks=False)
        seconds = time.perf_counter() - t0
        # rec.full ends at the last covered pixel; the harness compares on the whole object grid.
        phase = np.full(case.scan.truth.shape, np.nan)
        rows, cols = min(rec.full.shape[0], phase.shape[0]), min(rec.full.shape[1], phase.shape[1])
        phase[:rows, :cols] = rec.full[:rows, :cols]
        sigma = None
        if rec.uncertainty is not None:
            sigma = np.full(case.scan.truth.shape, np.nan)
            r0, c0 = rec.origin_px
            h, w = min(rec.uncertainty.shape[0], sigma.shape[0] - r0), min(rec.uncertainty.shape[1], sigma.shape[1] - c0)
            sigma[r0 : r0 + h, c0 : c0 + w] = rec.uncertainty[:h, :w]
        notes = {"model": model.name, "arch": model.arch, "weights_sha256": model.weights_sha256, "stitching": stitching,
                 "deblurred": rec.processing["deblurred"], **({} if own_probe else {"probe": "another than the data's"})}
        if told is not None:
            notes["told_edge_phase_rad"] = told["told_edge_phase_rad"]
        if rec.processing.get("uncertainty"):
            notes.update({"uncertainty": rec.processing["uncertainty"]["method"],
                          "sigma_scale": rec.processing["uncertainty"]["sigma_scale"]})
        return MethodResult(phase, seconds, notes, sigma)

    return run


# The packaged default carries a σ head: its σ costs ~4 % more time (RESULTS §19) and gets the calibration
# scored in every run.
register_method("deepphase", "packaged default model, pairwise stitching, plane removed; σ from its head")(
    network_method(sigma_head=True))
register_method("deepphase-mc", "packaged default model with 8 Monte Carlo dropout samples: a per-pixel σ "
                                "whose calibration is scored (not run unless asked)")(
    network_method(uncertainty_samples=8))
register_method("deepphase-no-deblur", "packaged default model with the blend's sub-pixel blur kept (the "
                                       "ablation of deblurring; not run unless asked)")(network_method(deblur=False))
register_method("seed-method", "the seed's recipe: seed U-Net trained the seed's way (packaged model 'seed'), "
                               "the seed's iterative stitching")(network_method("seed", stitching="seed",
                                                                                remove_plane=False))


def _register_ptychography():
    from .ptychography import ptychography_method

    register_method("ptychography", "py4DSTEM single-slice ptychography, known fixed probe, 16 iterations "
                                    "(optional: py4DSTEM here or in DEEPPHASE_PTYCHO_PYTHON)")(ptychography_method(16))


_register_ptychography()


@register_method("idpc", "integrated DPC from the centre of mass of each pattern (Fourier integration)")
def _idpc(case: Case, probe: np.ndarray) -> MethodResult:
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

# Doses are electrons per pattern. At the assumed 0.2 Å per pixel and the reference step (0.87 px), one
# pattern per 0.0303 Å²: 30 e/pattern ≈ 10³ e/Å², 3,000 ≈ 10⁵ e/Å², the seed's 27,882 ≈ 9.2·10⁵ e/Å².
PRESETS = {
    # Under 10 minutes on a 2-core CPU.
    "fast": {"scan_shape": (48, 48), "specimens": ["twisted-hbn", "cameraman"],
             "material_specimens": ["hbn", "mos2-vacancies"], "forward": ["phase-object", "multislice"],
             "doses": [30.0, 300.0, 3e3, SEED_DOSE]},
    # For a GPU: every specimen, a fine dose series from 10² to 3·10⁶ e/Å².
    "full": {"scan_shape": (128, 128), "specimens": ["twisted-hbn", "cameraman"],
             "material_specimens": "all", "forward": ["phase-object", "multislice"],
             "doses": [3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, SEED_DOSE, 1e5]},
}
FORWARD_MODELS = ("phase-object", "multislice")
# Partial spatial coherence of the multislice data: a Gaussian source of this standard deviation (Å).
SOURCE_SIZE = 0.25


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
    return _importable("abtem") and _importable("ase")


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


def make_cases(specimens, doses, probe, scan_shape=(48, 48), step_px: float = REFERENCE_STEP_PX, seed: int = 0,
               forward=("phase-object",), cache_dir=None, source_size_px: float = 0.0):
    """One simulated scan per specimen, forward model and dose (Poisson noise).

    ``source_size_px``: the phase-object scans are simulated with a finite source of this σ (real-space pixels;
    :mod:`deepphase.physics.instrument`); the multislice ones always have ``SOURCE_SIZE``.

    ``"phase-object"`` is the network's own forward model; ``"multislice"`` (material specimens only,
    abTEM) adds what it lacks: thickness, multiple scattering and a finite source (``SOURCE_SIZE``).
    Both use ``probe`` as the incident wave.
    """
    unknown = [f for f in forward if f not in FORWARD_MODELS]
    if unknown:
        raise ValueRangeError(f"forward: unknown {unknown}; expected some of {', '.join(FORWARD_MODELS)}")
    positions = raster_positions(scan_shape, step_px, fastest="row")
    shape = required_object_shape(positions, probe.shape[-1])
    for name in specimens:
        truth, pixel_size = specimen_image(name, shape, seed=seed)
        for model in forward:
            if model == "multislice" and pixel_size is None:
                continue  # procedural specimens have no atoms to propagate through
            for dose in doses:
                if model == "phase-object":
                    scan = simulate_scan(truth, probe, positions, dose=float(dose), seed=seed, progress=False,
                                         source_size_px=source_size_px)
                else:
                    from ..data import materials

                    scan = materials.multislice_scan(name, positions, n_px=probe.shape[-1], dose=float(dose),
                                                     seed=seed, probe=probe, source_size=SOURCE_SIZE,
                                                     cache_dir=cache_dir, progress=False)
                source = SOURCE_SIZE / pixel_size if model == "multislice" else float(source_size_px)
                yield Case(name, float(dose), tuple(scan_shape), step_px, scan, pixel_size, model, source)


#: What the report compares, and how each figure is made (written into its settings).
COMPARED_REGION = ("the scanned area (the span of the probe's centres) less a margin of n_px // 8 = 4 pixels, where "
                   "every method's image is finite: compared_px pixels per case, the same whichever methods run")
FIGURES = {
    "correlation": "Pearson correlation with the truth, as reconstructed (no shift, scale or offset fitted)",
    "correlation_aligned": "the same after the shift, at most MAX_SHIFT_PX = 2 px a side, that best registers it "
                           "(shift_px: row, col; a Fourier shift, which smooths nothing); being the best of many "
                           "shifts it is biased up where the correlation is poor (noise unrelated to the truth: "
                           "+0.04, against 0 plain)",
    "offset_rmse": "RMSE (rad) with the mean difference removed: a phase of the wrong size or sign counts",
    "scale": "the least-squares fit truth ≈ scale · reconstruction + offset (1: the right size; noise in the "
             "reconstruction pulls it below 1, by about the correlation²)",
    "fitted_rmse": "(results.json only) RMSE after that fit: std(truth)·√(1 − correlation²), blind to scale and "
                   "sign",
    "ssim": "structural similarity after the offset alone is removed, over the truth's range",
    "frc_resolution": "where the Fourier ring correlation with the truth first drops below 0.5 or 1/7 (Å for atomic "
                      "specimens, px otherwise; '≤' a sampling-limit bound, '≥' below it from the first ring judged), "
                      "searched from the first ring holding "
                      "1 % of the truth's power (below a lattice's first reflection there is little but slow "
                      "drifts). It measures agreement, not sharpness: a blurred truth still correlates in every "
                      "ring it has",
    "transfer_resolution": "where the transfer (each ring's gain Re ΣA·B*/Σ|B|² relative to the rings' "
                           "power-weighted mean: 1 for a uniformly scaled image) first drops below 0.5: what the "
                           "FRC cannot see, blur (a truth blurred by a Gaussian of σ = 1 px reads 3.5–4.4 px)",
}


def _evaluation_region(phases: list[np.ndarray], n_px: int, positions: np.ndarray | None = None) -> np.ndarray:
    """The scanned area (the span of the probe's centres, ``positions`` + ``n_px // 2``) where every method's
    image is finite, shrunk by a margin of ``n_px // 8`` pixels from its edge.

    At the edge every method sees the object from one side only (and iDPC integrates with a mirror
    boundary), so the margin keeps edge artefacts out of the figures without discarding the field. The scanned
    area, not the methods' own coverage, bounds it, so that a method scores the same whichever others run beside
    it (deepphase alone covered 1,296 pixels of a 48×48 scan, with iDPC 1,089: 0.811 against 0.840, RESULTS §45).
    """
    from scipy.ndimage import binary_erosion

    valid = np.logical_and.reduce([np.isfinite(p) for p in phases])
    if positions is not None:
        centres = np.asarray(positions, dtype=np.float64) + n_px // 2
        (r0, c0), (r1, c1) = np.ceil(centres.min(axis=0)).astype(int), np.floor(centres.max(axis=0)).astype(int)
        scanned = np.zeros_like(valid)
        scanned[max(r0, 0) : r1 + 1, max(c0, 0) : c1 + 1] = True
        valid &= scanned
    region = binary_erosion(valid, iterations=max(1, n_px // 8), border_value=0)
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if len(rows) < 8 or len(cols) < 8:
        raise ValueRangeError(
            f"scan-shape: the scanned area every method covers is only {len(rows)}×{len(cols)} pixels after the "
            f"edge margin of {max(1, n_px // 8)}; expected at least 8×8 (a larger scan: 20×20 or more at the "
            "reference step)"
        )
    return region


def compared_region(case: Case, phases: list[np.ndarray], n_px: int):
    """What the harness compares: (region, box, truth), the truth NaN outside the region, cut to its box.

    ``region`` is :func:`_evaluation_region` of the methods' ``phases``; a method's image is compared as
    ``np.where(region, phase, nan)[box]``.
    """
    region = _evaluation_region(phases, n_px, case.scan.positions)
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return region, box, np.where(region, case.scan.truth, np.nan)[box]


def run_evaluation(methods, specimens, doses, probe, scan_shape=(48, 48), step_px=REFERENCE_STEP_PX, seed=0,
                   progress: bool | None = None, forward=("phase-object",), cache_dir=None, repeats: int = 1,
                   divide_source: bool = False, source_size_px: float = 0.0):
    """Every method on every case; returns (rows of figures, images for the montage).

    ``source_size_px``: a finite source for the phase-object cases (:func:`make_cases`).
    ``divide_source``: where a case's data were simulated with a finite source (multislice, or ``source_size_px``), every
    method's image has the source's blur divided out (:func:`~deepphase.reconstruction.deblur.deconvolve_source`,
    as ``reconstruct --source-size`` does) before it is scored: the same post-processing for every method.

    ``repeats`` > 1 simulates every case again with seeds ``seed + 1``, ... (another specimen and other
    counting noise); each row records its ``seed``, and the montage shows the first seed's images.
    """
    unknown = [m for m in methods if m not in _METHODS]
    if unknown:
        raise ValueRangeError(f"methods: unknown {', '.join(unknown)}; expected some of {', '.join(_METHODS)} (your own "
                              "model: register_method(NAME, DESCRIPTION)(network_method(FOLDER)) first, as "
                              "`deepphase evaluate --model NAME=FOLDER` does)")
    if isinstance(repeats, bool) or not (isinstance(repeats, (int, np.integer)) and repeats >= 1):
        raise ValueRangeError(f"repeats: expected a whole number ≥ 1 of simulated realisations per case, got {repeats!r}")
    rows, images = [], {}
    total = len(specimens) * len(doses) * repeats
    bar = tqdm(total=total * len(methods), desc="evaluating", disable=None if progress is None else not progress)
    for case_seed in range(seed, seed + repeats):
        rows_seed, images_seed = _evaluate_cases(methods, specimens, doses, probe, scan_shape, step_px, case_seed,
                                                 forward, cache_dir, bar, divide_source, source_size_px)
        rows += rows_seed
        if case_seed == seed:
            images = images_seed
    bar.close()
    return rows, images


def _evaluate_cases(methods, specimens, doses, probe, scan_shape, step_px, seed, forward, cache_dir, bar,
                    divide_source=False, source_size_px=0.0):
    from ..reconstruction.deblur import deconvolve_source

    rows, images = [], {}
    for case in make_cases(specimens, doses, probe, scan_shape, step_px, seed, forward, cache_dir, source_size_px):
        results = {}
        for name in methods:
            fn, _ = _METHODS[name]
            results[name] = fn(case, probe)
            if divide_source and case.source_size_px:
                results[name].phase = deconvolve_source(results[name].phase, case.source_size_px, case.dose)
            bar.update()
        region, box, truth = compared_region(case, [r.phase for r in results.values()], probe.shape[-1])
        for name, res in results.items():
            phase = np.where(region, res.phase, np.nan)[box]
            figures = metrics.evaluate(phase, truth, pixel_size=case.pixel_size)
            if res.sigma is not None:
                cover = metrics.uncertainty_coverage(phase, truth, np.where(region, res.sigma, np.nan)[box])
                figures.update({k: cover[k] for k in ("within_1sigma", "within_2sigma", "mean_sigma")})
                scale = (res.notes or {}).get("sigma_scale")
                if scale and scale > 0:  # the raw σ too: what the calibration factor had to correct
                    raw = metrics.uncertainty_coverage(phase, truth, np.where(region, res.sigma / scale, np.nan)[box])
                    figures.update({"within_1sigma_raw": raw["within_1sigma"], "within_2sigma_raw": raw["within_2sigma"]})
            rows.append({"specimen": case.label, "forward": case.forward, "dose_e_per_pattern": case.dose,
                         "dose_e_per_A2": case.dose_per_area, "method": name, "seed": seed,
                         "compared_px": int(region.sum()),
                         "seconds": round(res.seconds, 3),
                         **{k: v for k, v in figures.items()}, **({"notes": res.notes} if res.notes else {})})
            images.setdefault((case.label, case.dose, name), phase)  # (the first seed's: the montage says so)
        images.setdefault((case.label, case.dose, "truth"), truth)
    return rows, images


def summarise(rows, figure: str = "correlation") -> list[dict]:
    """Each method's ``figure`` per dose: the mean over the cases, then over the seeds.

    With several seeds, ``{figure}_se`` is the standard error of that mean across seeds (the spread a
    re-run with other specimens and noise would show); ``{figure}_vs_{first}`` and its ``_se`` compare
    every other method with the first one seed by seed (paired, so the specimens' own spread cancels),
    and ``ahead`` counts the seeds in which the method's mean is the higher.
    """
    cases = defaultdict(list)  # (method, dose, seed) → the figure of every case
    for r in rows:
        cases[r["method"], r["dose_e_per_pattern"], r.get("seed", 0)].append(r[figure])
    methods = list(dict.fromkeys(m for m, _, _ in cases))
    doses = sorted({d for _, d, _ in cases})
    seeds = sorted({s for _, _, s in cases})
    per_seed = {(m, d): np.array([np.mean(cases[m, d, s]) for s in seeds]) for m in methods for d in doses}

    def se(values):
        return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None

    out = []
    for dose in doses:
        first = per_seed[methods[0], dose]
        for method in methods:
            values = per_seed[method, dose]
            row = {"method": method, "dose_e_per_pattern": dose, "seeds": len(seeds),
                   "cases": len(cases[method, dose, seeds[0]]), figure: float(values.mean()), f"{figure}_se": se(values)}
            if method != methods[0]:
                diff = values - first
                row.update({f"{figure}_vs_{methods[0]}": float(diff.mean()), f"{figure}_vs_{methods[0]}_se": se(diff),
                            "ahead": f"{int((diff > 0).sum())}/{len(seeds)}"})
            out.append(row)
    return out


def summary_table(summary, figure: str = "correlation") -> str:
    """:func:`summarise` as a markdown table: mean ± standard error across seeds, and the paired difference."""
    def value(mean, err, sign=""):
        return f"{mean:{sign}.4f}" + (f" ± {err:.4f}" if err is not None else "")

    first = summary[0]["method"]
    over = "cases and seeds" if summary[0]["seeds"] > 1 else "cases"
    lines = [f"| e/pattern | method | {figure}, mean over {over} | − {first}, paired by seed | seeds ahead |",
             "|---|---|---|---|---|"]
    for row in summary:
        diff = "–"
        if f"{figure}_vs_{first}" in row:
            diff = value(row[f"{figure}_vs_{first}"], row[f"{figure}_vs_{first}_se"], "+")
        lines.append(f"| {row['dose_e_per_pattern']:,.0f} | {row['method']} | {value(row[figure], row[figure + '_se'])} "
                     f"| {diff} | {row.get('ahead', '–')} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

_TABLE_COLUMNS = [("specimen", "{}"), ("dose_e_per_pattern", "{:,.0f}"), ("dose_e_per_A2", "{:,.3g}"),
                  ("method", "{}"), ("seed", "{}"), ("correlation", "{:.3f}"), ("correlation_aligned", "{:.3f}"),
                  ("shift_px", "{0[0]:+.2f}, {0[1]:+.2f}"), ("offset_rmse", "{:.3f}"), ("scale", "{:.2f}"),
                  ("ssim", "{:.3f}"),
                  ("frc_resolution_0.5", "{:.2f}"), ("frc_resolution_1/7", "{:.2f}"),
                  ("transfer_resolution_0.5", "{:.2f}"), ("seconds", "{:.2f}"),
                  ("within_1sigma", "{:.2f}"), ("within_2sigma", "{:.2f}"), ("mean_sigma", "{:.3f}"),
                  ("within_1sigma_raw", "{:.2f}"), ("within_2sigma_raw", "{:.2f}")]


def markdown_table(rows) -> str:
    """The figures as a markdown table (a column only if some row has it)."""
    columns = [(c, f) for c, f in _TABLE_COLUMNS if any(row.get(c) is not None for row in rows)
               and (c != "seed" or len({row.get("seed") for row in rows}) > 1)]
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    lines = [head, "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for col, fmt in columns:
            value = row.get(col)
            resolution = "_resolution_" in col
            unit = f" {row['resolution_unit']}" if resolution and row.get("resolution_unit") else ""
            # (a curve that never drops below its threshold gives the sampling limit: a bound, shown as one)
            bound = "≤ " if resolution and row.get(col.replace("resolution", "at_sampling_limit")) else ""
            # (below the threshold from the first ring judged: no resolution better than that ring's)
            bound = "≥ " if resolution and row.get(col.replace("resolution", "below_from_first")) else bound
            missing = value is None or (isinstance(value, float) and not np.isfinite(value))  # (as results.json says)
            cells.append("–" if missing else bound + fmt.format(value) + unit)  # (Å for atoms, pixels otherwise)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _montage(images, specimens, dose, methods, path: Path, seed_shown: str | None = None) -> None:
    from ..io_utils import new_figure

    cols = ["truth"] + list(methods)
    fig, axes = new_figure(2 * len(specimens), len(cols), figsize=(2.4 * len(cols) + 0.8, 4.4 * len(specimens)),
                             squeeze=False)
    fig.set_layout_engine("constrained")  # (room for the rows' colour bars and the titles)
    for i, spec in enumerate(specimens):
        truth = images[(spec, dose, "truth")]
        for j, name in enumerate(cols):
            image = images[(spec, dose, name)]
            title = name
            if name != "truth":  # every method at the truth's scale and offset, the scale said (a wrong one shows)
                scale, offset = metrics.fitted_scale(image, truth)
                image = image * scale + offset
                title = f"{name}\n×{scale:.2f} fitted"
            ax = axes[2 * i, j]
            shown = ax.imshow(image, cmap="magma", vmin=np.nanpercentile(truth, 1), vmax=np.nanpercentile(truth, 99))
            ax.set_title(f"{spec}\n{title}" if j == 0 else title, fontsize=8)
            ax.axis("off")
            diff = axes[2 * i + 1, j]
            if name == "truth":
                diff.axis("off")
                diff.text(0.5, 0.5, "difference\n(method − truth,\nafter scale/offset fit)", ha="center",
                          va="center", fontsize=8, transform=diff.transAxes)
                continue
            span = np.nanpercentile(np.abs(truth - np.nanmean(truth)), 99)
            differences = diff.imshow(image - truth, cmap="RdBu_r", vmin=-span, vmax=span)
            diff.axis("off")
        # One scale per row (every panel of a row shares it): the differences could not be read in rad without
        # (the outputs audit, s40).
        fig.colorbar(shown, ax=list(axes[2 * i]), fraction=0.025, pad=0.01, label="phase (rad)")
        if len(cols) > 1:
            fig.colorbar(differences, ax=list(axes[2 * i + 1]), fraction=0.025, pad=0.01, label="difference (rad)")
    fig.suptitle(f"{dose:,.0f} electrons per pattern" + (f" ({seed_shown})" if seed_shown else ""), fontsize=10)
    save_png(fig, path, dpi=110)


def _dose_series(rows, specimens, methods, path: Path) -> None:
    from ..io_utils import new_figure

    # (the RMSE with the offset alone removed: after a fitted scale too it is std(truth)·√(1 − correlation²))
    figures = [("correlation", "correlation"), ("offset_rmse", "RMSE, offset removed (rad)"), ("ssim", "SSIM")]
    fig, axes = new_figure(len(figures), len(specimens), figsize=(3.2 * len(specimens), 2.6 * len(figures)),
                             squeeze=False)
    for j, spec in enumerate(specimens):
        for i, (key, label) in enumerate(figures):
            ax = axes[i, j]
            for name in methods:
                mine = [r for r in rows if r["specimen"] == spec and r["method"] == name]
                doses = sorted({r["dose_e_per_pattern"] for r in mine})  # a point per dose: the mean over seeds
                values = [[r[key] for r in mine if r["dose_e_per_pattern"] == d] for d in doses]
                # ± the standard error over the seeds, where there are several (a bare mean before: figures audit)
                errors = [np.std(v, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0 for v in values]
                ax.errorbar(doses, [np.mean(v) for v in values], yerr=errors if any(errors) else None, marker="o",
                            capsize=2, label=name)
            ax.set_xscale("log")
            ax.set_xlabel("electrons per pattern")
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title(spec)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    seeds = len({r.get("seed", 0) for r in rows})
    if seeds > 1:
        fig.suptitle(f"mean ± standard error over {seeds} seeds", fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


REPORT_FILES = ("results.json", "results.md", "montage.png", "dose_series.png")


def check_report_folder(out_dir, overwrite: bool = False) -> Path:
    """Refuse a folder holding any of the report's files (the user's own, or an earlier report) unless asked."""
    from ..errors import OutputExistsError

    out_dir = Path(out_dir)
    existing = [name for name in REPORT_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"out: {str(out_dir)!r} already holds {', '.join(existing)}; choose another folder "
                                "or pass --overwrite")
    return out_dir


def write_report(rows, images, out_dir, settings: dict, overwrite: bool = False) -> Path:
    """results.json, results.md, montage.png and dose_series.png in ``out_dir``."""
    out_dir = check_report_folder(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "results.md"):  # an earlier report's record goes before the new figures, else an
        (out_dir / name).unlink(missing_ok=True)  # interruption leaves it describing them (the failure audit, s36)
    specimens = list(dict.fromkeys(r["specimen"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    doses = sorted({r["dose_e_per_pattern"] for r in rows})
    montage_dose = min(doses, key=lambda d: abs(np.log(d / SEED_DOSE)))
    seeds = sorted({r.get("seed", 0) for r in rows})
    _montage(images, specimens, montage_dose, methods, out_dir / "montage.png",
             seed_shown=f"seed {seeds[0]}, the first of {len(seeds)}" if len(seeds) > 1 else None)
    _dose_series(rows, specimens, methods, out_dir / "dose_series.png")
    table = markdown_table(rows)
    summary = summarise(rows)
    with atomic_path(out_dir / "results.md") as tmp:
        Path(tmp).write_text(f"# deepphase evaluate\n\n```\n{json.dumps(settings, indent=1, ensure_ascii=False)}\n```\n\n{table}\n\n"
                             f"## Correlation over the cases\n\n{summary_table(summary)}\n")
    save_json(out_dir / "results.json", {"settings": settings, "summary": summary, "results": rows})
    return out_dir


def default_cache_dir() -> Path | None:
    """Where simulated multislice data are kept between runs: ``multislice`` in the package's cache folder
    (:func:`deepphase.runtime.cache_dir`; ``~/.cache/deepphase`` unless ``$DEEPPHASE_CACHE_DIR`` says
    otherwise), or None (simulated afresh every run) when ``DEEPPHASE_CACHE_DIR=off``."""
    from ..runtime import cache_dir

    folder = cache_dir()
    return None if folder is None else folder / "multislice"


@in_callers_words(out="out_dir", **{"divide-source": ("divide_source", True), "cache-dir": "cache_dir"})
def evaluate(preset: str = "fast", out_dir="deepphase-evaluation", methods=None, specimens=None, doses=None,
             scan_shape=None, seed: int = 0, overwrite: bool = False, progress: bool | None = None,
             forward=None, cache_dir=None, repeats: int = 1, divide_source: bool = False,
             source_size_px: float = 0.0, command: str | None = None) -> tuple[list, str]:
    """Run the harness and write the report; returns (rows, markdown table).

    Parameters
    ----------
    preset : "fast" (a 2-core CPU, under 10 minutes) or "full" (a GPU).
    out_dir : the report's folder (results.json, the tables and figures).
    overwrite : replace a report already in ``out_dir`` (refused otherwise, before any work).
    progress : progress bars (tqdm): None (default) shows them where the output is a terminal.
    methods, specimens, doses, scan_shape, forward : override the preset's (doses in electrons per pattern).
    cache_dir : folder for simulated multislice data (default :func:`default_cache_dir`).
    seed, repeats : every case is simulated with seeds ``seed`` … ``seed + repeats - 1`` (specimen and
        noise). One scan per case decides a comparison at low dose by its particular noise; several
        give the summary's standard errors and paired differences (:func:`summarise`).
    source_size_px : simulate the phase-object cases with a finite source of this σ (real-space pixels).
    command : the command line that asked for the report, recorded in results.json (``deepphase evaluate`` gives it).
    divide_source : divide each case's finite source out of every method's image (:func:`run_evaluation`).
    """
    from ..data.specimens import BUILTIN_SPECIMENS
    from ..physics.probe import reference_probe

    check_report_folder(out_dir, overwrite)  # before, not after, the work
    config = resolve_preset(preset)
    def listed(value, default) -> list:
        """One name or number given alone is a list of one (not its letters); NumPy's scalars and arrays
        (np.logspace) are lists too; None or an empty list is the preset's."""
        if value is None:
            return list(default)
        if isinstance(value, (str, int, float, np.generic)):
            return [value.item() if isinstance(value, np.generic) else value]
        value = np.asarray(value).ravel().tolist() if isinstance(value, np.ndarray) else list(value)
        return value or list(default)

    methods = listed(methods, available_methods())
    specimens = listed(specimens, config["specimens"])
    forward = listed(forward, config["forward"])
    try:
        doses = [float(d) for d in listed(doses, config["doses"])]
    except (TypeError, ValueError):
        raise ValueRangeError(f"doses: expected numbers of electrons per pattern, got {doses!r}") from None
    if any(not d > 0 for d in doses):
        raise ValueRangeError(f"doses: expected positive electrons per pattern, got {doses}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueRangeError(f"seed: expected a whole number ≥ 0, got {seed!r}")
    seed, repeats = int(seed), int(repeats) if isinstance(repeats, np.integer) else repeats
    scan_shape = tuple(scan_shape or config["scan_shape"])
    if forward == ["multislice"] and not any(name not in BUILTIN_SPECIMENS for name in specimens):
        raise ValueRangeError(f"forward: multislice data are simulated for the material specimens only (hbn, "
                              f"mos2-vacancies, ...), and {', '.join(specimens)} are phase images: no case to run")
    if divide_source and not source_size_px and "multislice" not in forward:
        raise ValueRangeError("divide-source: no case has a finite source to divide out (the phase-object cases "
                              "are simulated with a coherent probe unless --source-size PX is given, and no "
                              "multislice case is run); give --source-size or drop --divide-source")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
        raise ValueRangeError(f"cache-dir: {str(cache_dir)!r} is a file; expected a folder for simulated multislice data")
    probe = reference_probe()
    # A scan too small to compare on is refused before any work (it was found after the first method had run, and
    # said as "scan_shape" on the progress bar's line: the figures audit, s41)
    from ..data.simulate import required_object_shape
    from ..physics.scan import raster_positions

    check_positions = raster_positions(scan_shape, REFERENCE_STEP_PX)
    _evaluation_region([np.zeros(required_object_shape(check_positions, probe.shape[-1]))], probe.shape[-1],
                       check_positions)
    t0 = time.perf_counter()
    rows, images = run_evaluation(methods, specimens, doses, probe, scan_shape, seed=seed, progress=progress,
                                  forward=forward, cache_dir=cache_dir, repeats=repeats, divide_source=divide_source,
                                  source_size_px=source_size_px)
    settings = {"command": command or "deepphase.evaluation.harness.evaluate(...) from Python",
                "preset": preset, "methods": {m: _METHODS[m][1] for m in methods}, "specimens": specimens,
                "forward_models": forward,
                **({"source_size_angstrom": SOURCE_SIZE} if "multislice" in forward else {}),
                "source_divided_out": divide_source, "phase_object_source_size_px": source_size_px,
                "doses_e_per_pattern": doses, "scan_shape": list(scan_shape), "step_px": REFERENCE_STEP_PX,
                "probe": "reference", "noise": "Poisson", "seed": seed, "repeats": repeats, "versions": package_versions(),
                "machine": f"{platform.machine()}, {platform.system()}, {__import__('os').cpu_count()} CPUs",
                "compared": COMPARED_REGION, "figures": FIGURES, "wall_s": round(time.perf_counter() - t0, 1)}
    write_report(rows, images, out_dir, settings, overwrite=overwrite)
    return rows, markdown_table(rows)
