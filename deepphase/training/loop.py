"""The training loop: on-the-fly simulated batches, validation and an atomic checkpoint every epoch.

Repeatability: the batches of epoch ``e`` come from a generator seeded with ``(seed, e)`` and the
global RNG (dropout) is re-seeded at the start of every epoch, so a run resumed from the checkpoint
of epoch ``e`` produces exactly the weights of an uninterrupted run.

Several processes (PyTorch DistributedDataParallel): launched by ``torchrun`` (or ``deepphase train
--nproc N``, which calls torchrun's entry point), :func:`train` sees ``WORLD_SIZE > 1`` in the
environment, joins the process group (gloo on CPUs, NCCL on GPUs, one GPU per process:
``cuda:LOCAL_RANK``) and trains one model on a global batch of ``batch_size`` patterns split evenly
between the processes. Only rank 0 writes the checkpoint and the model folder; the checkpoint holds
the unwrapped network and the optimiser state, which do not depend on the number of processes, so a
run can be resumed with another one.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shlex
import sys
import time
import contextlib
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from ..data.phase_objects import CORPUS_FIELDS, OPTION_OF_CORPUS_FIELD, CorpusConfig
from ..data.stream import Batch, TrainingStream
from ..errors import DeepPhaseError, InputFileError, OutputExistsError
from ..wording import in_callers_words, in_fields_of
from ..io_utils import atomic_path, folder_lock, remove_leftover_temporaries, save_npy
from ..models import create_model
from ..models.registry import GRID_MULTIPLE, deployed
from ..models.modelfile import PhaseModel, save_model, unmake_model
from ..physics.forward import REFERENCE_DOSE, incident_counts
from ..physics.geometry import Geometry, output_mask
from ..physics.probe import load_probe, validate_probe
from ..physics.scan import REFERENCE_STEP_PX
from ..runtime import package_versions, resolve_device
from .loss import LOSSES, laplace_nll, masked_l1

CHECKPOINT = "checkpoint.safetensors"
# What a model folder holds besides the checkpoint (models/modelfile.save_model).
MODEL_FILES = ("model.json", "model.safetensors", "probe.npy")

# Architectures trained with the linear estimator from the intensity (models.compact; RESULTS.md §22)
# and its per-pixel gate (§23). They are architecture options rather than defaults of the model factory,
# so that model files written before them (no "linear_path" or "linear_gate" in their arch_config)
# still load as they were.
LINEAR_PATH_ARCHS = ("compact", "compact-rep")

# How the processes of a distributed run get their samples (see _rank_batches).
RANK_DATA = ("shared", "per-rank")

# Presets: the seed's optimiser, and ours (measured better; see benchmarks/RESULTS.md).
OPTIMIZERS = {
    "seed": {"optimizer": "sgd", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant", "warmup_steps": 0},
    "default": {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4, "schedule": "cosine", "warmup_steps": 200},
}


#: ``deepphase train``'s options and the :class:`TrainConfig` fields they set: its refusals name the options on the
#: command line, the fields from Python.
TRAIN_FIELDS = {
    "arch": "arch", "epochs": "epochs", "steps-per-epoch": "steps_per_epoch", "batch-size": "batch_size",
    "preset": "preset", "lr": "lr", "dose": "dose", "corpus": "corpus", "seed": "seed", "val-size": "val_size",
    "device": "device", "loss": "loss", "neighbourhood": "neighbourhood", "neighbourhood-step": "neighbourhood_step_px",
    "sigma-head": "sigma_head", "sigma-weight": "sigma_weight", "init-from": "init_from",
    "defocus-spread": "defocus_spread", "probe-aware": "aberration_range", "source-size": "source_size_px",
    "focal-spread": "focal_spread_rad",
}
OPTION_OF_FIELD = {field: option for option, field in TRAIN_FIELDS.items()}


@dataclass
class TrainConfig:
    """A training recipe: what :func:`train` makes and how, as ``deepphase train``'s options say it (the defaults
    are the command's; :meth:`like` takes a model's recorded recipe). Recorded in the model's model.json.

    ``arch`` (a registered architecture, :func:`deepphase.models.list_models`); ``epochs`` of ``steps_per_epoch``
    batches of ``batch_size`` freshly simulated patterns; ``preset`` ("default": AdamW with cosine decay, "seed":
    the paper's SGD) and ``lr`` (None: the preset's); ``dose`` in electrons per pattern, or a range (lo, hi) each
    pattern draws from (None: the probe's own scale); ``corpus`` (:class:`~deepphase.data.phase_objects.
    CorpusConfig`); ``seed``; ``val_size`` fixed validation patterns; ``device``; ``half`` (float16 weights);
    ``loss`` ("offset-free" or the seed's "absolute"); and the options in the comments below (neighbourhood, σ
    head, fine-tuning, probe-aware, partial coherence). Values with no meaning are refused when it is made.
    """

    arch: str = "unet-small"  # (the defaults are ``deepphase train``'s: a test holds them together)
    epochs: int = 10
    steps_per_epoch: int = 500
    batch_size: int = 32
    preset: str = "default"
    lr: float | None = None  # None: the preset's
    dose: float | tuple[float, float] | None = None  # None: the probe's own scale (27,882 e for the reference)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    seed: int = 0
    val_size: int = 512
    device: str = "auto"
    half: bool = False  # store float16 weights in the model folder
    loss: str = "offset-free"  # or "absolute" (the seed's)
    neighbourhood: int = 1  # 3: a 3×3 neighbourhood of patterns per sample (9 input channels)
    neighbourhood_step_px: float = REFERENCE_STEP_PX  # its scan step in real-space pixels
    sigma_head: str | None = None  # "shared" or "detached": also predict each pixel's error scale (see models.compact)
    sigma_weight: float = 1.0  # weight of that NLL beside the L1 (it shares the trunk with the phase)
    init_from: str | None = None  # a model (packaged name or folder) whose weights start the training
    defocus_spread: float = 0.0  # rad at the disk's edge: each pattern's probe defocused by up to this, either way
    # rad at the disk's edge: a probe-aware network (models.compact), trained on probes whose defocus differs by up
    # to this either way (and astigmatism by half of it) and told each pattern's difference
    aberration_range: float = 0.0
    # real-space px: the standard deviation of a Gaussian effective source (physics.instrument), or a range (lo, hi)
    # each pattern draws from; the target stays the object (which gained little: benchmarks/RESULTS.md §38)
    source_size_px: float | tuple[float, float] = 0.0
    focal_spread_rad: float | tuple[float, float] = 0.0  # rad at the disk's edge: an incoherent spread of focus, likewise

    def __post_init__(self):
        def refuse(message: str):  # (written in the command's options)
            return DeepPhaseError(in_fields_of(message, TRAIN_FIELDS))

        for name in ("epochs", "steps_per_epoch", "batch_size", "val_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise refuse(f"{OPTION_OF_FIELD[name]}: expected a positive whole number, got {value!r}")
        if self.lr is not None and not (np.isfinite(self.lr) and self.lr > 0):
            raise refuse(f"lr: expected a positive learning rate, got {self.lr!r}")
        if isinstance(self.dose, (tuple, list)) and (len(self.dose) != 2 or not 0 < self.dose[0] <= self.dose[1]):
            raise refuse(f"dose: expected a range (LO, HI) with 0 < LO ≤ HI electrons per pattern, got {self.dose!r}")
        if self.dose is not None and not isinstance(self.dose, (tuple, list)) and not (
                isinstance(self.dose, (int, float, np.integer, np.floating)) and np.isfinite(self.dose) and self.dose > 0):
            raise refuse(f"dose: expected a positive number of electrons per pattern, got {self.dose!r}")
        from ..models.registry import list_models

        choices = {"arch": list_models(), "preset": list(OPTIMIZERS), "loss": list(LOSSES),
                   "sigma_head": [None, True, "shared", "detached"]}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise refuse(f"{OPTION_OF_FIELD[name]}: expected one of {', '.join(repr(a) for a in allowed)}, "
                             f"got {getattr(self, name)!r}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or self.device.startswith("cuda:")):
            raise refuse(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

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
        if self.neighbourhood == 1:  # single-pattern runs keep the keys (and checkpoints) they always had
            del d["neighbourhood"], d["neighbourhood_step_px"]
        if not self.sigma_head:  # likewise runs without the σ head
            del d["sigma_head"], d["sigma_weight"]
        if self.init_from is None:  # and runs from random weights
            del d["init_from"]
        if not self.defocus_spread:  # and runs with the probe as given
            del d["defocus_spread"]
        if not self.aberration_range:  # and networks that are not probe-aware
            del d["aberration_range"]
        for name in ("source_size_px", "focal_spread_rad"):  # and a coherent probe
            if not np.any(getattr(self, name)):
                del d[name]
            elif isinstance(getattr(self, name), tuple):
                d[name] = list(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, record: dict) -> "TrainConfig":
        """The inverse of :meth:`to_dict` (what a model.json's ``training`` records; its other entries, such as the
        optimiser's settings and the history, are left out)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in record.items() if k in fields}
        if isinstance(kept.get("corpus"), dict):
            kept["corpus"] = CorpusConfig.from_dict(kept["corpus"])
        for name in ("dose", "source_size_px", "focal_spread_rad"):  # (a range: JSON's list, the config's tuple)
            if isinstance(kept.get(name), list):
                kept[name] = tuple(kept[name])
        return cls(**kept)

    @classmethod
    def like(cls, model="default", **changes) -> "TrainConfig":
        """The recipe ``model`` (a packaged model's name, a folder or a loaded model) records, as ``deepphase train
        --like MODEL`` takes it from the command line such a model records (not what it started from,
        ``init_from``), with ``changes`` (fields) on top: ``TrainConfig.like("default", epochs=2)``. It reads the
        model's record, the command its command line (the two differ only in ``half``, which a model stored in float16
        after training records and its command may not say); for a model trained from Python both read the record."""
        from ..models.modelfile import PhaseModel, load_model

        loaded = model if isinstance(model, PhaseModel) else load_model(model)
        record = (loaded.info or {}).get("training")
        if not isinstance(record, dict):
            raise DeepPhaseError(f"model: {loaded.name!r} records no training recipe to start from")
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise DeepPhaseError(f"changes: {', '.join(unknown)} are not TrainConfig fields")
        recipe = {k: v for k, v in record.items() if k != "init_from"}
        return dataclasses.replace(cls.from_dict(recipe), **changes)

    def arch_config(self, geometry: Geometry) -> dict:
        """The architecture's configuration (``in_channels`` only for a neighbourhood, ``sigma_head`` only with it)."""
        config = {"n_px": geometry.n_px, "out_px": geometry.output_px}
        if self.neighbourhood > 1:
            config["in_channels"] = self.neighbourhood**2
        if self.sigma_head:
            config["sigma_head"] = "shared" if self.sigma_head is True else self.sigma_head
        if self.arch in LINEAR_PATH_ARCHS:
            config["linear_path"] = config["linear_gate"] = True
        if self.aberration_range:
            if self.arch not in LINEAR_PATH_ARCHS:
                raise DeepPhaseError(f"probe-aware: a probe-aware network is a compact one ("
                                     f"{' or '.join('--arch ' + a for a in LINEAR_PATH_ARCHS)}), got --arch {self.arch}")
            config["aberration_input"] = True
        return config


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


def probe_digest(probe: np.ndarray) -> str:
    """The probe a training is for, as the checkpoint records it: its shape and complex128 values, hashed."""
    import hashlib

    values = np.ascontiguousarray(probe, dtype=np.complex128)
    return f"{values.shape[0]}x{values.shape[1]}:" + hashlib.sha256(values.tobytes()).hexdigest()


def save_checkpoint(path: Path, network, optimizer, epoch: int, history: list, config: TrainConfig,
                    probe: np.ndarray | None = None) -> None:
    """Weights, optimiser state and progress in one safetensors file, written atomically; with ``probe``, its
    :func:`probe_digest`, which a resumption checks where the folder's probe.npy is gone."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    opt_tensors, opt_other = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    meta = {"epoch": str(epoch), "history": json.dumps(history), "optimizer": json.dumps(opt_other),
            "config": json.dumps(config.to_dict()), **({"probe": probe_digest(probe)} if probe is not None else {})}
    with atomic_path(path, ".safetensors") as tmp:  # (written by Python: a full disk is an OSError naming the file)
        tmp.write_bytes(safetensors_bytes(tensors, metadata=meta))


def _read_checkpoint(path: Path):
    return _checkpoint_from_bytes(Path(path).read_bytes(), path)


def _checkpoint_from_bytes(blob: bytes, path=CHECKPOINT):
    """The checkpoint's epoch, history, config, model and optimiser state from the file's bytes (the safetensors
    header holds the metadata); a file cut short or not a checkpoint is refused, saying so."""
    from safetensors.torch import load

    try:
        header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
        return _unpack_checkpoint(header.get("__metadata__") or {}, load(blob))
    except Exception as exc:  # safetensors' errors, a JSON error, a missing entry: all mean a damaged file
        raise DeepPhaseError(f"resume: {str(path)!r} is not a readable training checkpoint ({type(exc).__name__}: "
                             f"{exc}); --overwrite starts the training afresh") from exc


def _unpack_checkpoint(meta: dict, tensors: dict):
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_state = _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")},
                                     json.loads(meta["optimizer"]))
    return (int(meta["epoch"]), json.loads(meta["history"]), json.loads(meta["config"]), model_state, opt_state,
            meta.get("probe"))


#: ``deepphase train``'s options as :func:`train`'s keywords and :class:`TrainConfig`'s fields, for its messages
#: (written in the options, which the command's users read).
TRAIN_KEYWORDS = {
    "out": "out_dir", "probe": "probe", "grid": "geometry.n_px",
    **{option: f"config.{field}" for option, field in TRAIN_FIELDS.items() if option != "sigma-head"},
    **{option: f"config.corpus.{field}" for option, field in CORPUS_FIELDS.items()},
    "half": ("config.half", True), "sigma-head": ("config.sigma_head", "shared"),
    "sampling": None, "semi-angle": None, "energy": None,  # (the command's probe from optics: options, left so)
}


@in_callers_words(**TRAIN_KEYWORDS)
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
    rank_data: str = "shared",
) -> tuple[PhaseModel, list[dict]]:
    """Train a network for ``probe`` and write the model folder ``out_dir`` after every epoch.

    Parameters
    ----------
    probe : complex (n, n) array, an .npy file of one, or "reference"
    out_dir : folder for ``model.json``, ``model.safetensors``, ``probe.npy`` and the checkpoint.
    config : TrainConfig
    resume : continue from ``out_dir``'s checkpoint (same configuration required).
    overwrite : allow replacing an existing model in ``out_dir`` (otherwise refused).
    probe_info : what is known about the probe (name, optics, sampling), stored in model.json.
    rank_data : with several processes, "shared" (each simulates the global batch and keeps its slice:
        the same samples as one process) or "per-rank" (each simulates only its own share from its own
        seed); see :func:`_rank_batches`.

    Returns
    -------
    The trained model and the per-epoch history (train and validation loss, time).
    """
    if isinstance(probe, (str, Path)):  # an .npy file, or "reference", as --probe takes it
        probe = load_probe(probe)
    if not isinstance(config, TrainConfig):
        raise DeepPhaseError(f"config: expected a TrainConfig, got {type(config).__name__} (TrainConfig(**settings) "
                             "makes one)")
    if not isinstance(geometry, Geometry):
        raise DeepPhaseError(f"geometry: expected a Geometry, got {type(geometry).__name__}")
    probe = validate_probe(np.asarray(probe))
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT
    world, rank, local_rank = distributed_context()
    if world == 1:
        check_out_dir(out_dir, resume, overwrite)
    else:
        if rank_data not in RANK_DATA:
            raise DeepPhaseError(f"rank_data: expected one of {', '.join(RANK_DATA)}, got {rank_data!r}")
        check_batch_split(config.batch_size, world)
        if rank != 0:  # one voice: rank 0 logs and shows progress
            log, progress = (lambda *_: None), False
    if probe.shape[-1] != geometry.n_px:
        raise DeepPhaseError(f"probe: expected a {geometry.n_px}×{geometry.n_px} probe for this geometry, got {probe.shape}")
    if geometry.n_px % GRID_MULTIPLE:
        raise DeepPhaseError(f"grid: the networks halve the pattern grid three times, so it must be a multiple of "
                             f"{GRID_MULTIPLE} pixels; this probe's is {geometry.n_px}×{geometry.n_px}")
    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DeepPhaseError(f"device: process {local_rank} of this machine needs GPU {local_rank}, but only "
                                 f"{torch.cuda.device_count()} are visible; start at most one process per GPU")
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    settings = config.optimizer_settings()
    dose = config.dose if config.dose is not None else round(incident_counts(probe), 1)
    if config.loss not in LOSSES:
        raise DeepPhaseError(f"loss: expected one of {', '.join(LOSSES)}, got {config.loss!r}")
    offset_free = config.loss == "offset-free"
    if config.sigma_head and not config.sigma_weight > 0:
        raise DeepPhaseError(f"sigma-weight: expected a positive weight for the σ head's likelihood, got {config.sigma_weight}")
    if config.batch_size < 2:
        raise DeepPhaseError(f"batch-size: expected at least 2 (batch normalisation), got {config.batch_size}")
    if world == 1:
        with folder_lock(out_dir):  # (two trainings into one folder would take turns writing one checkpoint)
            check_out_dir(out_dir, resume, overwrite)  # (again: a run that held the lock may have written a model)
            return _train(probe, out_dir, config, geometry, resume, probe_info, command, progress, log, device,
                          settings, dose, offset_free)
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    held = contextlib.ExitStack()
    try:
        # Rank 0 alone checks the folder and reads the checkpoint, and sends the verdict and the bytes to
        # the others: every rank stops with the same error (none waits for a partner that quit), and
        # the other nodes of a multi-node run need not see rank 0's disk.
        message = [None]
        if rank == 0:
            try:
                check_out_dir(out_dir, resume, overwrite)  # (first: the lock makes the folder)
                try:
                    held.enter_context(folder_lock(out_dir))  # rank 0 alone writes into the folder
                except OSError as exc:  # (said to every rank, like the refusals: none waits for rank 0)
                    raise DeepPhaseError(f"out: cannot write into {str(out_dir)!r} ({exc.strerror or exc})") from exc
                check_out_dir(out_dir, resume, overwrite)  # (again: a run that held the lock may have written a model)
                blob = checkpoint_path.read_bytes() if resume else None
                if blob is not None:
                    saved = _checkpoint_from_bytes(blob, checkpoint_path)
                    _check_resume_config(saved[2], config)
                    _check_resume_probe(out_dir, probe, saved[5])
                message = [("ok", blob)]
            except DeepPhaseError as exc:
                message = [("error", exc)]
        dist.broadcast_object_list(message, src=0)
        status, payload = message[0]
        if status == "error":
            if rank != 0:
                payload.reported_by_rank0 = True  # deepphase.train prints it once
            raise payload
        return _train(probe, out_dir, config, geometry, resume, probe_info, command, progress, log, device,
                      settings, dose, offset_free, world=world, rank=rank, rank_data=rank_data, checkpoint=payload)
    finally:
        held.close()
        if own_group:
            dist.destroy_process_group()


def _train(probe, out_dir, config, geometry, resume, probe_info, command, progress, log, device, settings, dose,
           offset_free, world=1, rank=0, rank_data="shared", checkpoint=None):
    """The loop itself; with ``world > 1`` the process group is up and ``checkpoint`` holds the bytes to resume."""
    checkpoint_path = out_dir / CHECKPOINT

    mask = torch.as_tensor(output_mask(probe, geometry), device=device)
    stream = TrainingStream(probe, geometry, config.corpus, dose, device, neighbourhood=config.neighbourhood,
                            step_px=config.neighbourhood_step_px, defocus_spread=config.defocus_spread,
                            aberration_range=config.aberration_range, source_size_px=config.source_size_px,
                            focal_spread_rad=config.focal_spread_rad)
    arch_config = config.arch_config(geometry)
    if config.dose is None and rank == 0 and not resume and not np.isclose(incident_counts(probe), REFERENCE_DOSE, rtol=1e-3):
        log(f"no dose given: training at the probe's own scale, n²·Σ|P|² = {incident_counts(probe):,.0f} electrons per "
            f"pattern (an optics probe is normalised; the reference experiment's: {REFERENCE_DOSE:,.0f}); give a dose, or a range "
            "(--dose LO HI), for your data's")
    torch.manual_seed(config.seed)  # the initial weights are part of what the seed fixes
    network = create_model(config.arch, **arch_config).to(device)
    if config.init_from is not None and not resume:
        _initialise_from(network, config, arch_config, log)
    optimizer = _make_optimizer(network.parameters(), settings)
    validation = stream.fixed_set(config.seed, config.val_size)
    flat_loss = flat_phase_loss(validation, mask)  # what a network that learned nothing scores
    history: list[dict] = []
    start_epoch, new_probe, earlier_commands = 0, None, []
    if rank == 0:
        remove_leftover_temporaries(out_dir, (*MODEL_FILES, CHECKPOINT, "model.onnx"), locked=True)
    if resume:
        epoch_done, history, saved_config, model_state, opt_state, saved_probe = (
            _read_checkpoint(checkpoint_path) if checkpoint is None else _checkpoint_from_bytes(checkpoint))
        _check_resume_config(saved_config, config)
        # The weights come from the checkpoint; the record keeps the model the training started from.
        config = dataclasses.replace(config, init_from=saved_config.get("init_from"))
        earlier_commands = _commands_so_far(out_dir)
        if world == 1:
            _check_resume_probe(out_dir, probe, saved_probe)
        for part, what in (("linear_path", "linear path"), ("linear_gate", "linear path's gate")):
            if getattr(network, part, None) is not None and f"{part}.weight" not in model_state:
                raise DeepPhaseError(f"{checkpoint_path}: this checkpoint was written before the compact network had "
                                     f"its {what} (an earlier deepphase 0.1.0); finish it with the version that "
                                     "started it, or train anew")
        network.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        start_epoch = epoch_done + 1
        if start_epoch >= config.epochs:
            raise DeepPhaseError(f"resume: {str(out_dir)!r} has trained {start_epoch} epochs already; give --epochs more "
                                 "than that to train on")
        log(f"resuming {out_dir} after epoch {epoch_done + 1} of {config.epochs}")
        if saved_config.get("epochs") not in (None, config.epochs) and settings["schedule"] != "constant":
            log(f"epochs: {saved_config['epochs']} in the run that saved the checkpoint, {config.epochs} now: the "
                "learning rate's schedule "
                f"is stretched over {config.epochs} epochs from here (its rate jumps), so the result is not what "
                f"{config.epochs} epochs from the start would give")
    elif rank == 0:
        # A new training: an earlier model in the folder (--overwrite) stops being one now, not at the first
        # epoch's end, and the probe is saved before any checkpoint, so that a resume is always checked against it.
        out_dir.mkdir(parents=True, exist_ok=True)
        unmake_model(out_dir)
        # The earlier training's checkpoint too: interrupted in its first epoch, --resume (which the interrupt
        # suggests) would otherwise continue the training this one replaces (the failure audit, s36).
        (out_dir / CHECKPOINT).unlink(missing_ok=True)
        new_probe = out_dir / "probe.npy"
        save_npy(new_probe, np.asarray(probe, dtype=np.complex128))
    total_steps = config.epochs * config.steps_per_epoch
    this_command = command or " ".join(shlex.quote(a) for a in sys.argv)
    model = PhaseModel(network, config.arch, arch_config, probe, geometry)
    step_network, sync_bn = network, False
    if world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        # Batch normalisation: on GPUs the layers become SyncBatchNorm, whose statistics are those of
        # the global batch. A process's share (batch_size / N, often 2-8 patterns) is too small for
        # good statistics, and with them the model is the same whatever the number of GPUs (the "shared"
        # data make a step the single-process step). On CPUs (gloo) SyncBatchNorm is not available, so
        # BN keeps per-process statistics (as DDP does by default); the running statistics are rank
        # 0's, broadcast to the others at every step.
        sync_bn = device.type == "cuda"
        if sync_bn:
            network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)  # same parameters, in place
        ddp_options = {}
        if sync_bn:  # the running statistics are already the same everywhere: no buffer sync per step
            newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            ddp_options = {"forward_sync_buffers" if newer else "broadcast_buffers": False}
        step_network = DistributedDataParallel(network, device_ids=[device.index] if sync_bn else None,
                                               **ddp_options)
    with _probe_kept_by_first_checkpoint(new_probe, checkpoint_path):
        for epoch in range(start_epoch, config.epochs):
            # Dropout differs between processes (rank 0 keeps the single-process seed).
            torch.manual_seed(config.seed * 7919 + epoch + 1_000_003 * rank)
            network.train()
            t0 = time.perf_counter()
            losses, nlls = [], []
            if world == 1:
                batches = stream.epoch(config.seed, epoch, config.steps_per_epoch, config.batch_size)
            else:
                batches = _rank_batches(stream, config, epoch, rank, world, rank_data)
            bar = tqdm(batches, total=config.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=None if progress is None else not progress, leave=False)
            for i, batch in enumerate(bar):
                for group in optimizer.param_groups:
                    group["lr"] = _learning_rate(settings, epoch * config.steps_per_epoch + i, total_steps)
                output = predict_batch(step_network, batch)
                loss = masked_l1(output[:, :1], batch.target, mask, offset_free)
                if config.sigma_head:
                    # The phase learns from the L1 term alone (the NLL sees it detached), so it is trained as
                    # without the head; the head learns the error scale of the offset-free residual. The
                    # logged loss stays the L1, comparable with runs without the head.
                    nll = laplace_nll(output[:, :1], output[:, 1:2], batch.target, mask, detach_phase=True)
                    nll_value = nll if world == 1 else _mean_over_ranks(nll)
                    if not torch.isfinite(nll_value):
                        raise DeepPhaseError(f"training diverged: the σ head's likelihood became {nll_value.item()} at "
                                             f"epoch {epoch + 1}, step {i + 1}; lower --lr")
                    nlls.append(nll_value.item())
                # The logged loss is the mean over the processes, i.e. over the global batch; every rank
                # sees the same value, so all stop together if it is not finite.
                value = loss if world == 1 else _mean_over_ranks(loss)
                if not torch.isfinite(value):
                    raise DeepPhaseError(f"training diverged: the loss became {value.item()} at epoch {epoch + 1}, step {i + 1}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                (loss + config.sigma_weight * nll if config.sigma_head else loss).backward()  # DDP averages the gradients: the gradient of the global batch's mean loss
                optimizer.step()
                losses.append(value.item())
                # the epoch's mean so far: what the epoch's line reports (a smoothed value disagreed with it, 0.368
                # against 0.469: the figures audit, s41)
                bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
            bar.close()
            trained = time.perf_counter() - t0  # (the speed is the training steps': --val-size changed it 3×)
            if world > 1 and not sync_bn:
                # Per-process BN: each rank's last step moved its own running statistics; validate and save
                # rank 0's everywhere.
                for buffer in network.buffers():
                    dist.broadcast(buffer, src=0)
            val = evaluate_loss(network, validation, mask) if world == 1 else _evaluate_loss_ranks(
                network, validation, mask, rank, world)
            elapsed = time.perf_counter() - t0
            history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val,
                            **({"train_nll": float(np.mean(nlls))} if nlls else {}),
                            "seconds": round(elapsed, 2),
                            "samples_per_second": round(config.steps_per_epoch * config.batch_size / trained, 1),
                            # (per epoch: a run resumed with another number of processes keeps the earlier
                            # epochs' record, which the run-wide "distributed" entry below cannot)
                            "processes": world, **({"rank_data": rank_data} if world > 1 else {})})
            model.info = {
                **(probe_info or {}),
                "training": {**config.to_dict(), "dose": dose, "optimizer_settings": settings,
                             "epochs_done": epoch + 1, "steps": (epoch + 1) * config.steps_per_epoch,
                             "history": history, "command": this_command,
                             **({"commands": [*earlier_commands, this_command]} if earlier_commands else {}),
                             "versions": package_versions()},
                "validation_loss": val, "validation_loss_flat_phase": flat_loss,
                "dose": dose,
                "phase_range": list(config.corpus.phase_range),
            }
            if config.neighbourhood > 1:  # what reconstruction needs to gather the same neighbourhood from a scan
                model.info["neighbourhood"] = {"size": config.neighbourhood, "step_px": config.neighbourhood_step_px,
                                               "channels": "row-major (dr, dc) in steps, centre = channel "
                                                           f"{config.neighbourhood ** 2 // 2}",
                                               "edges": "replicate (nearest existing position)"}
            if world > 1:
                model.info["training"]["distributed"] = {
                    "processes": world, "batch_per_process": config.batch_size // world, "rank_data": rank_data,
                    "sync_batchnorm": sync_bn, "backend": dist.get_backend()}
            if rank == 0:  # the others wait at the barrier below
                save_checkpoint(checkpoint_path, network, optimizer, epoch, history, config, probe)
                # A training form (compact-rep) is stored as the plain network it equals; the checkpoint keeps it.
                plain, arch = deployed(network, config.arch)
                save_model(PhaseModel(plain, arch, arch_config, probe, geometry, model.info), out_dir, half=config.half)
            if world > 1:
                dist.barrier()
            log(f"epoch {epoch + 1}/{config.epochs}: train loss {np.mean(losses):.4f} rad, validation loss {val:.4f} rad "
                f"(a flat phase: {flat_loss:.4f}), {history[-1]['samples_per_second']:.0f} samples/s; saved {out_dir}")
    if history and not history[-1]["val_loss"] < flat_loss:  # (said of nothing: reconstruct then gave −0.02, the
        log(f"note: the validation loss, {history[-1]['val_loss']:.4f} rad, is no better than a flat phase's "  # figures
            f"({flat_loss:.4f}): the network has not learnt to see the phase yet; train longer (--epochs, "  # audit)
            "--steps-per-epoch; --resume continues this training) before reconstructing with it")
    if sync_bn:  # hand back plain BatchNorm layers (same state) for use outside the process group
        plain = create_model(config.arch, **arch_config).to(device)
        plain.load_state_dict(network.state_dict())
        model.network = network = plain
    network.eval()
    deployed_network, arch = deployed(network, config.arch)
    if deployed_network is not network:  # hand back what the model folder holds
        model = PhaseModel(deployed_network.eval(), arch, arch_config, probe, geometry, model.info)
    return model, history


@contextlib.contextmanager
def _probe_kept_by_first_checkpoint(probe_file: Path | None, checkpoint_path: Path):
    """A new training's probe.npy goes again if the training stops (an error, Ctrl-C) before its first checkpoint:
    with nothing to resume, the folder is left as it was found and the same command runs again without
    --overwrite."""
    try:
        yield
    except BaseException:
        if probe_file is not None and not checkpoint_path.exists():
            probe_file.unlink(missing_ok=True)
        raise


def distributed_context() -> tuple[int, int, int]:
    """(world size, rank, local rank): of the process group if one is up, else from torchrun's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise DeepPhaseError(f"WORLD_SIZE/RANK/LOCAL_RANK: expected integers in the environment ({exc})") from exc


# Layers a warm start may add to the model it starts from (arch_config key → their weights' names): each starts
# at zero, so the network starts as that model (models.compact) — a probe-aware one from a plain one, or the
# gated linear path from a model made before the gate (the packaged neighbourhood model).
_ZERO_START_LAYERS = {"aberration_input": ("film.", "linear_aberration.", "aberration"),
                      "linear_gate": ("linear_gate.",)}


def _initialise_from(network: torch.nn.Module, config: TrainConfig, arch_config: dict, log) -> None:
    """Start from another model's weights (a warm start: fine-tuning a model for another probe); its
    architecture must be this one's, or this one's without some of ``_ZERO_START_LAYERS``, which then start at
    zero."""
    from ..models.modelfile import load_model

    try:
        source = load_model(config.init_from)
    except DeepPhaseError as exc:  # (its message speaks of a --model)
        said = str(exc)
        raise type(exc)(f"init-from: {said.removeprefix('model: ')}") from exc
    added = [k for k in _ZERO_START_LAYERS if arch_config.get(k) and not source.arch_config.get(k)]
    same_options = source.arch_config == {k: v for k, v in arch_config.items() if k not in added}
    if same_options and getattr(network, "deploy_arch", config.arch) == source.arch != config.arch:  # (compact-rep)
        raise DeepPhaseError(
            f"init-from: {config.init_from!r} holds the plain {source.arch} network a {config.arch} training is "
            f"stored as (its branches fused), whose weights a {config.arch} network cannot start from; train with "
            f"--arch {source.arch} to fine-tune it")
    if source.arch != config.arch or not same_options:
        raise DeepPhaseError(
            f"init-from: {config.init_from!r} is a {source.arch} network with {source.arch_config}; this training "
            f"builds a {config.arch} network with {arch_config} (train with the same --arch and options: "
            f"`deepphase train --like {shlex.quote(str(config.init_from))}` takes them)")
    missing, unexpected = network.load_state_dict(source.network.state_dict(), strict=False)
    new = tuple(prefix for k in added for prefix in _ZERO_START_LAYERS[k])
    if unexpected or any(not k.startswith(new) for k in missing):
        raise DeepPhaseError(f"init-from: the weights of {config.init_from!r} do not fit ({missing or unexpected})")
    log(f"starting from the weights of {config.init_from}"
        + (f" ({', '.join(added)}: new layers from zero)" if added else ""))


def _as_given(value) -> str:
    return "not given" if value is None else repr(value)


def _check_resume_config(saved_config: dict, config: TrainConfig) -> None:
    # A key to_dict leaves out holds its default; comparing with the defaults filled in keeps a setting that
    # follows another (the σ head's weight) from showing up as changed when only that other one was.
    defaults = TrainConfig().to_dict() | asdict(TrainConfig()) | {"corpus": CorpusConfig().to_dict()}
    then, now = defaults | saved_config, defaults | config.to_dict()
    then["corpus"], now["corpus"] = (defaults["corpus"] | saved_config.get("corpus", {}),
                                     defaults["corpus"] | now["corpus"])
    if now.get("init_from") is not None and now["init_from"] != then.get("init_from"):  # (taken, and dropped)
        raise DeepPhaseError(f"init-from: a resumed training continues from its checkpoint's weights, not from "
                             f"{now['init_from']!r}; drop --init-from (or train anew with --overwrite)")
    said = []
    for k in sorted(set(then) | set(now)):
        if k in ("epochs", "device", "init_from", "half") or then.get(k) == now.get(k):  # (half: the file's only)
            continue
        if k == "corpus":
            said += [f"--{OPTION_OF_CORPUS_FIELD.get(f, f)}: {_as_given(then[k].get(f))} then, "
                     f"{_as_given(now[k].get(f))} now" for f in sorted(set(then[k]) | set(now[k]))
                     if then[k].get(f) != now[k].get(f)]
        elif k == "sigma_head":  # (a switch, named in words: its option would read as a keyword=value in Python)
            said.append(f"the σ head: {then.get(k) or 'none'} then, {now.get(k) or 'none'} now")
        else:
            said.append(f"{'--' + OPTION_OF_FIELD[k] if k in OPTION_OF_FIELD else k}: {_as_given(then.get(k))} then, "
                        f"{_as_given(now.get(k))} now")
    if said:
        said = "; ".join(said)
        raise DeepPhaseError(f"resume: the checkpoint was made with another configuration ({said}); resume with the "
                             "same arguments (only --epochs, --device and --half may change)")


def _check_resume_probe(out_dir: Path, probe: np.ndarray, digest: str | None = None) -> None:
    """A training resumes for the probe it was started with: its probe.npy (written before the first epoch), or
    where that is gone the checkpoint's :func:`probe_digest` (a resumption took any probe then, and a probe of
    another grid gave a traceback: the training audit, s40)."""
    saved = out_dir / "probe.npy"
    if saved.exists():
        first = np.load(saved, allow_pickle=False)
        same = first.shape == probe.shape and np.allclose(first, probe, rtol=1e-6, atol=1e-9)
        whose = f"its probe.npy, {first.shape[0]}×{first.shape[1]}" if first.ndim == 2 else "its probe.npy"
    elif digest is not None:
        same, whose = probe_digest(probe) == digest, "as its checkpoint records it"
    else:
        return  # (a checkpoint from before the digest, its probe.npy removed: nothing to compare)
    if not same:
        raise DeepPhaseError(f"resume: the training in {str(out_dir)!r} was started for another probe ({whose}; "
                             f"this one is {probe.shape[0]}×{probe.shape[1]}); resume with the same --probe or optics, "
                             "or train anew with --overwrite")


def check_batch_split(batch_size: int, world: int) -> None:
    """The global batch must split evenly between the processes."""
    if world > 1 and batch_size % world:
        raise DeepPhaseError(
            f"batch-size: the global batch of {batch_size} does not split evenly between {world} processes; "
            f"use a multiple of {world} (each process trains on an equal share of it)"
        )


def check_out_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to resume without a checkpoint, or to replace a model unasked."""
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"out: {str(out_dir)!r} is a file; expected a folder for the model")
    if resume and overwrite:
        raise DeepPhaseError(f"resume: --resume continues the training in {str(out_dir)!r} and --overwrite replaces it "
                             "with a new one; give one of them")
    if resume and not checkpoint_path.exists():
        raise InputFileError(f"resume: no checkpoint at {str(checkpoint_path)!r} to resume from")
    if not resume and not overwrite and ((out_dir / "model.json").exists() or checkpoint_path.exists()):
        raise OutputExistsError(
            f"out: {str(out_dir)!r} already holds a model; pass --resume to continue it or --overwrite to replace it"
        )
    theirs = [name for name in MODEL_FILES if (out_dir / name).exists()]
    if not resume and not overwrite and theirs:  # not a model of ours, but files a model would replace
        raise OutputExistsError(f"out: {str(out_dir)!r} holds {', '.join(theirs)}, which a model folder's files would "
                                "replace; choose another folder or pass --overwrite")


def _rank_batches(stream: TrainingStream, config: TrainConfig, epoch: int, rank: int, world: int, rank_data: str):
    """This process's part of every global batch of ``epoch``.

    ``"shared"`` (default): every process simulates the whole global batch from the (seed, epoch)
    generator of a single-process run and keeps its slice ``[rank·B/N, (rank+1)·B/N)``, so a step sees
    exactly the samples of the single-process step, whatever N (and a resumed run with another N
    continues the same sequence); the price is simulating N times as much (cheap on a GPU; on one CPU
    core 13-40 % of a unet-small step of 16 patterns, by corpus). ``"per-rank"``: each process
    simulates only its B/N samples from a generator seeded with (seed, epoch, rank): no repeated work,
    statistically the same data, but not the same samples as a run with another number of processes.
    """
    per_rank = config.batch_size // world
    if rank_data == "per-rank":
        entropy = np.random.SeedSequence([int(config.seed), int(epoch), int(rank)]).generate_state(2, np.uint32)
        gen = torch.Generator(device=stream.device).manual_seed(int(entropy[0]) << 31 ^ int(entropy[1]))
        for _ in range(config.steps_per_epoch):
            yield stream.batch(per_rank, gen)
        return
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    for batch in stream.epoch(config.seed, epoch, config.steps_per_epoch, config.batch_size):
        yield batch.rows(lo, hi)


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


@torch.no_grad()
def _evaluate_loss_ranks(network, batches, mask, rank: int, world: int) -> float:
    """:func:`evaluate_loss` shared out: each process takes its share of every batch, the sums are all-reduced.

    In eval mode every sample's loss is independent of the others, so this is the single-process value
    on the same fixed set (up to the order of the sums).
    """
    import torch.distributed as dist

    was_training = network.training
    network.eval()
    total, count = 0.0, 0
    for b in batches:
        bounds = np.linspace(0, len(b.amplitude), world + 1).round().astype(int)
        lo, hi = bounds[rank], bounds[rank + 1]
        if hi > lo:
            part = b.rows(lo, hi)
            total += masked_l1(predict_batch(network, part)[:, :1], part.target, mask).item() * (hi - lo)
            count += hi - lo
    network.train(was_training)
    sums = torch.tensor([total, count], dtype=torch.float64, device=mask.device)
    dist.all_reduce(sums)
    return float(sums[0] / sums[1])


def predict_batch(network, batch: Batch) -> torch.Tensor:
    """The network's output for a batch; a probe-aware network is told each pattern's aberration."""
    return network(batch.amplitude) if batch.aberration is None else network(batch.amplitude, batch.aberration)


@torch.no_grad()
def flat_phase_loss(batches, mask) -> float:
    """The validation loss (rad) of a network that outputs a flat phase: the spread of the targets themselves, the
    figure a validation loss is read against."""
    total = sum(masked_l1(torch.zeros_like(b.target), b.target, mask).item() * len(b.amplitude) for b in batches)
    return total / sum(len(b.amplitude) for b in batches)


def _commands_so_far(out_dir: Path) -> list[str]:
    """The commands that started and resumed the training in ``out_dir``, as its model.json records them (none if
    it records none: a checkpoint without a model, or a model from before the record)."""
    try:
        record = json.loads((out_dir / "model.json").read_text())["training"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    commands = record.get("commands") or [record.get("command")]
    return [c for c in commands if isinstance(c, str)]


def evaluate_loss(network, batches, mask) -> float:
    """Mean masked L1 (rad) of ``network``'s phase (channel 0) over a fixed list of batches, in eval mode."""
    was_training = network.training
    network.eval()
    total, count = 0.0, 0
    for b in batches:
        total += masked_l1(predict_batch(network, b)[:, :1], b.target, mask).item() * len(b.amplitude)
        count += len(b.amplitude)
    network.train(was_training)
    return total / count
