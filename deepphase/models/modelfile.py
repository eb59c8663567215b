"""Self-describing model folders: ``model.safetensors`` + ``model.json`` + ``probe.npy``.

Loading never unpickles: weights come from safetensors, the probe from ``np.load(allow_pickle=False)``
and everything else from JSON. ``model.json`` is written last, so a folder without it is incomplete.
A folder may also hold ``model.onnx``, the network exported for ONNX Runtime
(:func:`deepphase.reconstruction.engines.export_onnx`): a graph, not code, which the ``onnx`` engine
uses only after checking it against the weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_weights, save as safetensors_bytes

from .. import __version__
from ..errors import InputFileError, ModelMismatchError, ValueRangeError
from ..wording import in_callers_words, note_to_caller
from ..io_utils import atomic_path, save_json, save_npy
from ..physics.geometry import Geometry, is_positive_number
from ..runtime import resolve_device
from .registry import create_model

FORMAT = "deepphase-model/1"
DEFAULT_MODEL = "default"


@dataclass
class PhaseModel:
    """A network with everything needed to use it on data: probe, geometry, provenance."""

    network: torch.nn.Module
    arch: str
    arch_config: dict
    probe: np.ndarray
    geometry: Geometry
    info: dict = field(default_factory=dict)  # training dose, corpus, command, history, sampling ...
    folder: Path | None = None  # where it was loaded from (its optional model.onnx is found there)
    weights_sha256: str | None = None  # of the weights file it was loaded from: which weights made a result

    @property
    def name(self) -> str:
        """What the model is called: its recorded name, else its folder's (a packaged model's is its name, e.g.
        'default'), else its architecture."""
        return self.info.get("name") or (self.folder.name if self.folder is not None else self.arch)

    def record(self) -> dict:
        """Which model this is, for a result's metadata: name, architecture, folder, training dose."""
        return {"name": self.name, "arch": self.arch, "folder": None if self.folder is None else str(self.folder),
                "dose": self.info.get("dose"), **({WEIGHTS_DIGEST: self.weights_sha256} if self.weights_sha256 else {})}

    @property
    def in_channels(self) -> int:
        """Patterns per scan position the network takes: 1, or 9 for a 3×3 neighbourhood."""
        return int(self.arch_config.get("in_channels", 1))

    @property
    def neighbourhood(self) -> dict | None:
        """``{"size": 3, "step_px": ...}`` for a neighbourhood model, None for single-pattern input.

        ``step_px`` is the scan step (real-space pixels) the model was trained at: the data's raster
        must have about this step (see :func:`deepphase.reconstruction.neighbourhood.neighbour_indices`).
        A model.json without the entry (every model before it existed) means single-pattern input.
        """
        return self.info.get("neighbourhood") if self.in_channels > 1 else None

    @property
    def probe_aware(self) -> bool:
        """Whether the network is told the data's probe (``deepphase train --probe-aware``; see models.compact)."""
        return bool(self.arch_config.get("aberration_input"))

    @property
    def aberration_range(self) -> float | None:
        """A probe-aware model's training range: the defocus, rad at the bright-field disk's edge, either way."""
        return self.info.get("training", {}).get("aberration_range") if self.probe_aware else None

    def told(self, coefficients) -> "PhaseModel":
        """A copy whose probe-aware network is told that the data's probe is this model's with
        ``Δχ = a_rr q_r² + 2 a_rc q_r q_c + a_cc q_c²`` added (rad per detector pixel², as
        :func:`deepphase.data.aberrations.measure_probe_mismatch` reports it; zeros: the model's own probe).

        The copy's network computes ``network(x)`` for that probe with every engine. This model is unchanged.
        """
        from ..data.calibration import model_disk

        if not self.probe_aware:
            raise ModelMismatchError(f"model {self.name!r} is not probe-aware (trained without --probe-aware): it "
                                     "cannot be told the data's probe")
        a = np.asarray(coefficients, dtype=np.float64).reshape(-1)
        if a.shape != (3,) or not np.all(np.isfinite(a)):
            raise ValueRangeError(f"coefficients: expected three finite numbers (a_rr, a_rc, a_cc) in rad per "
                                  f"pixel², got {coefficients!r}")
        network = copy.deepcopy(self.network)
        edge = a * model_disk(self.probe)["radius"] ** 2  # what the network is trained on: rad at the disk's edge
        network.aberration.copy_(torch.as_tensor(edge, dtype=network.aberration.dtype))
        return PhaseModel(network, self.arch, self.arch_config, self.probe, self.geometry,
                          {**self.info, "told_coefficients_rad_per_px2": a.tolist()}, self.folder, self.weights_sha256)

    def describe(self) -> dict:
        """The model.json content."""
        return {
            "format": FORMAT,
            "arch": self.arch,
            "arch_config": self.arch_config,
            "geometry": self.geometry.to_dict(),
            "probe_file": "probe.npy",
            "package_version": __version__,
            **self.info,
        }


# Largest magnitude float16 holds; beyond it a value becomes inf.
_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def _as_half(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float16 if every value fits, else unchanged.

    Batch normalisation's running variance deep in a U-Net reaches 1e9 (the seed U-Net trained on
    the atoms corpus: 3.3e9); as float16 it became inf and the network returned zeros, silently.
    """
    if not tensor.is_floating_point() or not tensor.numel():
        return tensor
    return tensor.half() if tensor.abs().max().item() <= _FLOAT16_MAX else tensor


def unmake_model(folder: Path) -> None:
    """Remove a model folder's ``model.json`` (what makes it a model) and ``model.onnx`` (an export of its weights):
    before its weights are replaced, neither may stay to describe weights it was not made from."""
    for stale in ("model.json", "model.onnx"):
        if (folder / stale).is_file():
            (folder / stale).unlink()


def save_model(model: PhaseModel, folder: str | Path, half: bool = False) -> Path:
    """Write a model folder atomically (file by file, ``model.json`` last).

    ``model.json`` marks a complete model: an earlier one is removed before the new weights are written, so that a
    write cut short leaves a folder that does not load (and says so), never new weights described by an old
    record. An earlier ``model.onnx``, exported from the weights being replaced, is removed with it.

    ``half`` stores the weights in float16 (half the file size), except tensors with values beyond
    float16's range (batch normalisation statistics, typically), which stay as they are.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unmake_model(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.network.state_dict().items()}
    if half:
        state = {k: _as_half(v) for k, v in state.items()}
    with atomic_path(folder / "model.safetensors", ".safetensors") as tmp:  # (by Python: a full disk names the file)
        blob = safetensors_bytes(state, metadata={"format": FORMAT, "arch": model.arch})
        tmp.write_bytes(blob)
    save_npy(folder / "probe.npy", np.asarray(model.probe, dtype=np.complex128))
    save_json(folder / "model.json", {**model.describe(), WEIGHTS_DIGEST: hashlib.sha256(blob).hexdigest()})
    return folder


#: model.json's record of its weights file's SHA-256: a file changed or damaged after it was written (a flipped bit
#: loaded without a word: the training audit, s40) is refused on loading.
WEIGHTS_DIGEST = "weights_sha256"


def _check_record_values(info: dict, meta_path: Path) -> None:
    """The record's values that reconstruction computes with, checked when the model loads (a model.json edited by
    hand gave a traceback halfway through a reconstruction)."""
    dose = info.get("dose")
    if dose is not None and not (is_positive_number(dose) or (
            isinstance(dose, list) and len(dose) == 2 and all(is_positive_number(d) for d in dose))):
        raise InputFileError(f"model: {str(meta_path)!r} has dose {dose!r}; expected electrons per pattern (a positive "
                             "number or a range [LO, HI]) or null")
    if info.get("sampling") is not None and not is_positive_number(info["sampling"]):
        raise InputFileError(f"model: {str(meta_path)!r} has sampling {info['sampling']!r}; expected a pixel size in Å "
                             "(a positive number) or null")
    scale = (info.get("uncertainty") or {}).get("sigma_scale") if isinstance(info.get("uncertainty"), dict) else None
    if scale is not None and not is_positive_number(scale):
        raise InputFileError(f"model: {str(meta_path)!r} has uncertainty.sigma_scale {scale!r}; expected a positive "
                             "factor (deepphase calibrate-uncertainty --overwrite fits it again)")


def packaged_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder of a model shipped inside the package."""
    return Path(str(resources.files("deepphase._resources").joinpath("models", name)))


def packaged_models() -> list[str]:
    """Names of the models shipped inside the package (``--model NAME`` picks one)."""
    root = Path(str(resources.files("deepphase._resources").joinpath("models")))
    return sorted(p.name for p in root.iterdir() if (p / "model.json").exists())


def summarise(model: PhaseModel) -> dict:
    """What a model is and was made for, in one JSON-ready dict: name, folder, architecture, parameters, input,
    the doses and probe it was trained for, the uncertainty it offers, its validation loss and the weights' size and
    SHA-256 (``deepphase models`` prints it for each packaged model).

    Parameters
    ----------
    model : PhaseModel

    Returns
    -------
    dict
    """
    from .registry import has_sigma_head

    info, training = model.info, model.info.get("training", {})
    dose = info.get("dose")
    uncertainty = []
    if has_sigma_head(model.network):
        uncertainty.append("σ head")
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in model.network.modules()):
        uncertainty.append("dropout")
    weights = model.folder / "model.safetensors" if model.folder is not None else None
    return {
        "name": model.name, "folder": None if model.folder is None else str(model.folder), "arch": model.arch,
        "parameters": int(sum(p.numel() for p in model.network.parameters())),
        "input": (f"3×3 neighbourhood at a step of {model.neighbourhood['step_px']:.3g} px" if model.neighbourhood
                  else "one pattern") + (", told the data's probe (probe-aware)" if model.probe_aware else ""),
        "grid_px": model.geometry.n_px,
        "dose_e_per_pattern": dose if dose is None or np.isscalar(dose) else [min(dose), max(dose)],
        "probe": info.get("probe"), "corpus": (training.get("corpus") or {}).get("mix"),
        "epochs": training.get("epochs_done"), "samples": (training.get("steps") or 0) * (training.get("batch_size") or 0),
        # (on the model's own validation set: its corpus and doses; not comparable between models)
        "validation_loss_rad": info.get("validation_loss"), "uncertainty": uncertainty,
        "weights_mb": None if weights is None or not weights.exists() else round(weights.stat().st_size / 1e6, 2),
        WEIGHTS_DIGEST: model.weights_sha256,
    }


def _model_folder(path) -> Path:
    """A model folder from a path, a packaged model's name, or None (the packaged default)."""
    if path is None:
        return packaged_model_path()
    if isinstance(path, str) and not Path(path).exists() and path in packaged_models():
        return packaged_model_path(path)
    return Path(path)


@in_callers_words(model="path")
def load_model(path: str | Path | None = None, device="cpu") -> PhaseModel:
    """Load a model folder, or a packaged model by name (``None``: the packaged default).

    Parameters
    ----------
    path : a model folder, its model.json, a packaged model's name (see :func:`packaged_models`), or None.
    device : where the network is put: "cpu" (default), "cuda[:N]" or "auto" (a GPU if there is one).

    Returns
    -------
    PhaseModel
        The network (in eval mode, on ``device``), its architecture and geometry, the probe it was trained for,
        and its record (``info``: training, dose, fitted uncertainty factors). Safetensors and JSON only: loading
        runs no code from the folder.
    """
    if path is not None and not isinstance(path, (str, Path)):
        raise InputFileError(f"model: expected a packaged model's name ({', '.join(packaged_models())}), a model "
                             f"folder or None, got {type(path).__name__}")
    folder = _model_folder(path)
    if folder.is_file() and folder.name in ("model.json", "model.safetensors"):
        folder = folder.parent
    if not folder.is_dir():
        raise InputFileError(
            f"model: {str(folder)!r} is not a folder (expected a model folder with model.json, or one of the "
            f"packaged models: {', '.join(packaged_models())})"
        )
    meta_path = folder / "model.json"
    if not meta_path.exists():
        hidden = (f"; it hides the packaged model {path!r}: name that one by its folder, "
                  f"{str(packaged_model_path(path))!r}" if isinstance(path, str) and path in packaged_models() else "")
        raise InputFileError(
            f"model: {str(folder)!r} has no model.json (not a deepphase model folder, or an unfinished one){hidden}"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"model: {str(meta_path)!r} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise InputFileError(f"model: {str(meta_path)!r} holds a JSON {type(meta).__name__}; expected an object")
    if meta.get("format") != FORMAT:
        raise InputFileError(f"model: {str(meta_path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    for key, kind in (("arch", str), ("geometry", dict), ("arch_config", dict)):
        if not isinstance(meta.get(key, {} if key == "arch_config" else None), kind):
            raise InputFileError(f"model: {str(meta_path)!r} has {key} {meta.get(key)!r}; expected a JSON "
                                 f"{'string' if kind is str else 'object'} (the file was edited or cut short)")
    probe_file = meta.get("probe_file", "probe.npy")
    if not isinstance(probe_file, str) or Path(probe_file).name != probe_file:  # inside the folder, nowhere else
        raise InputFileError(f"model: {str(meta_path)!r} names the probe file {probe_file!r}; expected a file name in "
                             "the model folder")
    for name in ("model.safetensors", probe_file):
        if not (folder / name).exists():
            raise InputFileError(f"model: {str(folder)!r} lacks {name}")
    try:
        network = create_model(meta["arch"], **meta.get("arch_config", {}))
        geometry = Geometry(**meta["geometry"])
    except (TypeError, ValueError, RuntimeError) as exc:  # an entry, or a value, the architecture does not take
        raise InputFileError(f"model: {str(meta_path)!r} does not describe a network we build ({exc})") from exc
    try:
        blob = (folder / "model.safetensors").read_bytes()
        weights = load_weights(blob)
    except Exception as exc:  # safetensors' own error type for a truncated or foreign file
        raise InputFileError(f"model: {str(folder / 'model.safetensors')!r} is not a readable safetensors file "
                             f"({exc}); the model folder is damaged: copy or train it again") from exc
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        missing, unexpected = _state_difference(network.state_dict(), state)
        raise InputFileError(f"model: weights in {str(folder)!r} do not fit architecture {meta['arch']!r} "
                             f"({missing}; {unexpected})") from exc
    recorded, digest = meta.get(WEIGHTS_DIGEST), hashlib.sha256(blob).hexdigest()
    if recorded is not None and recorded != digest:  # (after the fit, which names a foreign file's fault more exactly)
        raise InputFileError(f"model: {str(folder / 'model.safetensors')!r} is not the weights file its model.json "
                             "was written with (its SHA-256 differs: changed or damaged since); copy or train the "
                             "model again")
    _check_neighbourhood(meta, meta_path)
    _check_runs(network, state, geometry, int(meta.get("arch_config", {}).get("in_channels", 1)), folder)
    try:
        probe = np.load(folder / probe_file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputFileError(f"model: {str(folder / probe_file)!r} is not a readable .npy "
                             f"probe ({exc})") from exc
    info = {k: v for k, v in meta.items()
            if k not in ("format", "arch", "arch_config", "geometry", "probe_file", WEIGHTS_DIGEST)}
    _check_record_values(info, meta_path)
    if probe.shape != (geometry.n_px, geometry.n_px) or not np.all(np.isfinite(probe)) or not np.any(probe):
        raise InputFileError(f"model: the probe in {str(folder)!r} (shape {probe.shape}) is not a finite "
                             f"{geometry.n_px}×{geometry.n_px} probe; the folder is damaged")
    network.to(resolve_device(device)).eval()
    if isinstance(path, str) and path in packaged_models() and folder.resolve() != packaged_model_path(path).resolve():
        note_to_caller(f"model: {path!r} is the folder {str(folder.resolve())!r} here, which hides the packaged model "
                       f"of that name ({str(packaged_model_path(path))!r}): rename the folder, or name it by a path "
                       f"(./{path}) to mean it")
    return PhaseModel(network, meta["arch"], meta.get("arch_config", {}), probe, geometry, info, folder=folder,
                      weights_sha256=digest)


def _check_runs(network, state: dict, geometry: Geometry, channels: int, folder: Path) -> None:
    """Weights that are numbers, and a network that maps the model's patterns to its output grid: a diverged
    training's NaN weights loaded, and reconstruct then blamed the patches; an edited ``out_px`` loaded, and
    reconstruct showed PyTorch's error (the training audit, s40)."""
    bad = [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise InputFileError(f"model: the weights in {str(folder)!r} hold NaN or Inf ({bad[0]}"
                             f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}): a training that "
                             "diverged? Train it again (a lower --lr)")
    n, out = geometry.n_px, geometry.output_px
    try:
        with torch.inference_mode():
            shape = tuple(network.eval()(torch.zeros(1, channels, n, n)).shape)
    except RuntimeError as exc:
        raise InputFileError(f"model: the network in {str(folder)!r} does not run on its own {n}×{n} patterns "
                             f"({str(exc).splitlines()[0]}); the model.json was edited or is damaged") from exc
    if shape[0] != 1 or shape[1] not in (1, 2) or shape[2:] != (out, out):
        raise InputFileError(f"model: the network in {str(folder)!r} gives {shape[1:]} per pattern, where its geometry "
                             f"asks for (1 or 2, {out}, {out}); the model.json was edited or is damaged")


def _state_difference(expected: dict, given: dict) -> tuple[str, str]:
    """What a weights file lacks and what it has besides, a few names each (the full lists run to kilobytes)."""

    def few(names, what):
        names = sorted(names)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"{len(names)} {what}" + (f": {shown}" if names else "")

    mismatched = [k for k in expected.keys() & given.keys() if tuple(expected[k].shape) != tuple(given[k].shape)]
    return (few(expected.keys() - given.keys(), "missing"),
            few(list(given.keys() - expected.keys()) + mismatched, "unexpected or of another shape"))


def _check_neighbourhood(meta: dict, meta_path: Path) -> None:
    """A multi-pattern model must say which neighbourhood (size, step) it was trained on."""
    channels = int(meta.get("arch_config", {}).get("in_channels", 1))
    if channels == 1:
        return
    entry = meta.get("neighbourhood")
    size = entry.get("size") if isinstance(entry, dict) else None
    step = entry.get("step_px") if isinstance(entry, dict) else None
    if size is None or size * size != channels or not (isinstance(step, (int, float)) and step > 0):
        raise InputFileError(
            f"model: {str(meta_path)!r} has {channels} input channels but its 'neighbourhood' entry is {entry!r}; "
            f"expected {{'size': {int(round(channels ** 0.5))}, 'step_px': <positive scan step in pixels>}}"
        )


def check_compatible(model: PhaseModel, pattern_shape: tuple[int, int], sampling: float | None = None,
                     rtol: float = 0.02) -> None:
    """Refuse data that the model was not made for, saying what differs."""
    n = model.geometry.n_px
    if tuple(pattern_shape) != (n, n):
        raise ModelMismatchError(
            f"model: made for {n}×{n} diffraction patterns, but the data has "
            f"{pattern_shape[0]}×{pattern_shape[1]}; resample the data (--calibrate finds the "
            "bright-field disk and resamples detector patterns onto the model's grid) or train a model for this grid"
        )
    model_sampling = model.info.get("sampling")
    if sampling is not None and model_sampling is not None and abs(sampling - model_sampling) > rtol * model_sampling:
        raise ModelMismatchError(
            f"model: made for a real-space sampling of {model_sampling:.4g} Å/pixel, but the data has "
            f"{sampling:.4g} Å/pixel (more than {rtol:.0%} apart)"
        )
