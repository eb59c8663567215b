"""Inference engines: the same network run eagerly, in channels_last, compiled, or by ONNX Runtime.

:func:`prepare_network` turns a network (or a :class:`~deepphase.models.modelfile.PhaseModel`) into a
callable ``(B, 1, n, n) float32 tensor -> (B, 1, out, out) tensor`` on the requested device, to be used
wherever ``network(x)`` was called. Every engine computes the same float32 function; on the packaged
models the outputs agree with eager to ~1e-6 rad (benchmarks/bench_engines.py measures speed and
difference). Which one is fastest depends on the machine: see benchmarks/RESULTS.md, sections 12 (CPU) and 18 (the prepared GPU session).

* ``"eager"`` (default): the network itself, unchanged.
* ``"channels-last"``: a copy of the network with weights, and every input, in ``torch.channels_last``.
* ``"compile"``: ``torch.compile`` of a copy (inductor; needs a C++ compiler on the CPU). The first call
  compiles, which takes tens of seconds; smaller batches (a scan's last one) are padded to the largest
  batch seen so far, so that they do not compile again.
* ``"cuda-graphs"``: a copy of the network whose forward pass is captured once per batch size in a CUDA
  graph (``torch.cuda.CUDAGraph``, static input and output buffers) and replayed: one launch per batch
  instead of one per kernel. CUDA only. A smaller batch (a scan's last one) is copied into the buffer of
  the smallest captured batch that holds it; the autocast setting of the call is part of what is
  captured (another setting captures another graph).
* ``"onnx"``: the network exported with ``torch.onnx.export`` (batch axis dynamic) at the first call
  and run by ONNX Runtime's CPU execution provider on as many cores as PyTorch uses: each batch is cut
  into that many slices, run at once by one single-threaded session from as many Python threads (the
  session releases the GIL). On two cores that is 1.05-1.29x faster end to end than one session with
  two intra-op threads, and the same numbers (benchmarks/RESULTS.md, section 34). CPU only; needs
  ``pip install -e ".[onnx]"``. An export takes ~1 s (5-7 s where only the torch.export-based exporter
  works), so it is kept in the cache folder
  (:func:`deepphase.runtime.cache_dir`) under a digest of the network's weights, its code and the torch
  version, and the next run on the same network starts in a fraction of a second. A model folder's own
  ``model.onnx`` (:func:`export_onnx` writes it) is tried first. Whether from the folder, the cache or
  fresh, an export is checked against the network on a few fixed patterns before it is used.

Only ``"eager"`` and ``"channels-last"`` keep dropout layers that are in training mode (Monte Carlo
dropout); ``"compile"``, ``"cuda-graphs"`` and ``"onnx"`` refuse such a network.

Every engine but ``"eager"`` first folds each batch normalisation that directly follows a convolution
into that convolution's weights and bias (:func:`fold_batch_norm`, PyTorch's ``fuse_conv_bn_eval``): one
pass over the activations fewer per folded layer, the same function to float32 rounding. All 11 of the
compact network's batch norms fold; 7 of the seed U-Net's 15 (the others come before a ReLU and a
convolution, where they cannot).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import io
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DeepPhaseError, OutputExistsError
from ..io_utils import atomic_path
from ..runtime import cache_dir

log = logging.getLogger(__name__)

ENGINES = ("eager", "channels-last", "compile", "cuda-graphs", "onnx")
# A fresh export costs ~1.3 s of a run (the TorchScript exporter with its imports, a session, the check);
# ONNX Runtime, run on one slice of each batch per core, then predicts ~1.5× faster than channels-last.
# End to end from a file (2 cores, benchmarks/bench_auto_engine.py, RESULTS §34) it lost at 4,096
# patterns (0.81-0.85×), was level at 16,384 (1.00-1.07×) and ahead from 32,768 (1.09-1.32×). Auto
# exports from 16,384 (where the run loses nothing and the next gets the kept export, 1.09-1.19×), and at
# any size when an export is kept (0.98-1.09× at 4,096).
ONNX_AUTO_MIN_PATTERNS = 16_384


def resolve_engine(engine: str, device, n_patterns: int, precision: str = "auto", network=None,
                   pattern_shape: tuple | None = None) -> str:
    """The engine ``"auto"`` stands for.

    On a CPU, with ONNX Runtime installed and float32 arithmetic: ``"onnx"`` when ``network`` (a
    PhaseModel or a module) has an export for ``pattern_shape`` (C, n, n), in its folder or in the cache,
    or the scan has ≥ 16,384 patterns; else ``"channels-last"``. On a GPU, ``"eager"`` (the others are
    unmeasured there). Any other name is returned as it is.
    """
    if engine != "auto":
        return engine
    if torch.device(device).type != "cpu":
        return "eager"
    import importlib.util

    if precision not in ("auto", "float32") or importlib.util.find_spec("onnxruntime") is None:
        return "channels-last"
    if n_patterns >= ONNX_AUTO_MIN_PATTERNS:
        return "onnx"
    if network is not None and (_folder_exports(network) or (
            pattern_shape is not None and cached_onnx_export(network, pattern_shape) is not None)):
        return "onnx"
    return "channels-last"

Network = Callable[[torch.Tensor], torch.Tensor]


def _engine_failure(what: str, exc: Exception) -> DeepPhaseError:
    """A one-line user error for an engine that failed inside PyTorch: what failed, the cause's first line."""
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return DeepPhaseError(f"engine: {what} ({type(exc).__name__}: {line[:300]}); use the 'eager' engine")


def fold_batch_norm(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` with every ``Conv2d`` → ``BatchNorm2d`` pair of an ``nn.Sequential`` folded.

    Only batch norms in eval mode fold (they then are a fixed affine map per channel); the folded
    convolution takes the pair's place and an ``nn.Identity`` the batch norm's, so indices and the
    module tree stay as they were. The caller's network is not changed.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(network)
    for block in [m for m in folded.modules() if isinstance(m, torch.nn.Sequential)]:
        for i in range(len(block) - 1):
            conv, norm = block[i], block[i + 1]
            if (type(conv) is torch.nn.Conv2d and type(norm) is torch.nn.BatchNorm2d and not norm.training
                    and not conv.training and norm.track_running_stats):
                block[i], block[i + 1] = fuse_conv_bn_eval(conv, norm), torch.nn.Identity()
    return folded


def _active_dropout(network: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training for m in network.modules())


def _channels_last(network: torch.nn.Module) -> Network:
    net = copy.deepcopy(network).to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        return net(x.contiguous(memory_format=torch.channels_last))

    return run


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with its last pattern repeated up to ``size`` patterns (patterns are independent in eval mode)."""
    return torch.cat([x, x[-1:].expand(size - len(x), *x.shape[1:])])


def _compiled(network: torch.nn.Module) -> Network:
    compiled = torch.compile(copy.deepcopy(network))
    largest = 0

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        count = len(x)
        first = largest == 0
        if count < largest:
            x = _pad_to(x, largest)
        largest = max(largest, count)
        try:
            y = compiled(x)
        except Exception as exc:
            if not first:
                raise
            raise _engine_failure("'compile' failed on this machine", exc) from exc
        return y[:count]

    return run

# CUDA graphs. Why a hand-made torch.cuda.CUDAGraph rather than torch.compile(mode="reduce-overhead"):
# the network's kernels stay eager PyTorch's (cuDNN convolutions, autocast), so the graph computes
# exactly what "eager" computes; capturing costs a few warm-up passes (well under a second), not the
# tens of seconds per batch shape that inductor takes; and nothing beyond CUDA is needed (no Triton,
# no C++ compiler). The launch overhead it removes is what limits a small network at small batches;
# whether it pays at the batches a scan uses is for benchmarks/gpu_session.py to measure.
def _autocast_key(device_type: str) -> tuple:
    """The autocast state of the current call, for ``device_type`` (part of what a graph captures)."""
    if not torch.is_autocast_enabled(device_type):
        return (False, None)
    return (True, torch.get_autocast_dtype(device_type))


def _capture_cuda_graph(network: torch.nn.Module, example: torch.Tensor) -> tuple:
    """(static input, static output, replay) of ``network`` captured on ``example``'s shape.

    Run under the autocast setting of the caller, with the autocast weight cache off (a cached cast
    would be freed when the caller's autocast region ends while the graph still reads it).
    """
    static_in = example.clone()
    stream = torch.cuda.Stream(device=example.device)
    stream.wait_stream(torch.cuda.current_stream(example.device))
    with torch.cuda.stream(stream):  # warm-up outside the graph: cuDNN picks its algorithms here
        for _ in range(2):
            network(static_in)
    torch.cuda.current_stream(example.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a memory pool of its own: graphs may be replayed in any order
        static_out = network(static_in)
    return static_in, static_out, graph.replay


class _GraphRunner:
    """Replays a captured forward pass per (batch size, autocast setting); pads smaller batches.

    ``capture(network, example) -> (static_in, static_out, replay)`` is the CUDA capture above;
    the tests give a CPU stand-in to check the buffer logic without a GPU.
    """

    def __init__(self, network: torch.nn.Module, device: torch.device, channels_last: bool = False,
                 capture=_capture_cuda_graph):
        net = copy.deepcopy(network).eval()
        for p in net.parameters():
            p.requires_grad_(False)  # nothing to differentiate, and no autocast weight cache
        self.channels_last = channels_last
        self.network = net.to(memory_format=torch.channels_last) if channels_last else net
        self.device = device
        self.capture = capture
        self.graphs: dict = {}  # (batch, autocast key) -> (static_in, static_out, replay)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        autocast = _autocast_key(self.device.type)
        count = len(x)
        sizes = [size for size, key in self.graphs if key == autocast and size >= count]
        # The caller's autocast again, with its weight cache off; none if the caller has none.
        cast = (torch.autocast(self.device.type, dtype=autocast[1], cache_enabled=False) if autocast[0]
                else contextlib.nullcontext())
        with torch.inference_mode(), cast:
            if sizes:
                static_in, static_out, replay = self.graphs[(min(sizes), autocast)]
                static_in[:count].copy_(x)  # rows beyond count keep earlier (finite) patterns: independent
            else:
                example = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
                try:
                    static_in, static_out, replay = self.capture(self.network, example)
                except Exception as exc:
                    if isinstance(exc, DeepPhaseError):
                        raise
                    raise _engine_failure("capturing a CUDA graph failed", exc) from exc
                self.graphs[(count, autocast)] = (static_in, static_out, replay)
            replay()
            return static_out[:count].clone()  # the buffer is overwritten by the next replay


def _cuda_graphs(network: torch.nn.Module, device: torch.device, channels_last: bool = False) -> Network:
    if device.type != "cuda":
        raise DeepPhaseError(
            f"engine: 'cuda-graphs' needs a CUDA device (it captures CUDA graphs), but the network runs on "
            f"{str(device)!r} here; use 'eager', 'channels-last' or 'compile' there"
        )
    return _GraphRunner(network, device, channels_last)


# The TorchScript-based exporter makes the export in ~1.1 s in a fresh process (0.9 s of it importing onnx)
# and 0.1-0.2 s after that; the torch.export-based one (PyTorch's default since 2.9) takes 5-7 s for a graph
# that runs at the same speed (RESULTS §31). The first is deprecated, so it is tried first while it works,
# the second when it fails, is gone from torch, or its export disagrees with the network.
EXPORTERS = ("torchscript", "torch.export")


def _export_onnx(network: torch.nn.Module, example: torch.Tensor, exporter: str = "torchscript") -> bytes:
    """The network as a serialised ONNX model with a dynamic batch axis, by one of :data:`EXPORTERS`."""
    example = example[:1].expand(2, *example.shape[1:]).contiguous()  # a batch of 1 would be specialised
    logger = logging.getLogger("torch.onnx")  # the exporter logs a warning per optional op it cannot register
    level = logger.level
    with warnings.catch_warnings(), contextlib.ExitStack() as restore:
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer warnings
        logger.setLevel(logging.ERROR)
        restore.callback(logger.setLevel, level)
        if exporter == "torch.export":
            program = torch.onnx.export(network, (example,), dynamo=True, input_names=["x"], output_names=["y"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            return program.model_proto.SerializeToString()
        legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        buffer = io.BytesIO()
        torch.onnx.export(network, (example,), buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, **legacy)
        return buffer.getvalue()


def _fresh_export(net: torch.nn.Module, pattern_shape: tuple, session_for, who: str, consequence: str):
    """``(bytes, session)`` of the first of :data:`EXPORTERS` whose export computes ``net``'s function;
    ``session_for(bytes)`` makes a session (None: the export cannot be checked, so the first export is it)."""
    example = _fixed_patterns(pattern_shape, 1)
    failures = []
    for exporter in EXPORTERS:
        try:
            model_bytes = _export_onnx(net, example, exporter=exporter)
            session = None if session_for is None else session_for(model_bytes)
        except Exception as exc:  # noqa: BLE001 — gone from this torch, or cannot trace this network: the next
            failures.append(exc)
            log.info("ONNX exporter %s failed (%s: %s)", exporter, type(exc).__name__, exc)
            continue
        if session is None:
            return model_bytes, None
        difference = _agreement(session, net, pattern_shape)
        if difference <= ONNX_TOLERANCE:
            return model_bytes, session
        failures.append(DeepPhaseError(f"{who}: the ONNX export differs from the network by {difference:.3g} rad "
                                       f"(at most {ONNX_TOLERANCE:g} expected); {consequence}"))
        log.info("ONNX exporter %s: %s", exporter, failures[-1])
    disagreements = [f for f in failures if isinstance(f, DeepPhaseError)]
    if disagreements:  # an export that ran but computes something else says more than one that failed
        raise disagreements[0]
    raise _engine_failure("exporting the network to ONNX failed", failures[-1]) from failures[-1]


def _export_key(network: torch.nn.Module, pattern_shape: tuple) -> str:
    """A digest of everything an export of ``network`` for (C, n, n) patterns depends on.

    The weights and buffers, the module tree, the source of the classes it is made of (and of the
    package's network code, which their forward passes call), the pattern shape and the torch version.
    """
    import deepphase

    digest = hashlib.sha256(repr((torch.__version__, deepphase.__version__, tuple(int(k) for k in pattern_shape),
                                  repr(network))).encode())
    sources = set(Path(deepphase.__file__).parent.joinpath("models").glob("*.py"))
    classes = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in map(type, network.modules())
               if cls.__module__.split(".")[0] != "torch"}
    for name in sorted(classes):  # sorted: a set's order changes from one process to the next
        with contextlib.suppress(TypeError, OSError):
            sources.add(Path(inspect.getsourcefile(classes[name])))
        digest.update(name.encode())
    for source in sorted(sources):
        with contextlib.suppress(OSError):
            digest.update(source.read_bytes())
    for name, tensor in network.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _export_path(network: torch.nn.Module, pattern_shape: tuple) -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / "onnx" / f"{_export_key(network, pattern_shape)}.onnx"


def cached_onnx_export(network: torch.nn.Module, pattern_shape: tuple, fold: bool = True) -> Path | None:
    """The cached ONNX export of ``network`` (batch norms folded, as :func:`prepare_network` does unless
    ``fold=False``) for (C, n, n) patterns, or None when there is none (or no cache)."""
    network = getattr(network, "network", network)
    network = fold_batch_norm(network) if fold else copy.deepcopy(network)
    path = _export_path(network.cpu().eval(), pattern_shape)
    return path if path is not None and path.is_file() else None


def _folder_exports(model) -> list[Path]:
    """The ``model.onnx`` of a PhaseModel's folder, if it has one."""
    folder = getattr(model, "folder", None)
    return [Path(folder) / "model.onnx"] if folder is not None and (Path(folder) / "model.onnx").is_file() else []


def _fixed_patterns(pattern_shape: tuple, count: int = 4) -> torch.Tensor:
    """``count`` amplitudes of 20 expected counts per pixel, the same every time."""
    g = torch.Generator().manual_seed(0)
    return torch.poisson(torch.full((count, *pattern_shape), 20.0), generator=g).sqrt()


def _agreement(session, network: torch.nn.Module, pattern_shape: tuple) -> float:
    """Largest difference between the session's and the network's outputs on four fixed patterns."""
    x = _fixed_patterns(pattern_shape)
    with torch.inference_mode():
        expected = network(x)
    got = torch.from_numpy(session.run(["y"], {"x": x.numpy()})[0])
    if got.shape != expected.shape:
        return float("inf")
    return float((got - expected).abs().max())


# Export and network compute the same float32 function up to rounding (~1e-6 rad on the packaged models).
ONNX_TOLERANCE = 1e-3
# Exports the cache keeps, the most recently used (2 MB each for the compact network, 12 MB for the seed U-Net).
ONNX_CACHE_KEEP = 16


def _keep_recent_exports(folder: Path, keep: int = ONNX_CACHE_KEEP) -> None:
    """Delete all but the ``keep`` most recently used exports in ``folder`` (use refreshes a file's time)."""
    exports = sorted(folder.glob("*.onnx"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in exports[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()


def _onnx_session(ort, net: torch.nn.Module, pattern_shape: tuple, threads: int | None, folder_exports=()):
    """An ONNX Runtime session for ``net`` with ``threads`` intra-op threads: from the first of ``folder_exports``
    (files) and the cache that holds a matching export, else exported (and kept in the cache)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def session_for(model_bytes: bytes):
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    path = _export_path(net, pattern_shape)
    for candidate in [*folder_exports, path]:
        if candidate is None or not candidate.is_file():
            continue
        try:  # a damaged or stale file is passed over (and the cache's made again), never used
            session = session_for(candidate.read_bytes())
            if _agreement(session, net, pattern_shape) <= ONNX_TOLERANCE:
                if candidate == path:
                    with contextlib.suppress(OSError):
                        path.touch()  # recently used: the last the cache would let go
                return session
            log.info("ONNX export %s does not compute this network; passed over", candidate)
        except Exception as exc:  # noqa: BLE001 — any failure to load means "try the next, or export"
            log.info("ONNX export %s unusable (%s); passed over", candidate, exc)
    model_bytes, session = _fresh_export(net, pattern_shape, session_for, "engine", "use the 'eager' engine")
    if path is not None:
        try:
            with atomic_path(path, ".onnx") as tmp:
                tmp.write_bytes(model_bytes)
            _keep_recent_exports(path.parent)
        except OSError as exc:  # a read-only home still reconstructs, only more slowly next time
            log.warning("could not keep the ONNX export in %s (%s)", path.parent, exc)
    return session


def export_onnx(model, path, pattern_shape: tuple | None = None, overwrite: bool = False) -> Path:
    """Write ``model``'s network as an ONNX file (batch axis dynamic, batch norms folded), atomically.

    Parameters
    ----------
    model : PhaseModel or torch.nn.Module
        A PhaseModel gives its own pattern shape; a module needs ``pattern_shape``.
    path : str or Path
        The file; ``model.onnx`` in a model folder is what the ``onnx`` engine looks for there.
    pattern_shape : tuple, optional
        (C, n, n) of the network's input.
    overwrite : bool
        Replace an existing file (default: refuse).

    Returns
    -------
    Path
        ``path``. Input ``"x"``: (B, C, n, n) float32 diffraction amplitudes; output ``"y"``: (B, K, out, out)
        (K = 2 with a σ head: phase, then the log error scale), as ``model.network`` computes them.

    Raises
    ------
    OutputExistsError
        ``path`` exists and ``overwrite`` is False.
    DeepPhaseError
        No pattern shape for a bare network; with onnxruntime installed, an export that does not compute
        the network's function (checked before anything is written).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"export_onnx: {str(path)!r} exists; pass overwrite=True to replace it")
    network = getattr(model, "network", model)
    if pattern_shape is None:
        geometry = getattr(model, "geometry", None)
        if geometry is None:
            raise DeepPhaseError("export_onnx: a bare network needs pattern_shape=(C, n, n)")
        pattern_shape = (model.in_channels, geometry.n_px, geometry.n_px)
    pattern_shape = tuple(int(k) for k in pattern_shape)
    net = fold_batch_norm(copy.deepcopy(network).cpu().eval())
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    session_for = None if ort is None else (
        lambda model_bytes: ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]))
    model_bytes, _ = _fresh_export(net, pattern_shape, session_for, "export_onnx", "nothing written")
    with atomic_path(path, ".onnx") as tmp:
        tmp.write_bytes(model_bytes)
    return path


def _onnx(network: torch.nn.Module, threads: int | None, folder_exports=()) -> Network:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DeepPhaseError(
            "engine: 'onnx' needs onnxruntime, onnx and onnxscript (pip install -e '.[onnx]' in deepphase's source folder), "
            "which are not installed; use the 'eager' engine"
        ) from exc
    net = copy.deepcopy(network).cpu().eval()
    session = None
    # Slices of a batch at once, one single-threaded session call each, rather than one call whose
    # intra-op threads split every layer: no barrier between the threads at every operator (RESULTS §34).
    cores = int(threads or torch.get_num_threads())
    pool = _slice_pool(cores) if cores > 1 else None

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal session
        inputs = x.detach().to(dtype=torch.float32).contiguous().numpy()
        if session is None:  # made at the first call, for the patterns' own shape
            session = _onnx_session(ort, net, tuple(inputs.shape[1:]), cores if pool is None else 1, folder_exports)
        if pool is None or len(inputs) < 2:
            return torch.from_numpy(session.run(["y"], {"x": inputs})[0])
        slices = np.array_split(inputs, min(cores, len(inputs)))  # views: rows of a C-ordered array
        return torch.from_numpy(np.concatenate(list(pool.map(lambda part: session.run(["y"], {"x": part})[0], slices))))

    return run


_SLICE_POOLS: dict = {}


def _slice_pool(workers: int) -> ThreadPoolExecutor | None:
    """Threads that run ONNX Runtime on slices of a batch, shared by every ONNX network of the process (None:
    one call per batch with ``workers`` intra-op threads, what benchmarks/bench_onnx_slices.py compares)."""
    if workers not in _SLICE_POOLS:
        _SLICE_POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="deepphase-onnx")
    return _SLICE_POOLS[workers]


def exported_onnx(model, device, pattern_shape: tuple) -> Network | None:
    """``model``'s ``"onnx"`` runner with its export made (or loaded) now, on one zero pattern of ``pattern_shape``
    (C, n, n); None if it cannot be exported, where ``engine="auto"`` runs channels-last instead."""
    runner = prepare_network(model, "onnx", device)
    try:
        with torch.inference_mode():
            runner(torch.zeros((1, *pattern_shape), device=device))
    except Exception:  # noqa: BLE001 — any exporter failure means "use the next best engine"
        return None
    return runner


def prepare_network(model, engine: str = "eager", device: str | torch.device = "cpu",
                    threads: int | None = None, fold: bool = True) -> Network:
    """A callable that runs ``model``'s network with the chosen inference engine.

    Parameters
    ----------
    model : PhaseModel or torch.nn.Module
        The network (a PhaseModel's ``network`` is used). It is moved to ``device`` and, unless its
        dropout layers were deliberately put in training mode, should be in eval mode. ``"eager"``
        returns it as is; the other engines work on a copy, so the caller's network is not changed.
    engine : str
        One of :data:`ENGINES`: ``"eager"`` (default), ``"channels-last"``, ``"compile"``, ``"cuda-graphs"``,
        ``"onnx"``.
    device : str or torch.device
        Where the network runs. ``"onnx"`` runs on the CPU only, ``"cuda-graphs"`` on a CUDA device only.
    threads : int, optional
        Cores ONNX Runtime uses (default: ``torch.get_num_threads()``): each batch runs as that many slices
        at once, one thread each; ignored by the others.
    fold : bool
        Fold batch norms into the convolutions before them (:func:`fold_batch_norm`; default). Ignored by
        ``"eager"``, which runs the network as it is.

    Returns
    -------
    callable
        ``f(x)`` with ``x`` a float32 tensor (B, 1, n, n) on ``device``, returning (B, 1, out, out).
        Call it under ``torch.inference_mode()`` (or ``no_grad``), as the prediction loop does.

    Raises
    ------
    DeepPhaseError
        An unknown engine name; ``"onnx"`` without onnxruntime or on a GPU; ``"cuda-graphs"`` without a
        CUDA device; ``"compile"``, ``"cuda-graphs"`` or ``"onnx"`` with dropout active (Monte Carlo
        dropout needs ``"eager"`` or ``"channels-last"``).
    """
    if engine not in ENGINES:
        raise DeepPhaseError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    network = getattr(model, "network", model)
    if not isinstance(network, torch.nn.Module):
        raise DeepPhaseError(f"engine: expected a PhaseModel or a torch.nn.Module, got {type(model).__name__}")
    folder_exports = _folder_exports(model)
    device = torch.device(device)
    network = network.to(device)
    if engine == "cuda-graphs" and device.type != "cuda":
        return _cuda_graphs(network, device)  # raises: before the dropout check, whose advice does not apply
    if engine in ("compile", "cuda-graphs", "onnx") and _active_dropout(network):
        raise DeepPhaseError(
            f"engine: {engine!r} cannot sample Monte Carlo dropout (uncertainty); use 'eager' or 'channels-last'"
        )
    if engine == "eager":
        return network
    if fold:
        network = fold_batch_norm(network)
    if engine == "channels-last":
        return _channels_last(network)
    if engine == "compile":
        return _compiled(network)
    if engine == "cuda-graphs":
        return _cuda_graphs(network, device)
    if device.type != "cpu":
        raise DeepPhaseError(f"engine: 'onnx' runs on the CPU only, but device {str(device)!r} was asked for")
    return _onnx(network, threads, folder_exports)
