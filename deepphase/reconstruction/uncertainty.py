"""Calibrating the Monte Carlo dropout uncertainty on simulated scans of the model's own training corpus.

The spread of a few dropout samples measures how much the network hesitates, not how wrong it is:
measured on the evaluation harness, raw σ covers only 3–10 % of the truth pixels within ±1σ instead of
68 % (benchmarks/RESULTS.md). The usual remedy for a regression network is σ-scaling: one factor ``k``,
fitted on held-out data, such that ``k·σ`` covers the intended fraction. We fit it on scans simulated
from the model's training corpus (never on the specimens the harness scores), so the harness's
coverage on real-material specimens stays an honest test of it. The factor is stored in model.json
under ``uncertainty`` and applied by :func:`~deepphase.reconstruction.pipeline.reconstruct`.

A model trained with a σ head (``deepphase train --sigma-head``) predicts σ itself; its factor is
fitted the same way, on the same scans (``method="head"``), and stored under ``uncertainty_head``, so
the two methods are calibrated alike and compare on the harness.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.phase_objects import CorpusConfig, random_phase_objects
from ..data.simulate import required_object_shape, simulate_scan
from ..errors import ValueRangeError
from ..io_utils import save_json
from ..models.modelfile import PhaseModel, load_model
from ..physics.scan import REFERENCE_STEP_PX, raster_positions

# A Gaussian σ covers this fraction within ±1σ; the factor makes the calibration scans do the same.
ONE_SIGMA = 0.6827

# The methods a factor is fitted for, and where model.json keeps each (a σ-head model also has dropout,
# so it may carry both).
METHODS = ("dropout", "head")
RECORD_KEYS = {"dropout": "uncertainty", "head": "uncertainty_head"}


def _training_doses(model: PhaseModel, count: int) -> list[float]:
    dose = model.info.get("dose") or model.info.get("training", {}).get("dose")
    if dose is None:
        raise ValueRangeError(f"model: {model.name!r} records no training dose; give the dose to calibrate at")
    if isinstance(dose, (list, tuple)):
        lo, hi = (float(d) for d in dose)
        return list(np.geomspace(lo, hi, count))
    return [float(dose)] * count


def _corpus(model: PhaseModel) -> CorpusConfig:
    corpus = model.info.get("training", {}).get("corpus")
    if not corpus:
        return CorpusConfig()
    return CorpusConfig.from_dict(corpus)


def fit_sigma_scale(model: PhaseModel | str | Path | None = None, n_scans: int = 6, side: int = 32,
                    samples: int = 8, doses=None, seed: int = 20261125, step: float = REFERENCE_STEP_PX,
                    method: str = "dropout") -> dict:
    """Fit the factor that makes Monte Carlo dropout's σ (or the σ head's) cover 68 % of the error on simulated scans.

    Parameters
    ----------
    model : PhaseModel, a model folder, or None for the packaged default.
    n_scans : number of calibration scans, each of a new random object from the model's training corpus.
    side : scan side (positions per row and column).
    samples : dropout samples per reconstruction (use the number you will reconstruct with).
    doses : electrons per pattern of each scan (default: the training dose, or log-spaced over the
        training range).
    seed : seed of the objects and the noise (apart from any the harness uses).
    step : raster step in pixels.
    method : "dropout" (``samples`` Monte Carlo dropout draws) or "head" (the σ head of a model trained
        with ``--sigma-head``; ``samples`` unused), fitted on the same scans, so the two compare.

    Returns
    -------
    dict with ``sigma_scale`` (the factor), ``within_1sigma_raw`` / ``within_2sigma_raw`` (coverage of the
    raw σ on these scans), ``within_2sigma_scaled``, ``samples``, and how the scans were made.
    """
    from .pipeline import reconstruct

    if int(n_scans) < 1 or int(side) < 4 or int(samples) < 2:
        raise ValueRangeError(f"fit_sigma_scale: expected n_scans ≥ 1, side ≥ 4 and samples ≥ 2, "
                              f"got {n_scans}, {side}, {samples}")
    if method not in METHODS:
        raise ValueRangeError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(model, PhaseModel):
        model = load_model(model)
    head = method == "head"
    if head:
        from .predict import check_sigma_head

        check_sigma_head(model)
    doses = list(doses) if doses is not None else _training_doses(model, int(n_scans))
    if len(doses) != int(n_scans):
        raise ValueRangeError(f"doses: expected one dose per scan ({n_scans}), got {len(doses)}")
    positions = raster_positions((int(side), int(side)), step)
    shape = required_object_shape(positions, model.geometry.n_px)
    gen = torch.Generator().manual_seed(int(seed))
    corpus = _corpus(model)
    ratios = []
    for k, dose in enumerate(doses):
        obj = random_phase_objects(1, max(shape), gen, corpus)[0].numpy().astype(np.float64)[: shape[0], : shape[1]]
        scan = simulate_scan(obj, model.probe, positions, dose=float(dose), seed=int(seed) + k, progress=False)
        rec = reconstruct(scan.amplitude, positions, model, uncertainty_samples=0 if head else int(samples),
                          sigma_head=head, sigma_scale=1.0, progress=False, checks=False)
        r0, c0 = rec.origin_px
        truth = obj[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]]
        err = rec.phase - truth
        valid = np.isfinite(err) & (rec.uncertainty > 0)
        err = np.abs(err[valid] - err[valid].mean())
        ratios.append(err / rec.uncertainty[valid])
    ratio = np.concatenate(ratios)
    scale = float(np.quantile(ratio, ONE_SIGMA))
    # The error grows faster than the dropout spread as the dose falls: one factor for 10–10⁶ e/pattern
    # over-covers at high dose and under-covers at low dose, so each dose gets its own as well.
    by_dose = {}
    for dose, r in zip(doses, ratios):
        by_dose.setdefault(float(dose), []).append(r)
    scale_by_dose = [[dose, float(np.quantile(np.concatenate(r), ONE_SIGMA))] for dose, r in sorted(by_dose.items())]
    return {"method": "σ head" if head else "Monte Carlo dropout", "samples": 0 if head else int(samples),
            "sigma_scale": scale,
            "sigma_scale_by_dose": scale_by_dose,
            "within_1sigma_raw": float(np.mean(ratio <= 1)), "within_2sigma_raw": float(np.mean(ratio <= 2)),
            "within_2sigma_scaled": float(np.mean(ratio <= 2 * scale)),
            "fitted_on": {"scans": int(n_scans), "side": int(side), "step_px": float(step),
                          "doses": [float(d) for d in doses], "corpus": corpus.to_dict(), "seed": int(seed)}}


def save_sigma_scale(model_folder: str | Path, result: dict) -> Path:
    """Record a fitted factor in a model folder's model.json (atomically; the weights are untouched).

    A σ head's factor goes under ``uncertainty_head``, dropout's under ``uncertainty``.
    """
    path = Path(model_folder) / "model.json"
    if not path.exists():
        raise ValueRangeError(f"model: {str(model_folder)!r} is not a model folder (no model.json)")
    meta = json.loads(path.read_text())
    meta[RECORD_KEYS["head" if result.get("method") == "σ head" else "dropout"]] = result
    save_json(path, meta)
    return path


def _record(model: PhaseModel, method: str) -> dict:
    """The fitted record of ``method`` in model.json: ``uncertainty`` (dropout) or ``uncertainty_head``."""
    if method not in METHODS:
        raise ValueRangeError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    return model.info.get(RECORD_KEYS[method]) or {}


def sigma_scale_of(model: PhaseModel, method: str = "dropout") -> float:
    """The model's fitted factor for the dropout σ, or the σ head's (1.0 if it has none)."""
    return float(_record(model, method).get("sigma_scale", 1.0))


def sigma_scale_at(model: PhaseModel, dose: float | None, method: str = "dropout") -> tuple[float, str]:
    """The fitted factor for data of ``dose`` electrons per pattern, and where it came from.

    Each fitted dose's factor comes from a scan or two of one random object and scatters by ~2×, so
    log(factor) is fitted as a quadratic in log(dose) over the table (a line for three doses, the two
    points for two) and read at ``dose``, held constant beyond the fitted doses. The factor over all
    doses is used when the dose is unknown (data not in counts) or only one dose was fitted.
    """
    record = _record(model, method)
    table = record.get("sigma_scale_by_dose") or []
    if dose is None or len(table) < 2:
        return sigma_scale_of(model, method), "fitted for the model on simulated scans (model.json)"
    log_dose, log_factor = np.log([d for d, _ in table]), np.log([f for _, f in table])
    x = float(np.clip(np.log(dose), log_dose.min(), log_dose.max()))
    curve = np.polyfit(log_dose, log_factor, deg=min(2, len(table) - 1))
    factor = float(np.exp(np.polyval(curve, x)))
    return factor, f"fitted for the model on simulated scans, read at {dose:,.0f} e/pattern (model.json)"
