"""The training loop: on-the-fly simulated batches, validation and an atomic checkpoint every epoch.

Repeatability: the batches of epoch ``e`` come from a generator seeded with ``(seed, e)`` and the
global RNG (dropout) is re-seeded at the start of every epoch, so a run resumed from the checkpoint
of epoch ``e`` produces exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.phase_objects import CorpusConfig
from ..data.stream import TrainingStream
from ..errors import DeepPhaseError, InputFileError, OutputExistsError
from ..io_utils import atomic_path
from ..models import create_model
from ..models.modelfile import PhaseModel, save_model
from ..physics.forward import incident_counts
from ..physics.geometry import Geometry, output_mask
from ..physics.probe import validate_probe
from ..runtime import resolve_device
from .loss import LOSSES, masked_l1

CHECKPOINT = "checkpoint.safetensors"

# Presets: the seed's optimiser, and ours (measured better; see benchmarks/RESULTS.md).
OPTIMIZERS = {
    "seed": {"optimizer": "sgd", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant", "warmup_steps": 0},
    "default": {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4, "schedule": "cosine", "warmup_steps": 200},
}


@dataclass
class TrainConfig:
    arch: str = "seed-unet"
    epochs: int = 10
    steps_per_epoch: int = 500
    batch_size: int = 16
    preset: str = "default"
    lr: float | None = None  # None: the preset's
    dose: float | tuple[float, float] | None = None  # None: the probe's own scale (27,882 e for the reference)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    seed: int = 0
    val_size: int = 512
    device: str = "auto"
    half: bool = False  # store float16 weights in the model folder
    loss: str = "offset-free"  # or "absolute" (the seed's)

    def optimizer_settings(self) -> dict:
        if self.preset not in OPTIMIZERS:
            raise DeepPhaseError(f"preset: expected one of {', '.join(OPTIMIZERS)}, got {self.preset!r}")
        settings = dict(OPTIMIZERS[self.preset])
        if self.lr is not None:
            settings["lr"] = self.lr
        return settings

    def to_dict(self) -> dict:
        d = asdict(self)
        d["corpus"] = self.corpus.to_dict()
        if isinstance(self.dose, tuple):
            d["dose"] = list(self.dose)
        return d


def _make_optimizer(params, settings: dict):
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=settings["lr"], weight_decay=settings["weight_decay"])
    return torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"])


def _learning_rate(settings: dict, step: int, total: int) -> float:
    lr = settings["lr"]
    warmup = min(settings["warmup_steps"], total // 10)  # short runs (tests, fine-tuning) warm up briefly
    if step < warmup:
        return lr * (step + 1) / warmup
    if settings["schedule"] == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
    return lr


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    tensors, other = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                other["state"].setdefault(str(idx), {})[key] = value
    return tensors, other


def _unflatten_optimizer(tensors: dict, other: dict) -> dict:
    state: dict = {int(k): dict(v) for k, v in other["state"].items()}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": other["param_groups"]}


def save_checkpoint(path: Path, network, optimizer, epoch: int, history: list, config: TrainConfig) -> None:
    """Weights, optimiser state and progress in one safetensors file, written atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    opt_tensors, opt_other = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    meta = {"epoch": str(epoch), "history": json.dumps(history), "optimizer": json.dumps(opt_other),
            "config": json.dumps(config.to_dict())}
    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _read_checkpoint(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_state = _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")},
                                     json.loads(meta["optimizer"]))
    return int(meta["epoch"]), json.loads(meta["history"]), json.loads(meta["config"]), model_state, opt_state


def train(
    probe: np.ndarray,
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    geometry: Geometry = Geometry(),
    resume: bool = False,
    overwrite: bool = False,
    probe_info: dict | None = None,
    command: str | None = None,
    progress: bool | None = None,
    log=print,
) -> tuple[PhaseModel, list[dict]]:
    """Train a network for ``probe`` and write the model folder ``out_dir`` after every epoch.

    Parameters
    ----------
    probe : complex (n, n) array
    out_dir : folder for ``model.json``, ``model.safetensors``, ``probe.npy`` and the checkpoint.
    config : TrainConfig
    resume : continue from ``out_dir``'s checkpoint (same configuration required).
    overwrite : allow replacing an existing model in ``out_dir`` (otherwise refused).
    probe_info : what is known about the probe (name, optics, sampling), stored in model.json.

    Returns
    -------
    The trained model and the per-epoch history (train and validation loss, time).
    """
    probe = validate_probe(np.asarray(probe))
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT
    if resume and not checkpoint_path.exists():
        raise InputFileError(f"resume: no checkpoint at {str(checkpoint_path)!r} to resume from")
    if not resume and not overwrite and ((out_dir / "model.json").exists() or checkpoint_path.exists()):
        raise OutputExistsError(
            f"out: {str(out_dir)!r} already holds a model; pass --resume to continue it or --overwrite to replace it"
        )
    if probe.shape[-1] != geometry.n_px:
        raise DeepPhaseError(f"probe: expected a {geometry.n_px}×{geometry.n_px} probe for this geometry, got {probe.shape}")
    device = resolve_device(config.device)
    settings = config.optimizer_settings()
    dose = config.dose if config.dose is not None else round(incident_counts(probe), 1)
    if config.loss not in LOSSES:
        raise DeepPhaseError(f"loss: expected one of {', '.join(LOSSES)}, got {config.loss!r}")
    offset_free = config.loss == "offset-free"
    if config.batch_size < 2:
        raise DeepPhaseError(f"batch_size: expected at least 2 (batch normalisation), got {config.batch_size}")

    mask = torch.as_tensor(output_mask(probe, geometry), device=device)
    stream = TrainingStream(probe, geometry, config.corpus, dose, device)
    torch.manual_seed(config.seed)  # the initial weights are part of what the seed fixes
    network = create_model(config.arch, n_px=geometry.n_px, out_px=geometry.output_px).to(device)
    optimizer = _make_optimizer(network.parameters(), settings)
    history: list[dict] = []
    start_epoch = 0
    if resume:
        epoch_done, history, saved_config, model_state, opt_state = _read_checkpoint(checkpoint_path)
        if {k: v for k, v in saved_config.items() if k not in ("epochs", "device")} != {
            k: v for k, v in config.to_dict().items() if k not in ("epochs", "device")
        }:
            raise DeepPhaseError(
                "resume: the checkpoint was made with another configuration "
                f"({saved_config}); resume with the same arguments (only --epochs and --device may change)"
            )
        network.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        start_epoch = epoch_done + 1
        log(f"resuming {out_dir} after epoch {epoch_done + 1} of {config.epochs}")

    validation = stream.fixed_set(config.seed, config.val_size)
    total_steps = config.epochs * config.steps_per_epoch
    model = PhaseModel(network, config.arch, {"n_px": geometry.n_px, "out_px": geometry.output_px}, probe, geometry)
    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(config.seed * 7919 + epoch)
        network.train()
        t0 = time.perf_counter()
        running, losses = None, []
        batches = stream.epoch(config.seed, epoch, config.steps_per_epoch, config.batch_size)
        bar = tqdm(batches, total=config.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=None if progress is None else not progress, leave=False)
        for i, batch in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(settings, epoch * config.steps_per_epoch + i, total_steps)
            loss = masked_l1(network(batch.amplitude), batch.target, mask, offset_free)
            if not torch.isfinite(loss):
                raise DeepPhaseError(f"training diverged: the loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
        bar.close()
        val = evaluate_loss(network, validation, mask)
        elapsed = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val,
                        "seconds": round(elapsed, 2),
                        "samples_per_second": round(config.steps_per_epoch * config.batch_size / elapsed, 1)})
        model.info = {
            **(probe_info or {}),
            "training": {**config.to_dict(), "dose": dose, "optimizer_settings": settings,
                         "epochs_done": epoch + 1, "steps": (epoch + 1) * config.steps_per_epoch,
                         "history": history, "command": command or " ".join(shlex.quote(a) for a in sys.argv)},
            "validation_loss": val,
            "dose": dose,
            "phase_range": list(config.corpus.phase_range),
        }
        save_checkpoint(checkpoint_path, network, optimizer, epoch, history, config)
        save_model(model, out_dir, half=config.half)
        log(f"epoch {epoch + 1}/{config.epochs}: train loss {np.mean(losses):.4f} rad, validation loss {val:.4f} rad, "
            f"{history[-1]['samples_per_second']:.0f} samples/s; saved {out_dir}")
    network.eval()
    return model, history


@torch.no_grad()
def evaluate_loss(network, batches, mask) -> float:
    """Mean masked L1 (rad) of ``network`` over a fixed list of batches, in eval mode."""
    was_training = network.training
    network.eval()
    total, count = 0.0, 0
    for b in batches:
        total += masked_l1(network(b.amplitude), b.target, mask).item() * len(b.amplitude)
        count += len(b.amplitude)
    network.train(was_training)
    return total / count
