"""Inference engines compute what the eager network computes."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deepphase.errors import DeepPhaseError
from deepphase.models import create_model
from deepphase.reconstruction.engines import ENGINES, _GraphRunner, prepare_network

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    # The shipped compact network's parts (gated linear path, σ head) at 16 × 16.
    net = create_model("compact", n_px=16, out_px=16, sigma_head="detached", linear_path=True,
                       linear_gate=True).eval()
    # Non-trivial batch-norm statistics, so that folding them (compile, ONNX) is exercised, and the linear
    # parts away from their zero initialisation.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        for layer in (net.linear_path, net.linear_gate):
            layer.weight.normal_(0, 0.5)
    return net


def patterns(batch, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.full((batch, 1, n, n), 50.0), generator=g).sqrt()


@pytest.mark.parametrize("engine", [e for e in ENGINES if e not in ("compile", "cuda-graphs")] + [
    pytest.param("compile", marks=pytest.mark.slow)])
def test_engine_equals_eager(tiny, engine):
    if engine == "onnx" and not HAS_ORT:
        pytest.skip("onnxruntime is not installed")
    x = patterns(6)
    with torch.inference_mode():
        expected = tiny(x)
        run = prepare_network(tiny, engine, "cpu")
        got = run(x)
        assert got.shape == expected.shape
        assert float((got.float() - expected).abs().max()) < 1e-4
        # A smaller batch (a scan's last one) and a larger one give the same per-pattern answers.
        assert float((run(x[:3]).float() - expected[:3]).abs().max()) < 1e-4
        x8 = patterns(8, seed=2)
        assert float((run(x8).float() - tiny(x8)).abs().max()) < 1e-4
    # The caller's network is not modified (channels-last converts a copy).
    assert all(p.is_contiguous() for p in tiny.parameters())


@pytest.mark.parametrize("arch, folded", [("compact", 11), ("seed-unet", 7)])
def test_batch_norms_after_convolutions_fold_into_them(arch, folded):
    """Folded: the same function, no batch norm left after a convolution, the caller's network unchanged;
    a batch norm still in training mode (batch statistics) is left alone."""
    from deepphase.reconstruction.engines import fold_batch_norm

    torch.manual_seed(0)
    net = create_model(arch, n_px=16, out_px=16).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def norms(module):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())

    fused = fold_batch_norm(net)
    assert norms(net) - norms(fused) == folded
    x = patterns(5)
    with torch.inference_mode():
        assert float((fused(x) - net(x)).abs().max()) < 1e-5
        assert float((prepare_network(net, "channels-last")(x) - net(x)).abs().max()) < 1e-5
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items()) and norms(net) == folded + norms(fused)
    net.train()
    assert norms(fold_batch_norm(net)) == norms(net)


def test_eager_is_the_network_itself(tiny):
    assert prepare_network(tiny) is tiny


def test_unknown_engine_is_refused(tiny):
    with pytest.raises(DeepPhaseError, match=r"engine: expected one of eager, channels-last, compile, cuda-graphs, onnx, got 'tensorrt'"):
        prepare_network(tiny, "tensorrt")


@pytest.mark.parametrize("engine", ["compile", "onnx"])
def test_monte_carlo_dropout_needs_eager(engine):
    net = create_model("compact", n_px=16, out_px=16).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.train()
    with pytest.raises(DeepPhaseError, match="Monte Carlo dropout"):
        prepare_network(net, engine)


def test_onnx_on_a_gpu_is_refused(tiny, monkeypatch):
    # No GPU is needed: the device check comes before anything runs on it.
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    with pytest.raises(DeepPhaseError, match="CPU only"):
        prepare_network(tiny, "onnx", "cuda")


def test_onnx_without_onnxruntime_says_what_to_install(tiny, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(DeepPhaseError, match=r"pip install -e '\.\[onnx\]' in deepphase's source folder"):
        prepare_network(tiny, "onnx")


def test_packaged_model_is_accepted_as_phase_model():
    from deepphase.models.modelfile import load_model

    model = load_model()
    x = patterns(4, n=model.geometry.n_px)
    with torch.inference_mode():
        expected = model.network(x)
        got = prepare_network(model, "channels-last")(x)
    assert float((got - expected).abs().max()) < 1e-4


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
@pytest.mark.parametrize("exporter", ["torchscript", "torch.export"])
def test_each_exporter_computes_the_network_at_any_batch_size(tiny, exporter):
    import onnxruntime as ort

    from deepphase.reconstruction.engines import _export_onnx, fold_batch_norm

    net = fold_batch_norm(tiny)
    session = ort.InferenceSession(_export_onnx(net, patterns(1), exporter=exporter),
                                   providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = patterns(batch, seed=batch)
        with torch.inference_mode():
            expected = tiny(x)
        got = session.run(["y"], {"x": x.numpy()})[0]
        assert got.shape == tuple(expected.shape)
        assert float(np.abs(got - expected.numpy()).max()) < 1e-4


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
def test_onnx_runs_one_slice_of_a_batch_per_core_and_computes_what_one_call_computes(tiny, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from deepphase.reconstruction import engines

    monkeypatch.setenv("DEEPPHASE_CACHE_DIR", "off")
    slices = []

    class CountingPool(ThreadPoolExecutor):
        def map(self, fn, parts):
            parts = list(parts)
            slices.append([len(p) for p in parts])
            return super().map(fn, parts)

    with CountingPool(3) as pool:
        monkeypatch.setattr(engines, "_slice_pool", lambda workers: pool)
        three = prepare_network(tiny, "onnx", "cpu", threads=3)
        one = prepare_network(tiny, "onnx", "cpu", threads=1)  # no pool: one call per batch
        with torch.inference_mode():
            for batch in (7, 2, 1):
                x = patterns(batch, seed=batch)
                got, alone, expected = three(x), one(x), tiny(x)
                assert got.shape == alone.shape == expected.shape
                assert float((got - alone).abs().max()) < 1e-6 and float((got - expected).abs().max()) < 1e-4
    assert slices == [[3, 2, 2], [1, 1]]  # 7 and 2 patterns in slices; 1 pattern in one call


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
def test_onnx_takes_the_next_exporter_when_one_fails_or_disagrees(tiny, monkeypatch):
    from deepphase.reconstruction import engines

    monkeypatch.setenv("DEEPPHASE_CACHE_DIR", "off")
    real_export = engines._export_onnx
    other = engines._export_onnx(engines.fold_batch_norm(create_model("compact", n_px=16, out_px=16).eval()),
                                 patterns(1))
    used = []

    def export(network, example, exporter="torchscript"):
        used.append(exporter)
        if behaviour[exporter] == "fails":  # e.g. the deprecated TorchScript exporter gone from a later torch
            raise RuntimeError("this exporter cannot trace the network")
        return other if behaviour[exporter] == "disagrees" else real_export(network, example, exporter=exporter)

    monkeypatch.setattr(engines, "_export_onnx", export)
    x = patterns(5)
    with torch.inference_mode():
        expected = tiny(x)
        for behaviour in ({"torchscript": "fails", "torch.export": "works"},
                          {"torchscript": "disagrees", "torch.export": "works"}):
            used.clear()
            assert float((prepare_network(tiny, "onnx")(x) - expected).abs().max()) < 1e-4
            assert used == ["torchscript", "torch.export"]
        behaviour = {"torchscript": "works", "torch.export": "fails"}
        used.clear()
        prepare_network(tiny, "onnx")(x)
        assert used == ["torchscript"]  # the first that works is the one used
        behaviour = {"torchscript": "fails", "torch.export": "fails"}
        with pytest.raises(DeepPhaseError, match=r"exporting the network to ONNX failed \(RuntimeError: this "
                                                 r"exporter cannot trace"):
            prepare_network(tiny, "onnx")(x)
        behaviour = {"torchscript": "disagrees", "torch.export": "fails"}
        with pytest.raises(DeepPhaseError, match=r"ONNX export differs from the network by .*'eager' engine"):
            prepare_network(tiny, "onnx")(x)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from deepphase.evaluation.harness import default_cache_dir
    from deepphase.runtime import cache_dir

    monkeypatch.setenv("DEEPPHASE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert default_cache_dir() == tmp_path / "mine" / "multislice"  # the evaluation's simulations: same folder
    monkeypatch.setenv("DEEPPHASE_CACHE_DIR", "off")
    assert cache_dir() is None and default_cache_dir() is None
    monkeypatch.delenv("DEEPPHASE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "deepphase"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "deepphase"


def test_the_export_cache_keeps_the_most_recently_used(tmp_path):
    import time

    from deepphase.reconstruction.engines import _keep_recent_exports

    now = time.time()
    for k in range(5):
        (tmp_path / f"{k}.onnx").write_bytes(b"x")
        os.utime(tmp_path / f"{k}.onnx", (now - 100 * k, now - 100 * k))  # 0 is the newest
    (tmp_path / "notes.txt").write_text("not an export")
    _keep_recent_exports(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.onnx", "1.onnx", "2.onnx", "notes.txt"]


@pytest.fixture
def export_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DEEPPHASE_CACHE_DIR", str(folder))
    return folder / "onnx"


def _exporter_that_must_not_run(*args, **kwargs):
    raise AssertionError("exported again although the cache holds the export")


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
def test_onnx_export_is_kept_and_reused_and_a_bad_one_is_never_used(tiny, export_cache, monkeypatch):
    from deepphase.reconstruction import engines
    from deepphase.reconstruction.engines import cached_onnx_export, resolve_engine

    x = patterns(5)
    shape = tuple(x.shape[1:])
    assert cached_onnx_export(tiny, shape) is None
    assert resolve_engine("auto", "cpu", 100, network=tiny, pattern_shape=shape) == "channels-last"
    with torch.inference_mode():
        expected = tiny(x)
        assert float((prepare_network(tiny, "onnx")(x) - expected).abs().max()) < 1e-4
    kept = cached_onnx_export(tiny, shape)
    assert kept is not None and list(export_cache.iterdir()) == [kept]
    # Kept: the next run reads it instead of exporting, and auto takes ONNX Runtime at any scan size.
    assert resolve_engine("auto", "cpu", 100, network=tiny, pattern_shape=shape) == "onnx"
    real_export = engines._export_onnx
    monkeypatch.setattr(engines, "_export_onnx", _exporter_that_must_not_run)
    with torch.inference_mode():
        assert float((prepare_network(tiny, "onnx")(x) - expected).abs().max()) < 1e-4
    # Only for this network and pattern size: other weights, or another size, have no export yet.
    other = create_model("compact", n_px=16, out_px=16, sigma_head="detached", linear_path=True,
                         linear_gate=True).eval()
    assert cached_onnx_export(other, shape) is None and cached_onnx_export(tiny, (1, 24, 24)) is None
    # A damaged file is exported again and replaced.
    good = kept.read_bytes()
    kept.write_bytes(b"not an ONNX model")
    monkeypatch.setattr(engines, "_export_onnx", real_export)
    with torch.inference_mode():
        assert float((prepare_network(tiny, "onnx")(x) - expected).abs().max()) < 1e-4
    assert kept.read_bytes() != b"not an ONNX model"
    # A file that loads but computes another network's function (here: the other network's cache entry
    # holding this one's export) is refused, and an export that does not match is an error, not a result.
    stale = engines._export_path(engines.fold_batch_norm(other), shape)
    stale.write_bytes(good)
    monkeypatch.setattr(engines, "_export_onnx", lambda *a, **k: good)
    with torch.inference_mode(), pytest.raises(DeepPhaseError, match=r"ONNX export differs from the network by"):
        prepare_network(other, "onnx")(x)


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
def test_onnx_without_a_cache_or_a_writable_one_still_runs(tiny, tmp_path, monkeypatch, caplog):
    x = patterns(3)
    monkeypatch.setenv("DEEPPHASE_CACHE_DIR", "off")
    with torch.inference_mode():
        expected = tiny(x)
        assert float((prepare_network(tiny, "onnx")(x) - expected).abs().max()) < 1e-4
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("DEEPPHASE_CACHE_DIR", str(blocker))
    with torch.inference_mode(), caplog.at_level("WARNING"):
        assert float((prepare_network(tiny, "onnx")(x) - expected).abs().max()) < 1e-4
    assert "could not keep the ONNX export" in caplog.text
    assert blocker.read_text() == "a file where the cache folder would be"


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
def test_a_model_folders_own_export_is_used_and_one_of_other_weights_passed_over(tiny, tmp_path, export_cache,
                                                                                  monkeypatch):
    from deepphase.models.modelfile import PhaseModel, load_model, save_model
    from deepphase.reconstruction import engines
    from deepphase.reconstruction.engines import export_onnx, resolve_engine

    packaged = load_model()
    folder = save_model(packaged, tmp_path / "mine")
    export_onnx(packaged, folder / "model.onnx")
    model = load_model(folder)
    assert resolve_engine("auto", "cpu", 100, network=model, pattern_shape=(1, 32, 32)) == "onnx"
    real_export = engines._export_onnx
    monkeypatch.setattr(engines, "_export_onnx", _exporter_that_must_not_run)
    x = patterns(4, n=32)
    with torch.inference_mode():
        assert float((prepare_network(model, "onnx")(x) - model.network(x)).abs().max()) < 1e-4
    assert not export_cache.exists()  # the folder's export served: nothing to keep
    # The same export beside other weights (retrained, same architecture) is stale: passed over, exported afresh.
    with torch.no_grad():
        packaged.network.stem[0].weight.mul_(-1)
    other = save_model(PhaseModel(packaged.network, packaged.arch, packaged.arch_config, packaged.probe,
                                  packaged.geometry, packaged.info), tmp_path / "retrained")
    (other / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())
    model = load_model(other)
    exports = []
    monkeypatch.setattr(engines, "_export_onnx", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    with torch.inference_mode():
        assert float((prepare_network(model, "onnx")(x) - model.network(x)).abs().max()) < 1e-4
    assert exports == [1] and len(list(export_cache.iterdir())) == 1
    with pytest.raises(DeepPhaseError, match=r"pattern_shape"):
        export_onnx(tiny, tmp_path / "bare.onnx")
    assert not (tmp_path / "bare.onnx").exists()
    # An existing file is the user's: replaced only when asked.
    stale = (other / "model.onnx").read_bytes()
    with pytest.raises(DeepPhaseError, match=r"exists; pass overwrite=True"):
        export_onnx(model, other / "model.onnx")
    assert (other / "model.onnx").read_bytes() == stale
    # An export that does not compute the network (here: the original weights' graph) is never written.
    monkeypatch.setattr(engines, "_export_onnx", lambda *a, **k: stale)
    with pytest.raises(DeepPhaseError, match=r"export differs from the network .* nothing written"):
        export_onnx(model, tmp_path / "new.onnx")
    assert not (tmp_path / "new.onnx").exists()


def test_export_key_is_the_same_in_every_process(tmp_path):
    """What one run keeps, the next finds: the digest must not depend on the process (set order, the
    working folder, hash randomisation)."""
    import subprocess
    import sys

    code = ("import torch; from deepphase.models import create_model; "
            "from deepphase.reconstruction.engines import _export_key, fold_batch_norm; torch.manual_seed(0); "
            "net = create_model('compact', n_px=16, out_px=16, sigma_head='detached', linear_path=True, "
            "linear_gate=True).eval(); print(_export_key(fold_batch_norm(net), (1, 16, 16)))")
    keys = set()
    for k, cwd in enumerate([tmp_path, Path(__file__).parent]):
        env = {**os.environ, "PYTHONHASHSEED": str(k)}
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                              check=True)
        keys.add(done.stdout.strip())
    assert len(keys) == 1 and len(keys.pop()) == 64


def test_reconstruct_with_channels_last_equals_eager():
    """The engine reaches the network through the pipeline (prepared once, used for every chunk)."""
    from deepphase.data.simulate import simulate_scan
    from deepphase.data.specimens import twisted_hbn
    from deepphase.physics import raster_positions, reference_probe
    from .conftest import unchecked_reconstruct as reconstruct

    scan = simulate_scan(twisted_hbn((40, 40)), reference_probe(), raster_positions((8, 8), 0.87), seed=0)
    eager = reconstruct(scan.amplitude, scan.positions, engine="eager", progress=False)
    fast = reconstruct(scan.amplitude, scan.positions, engine="channels-last", chunk_size=20, progress=False)
    assert fast.processing["engine"] == "channels-last"
    np.testing.assert_allclose(fast.phase, eager.phase, atol=1e-4)


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
def test_auto_exports_for_a_large_scan_and_falls_back_to_channels_last_quietly_when_the_export_fails(monkeypatch):
    from deepphase.data.simulate import simulate_scan
    from deepphase.data.specimens import twisted_hbn
    from deepphase.physics import raster_positions, reference_probe
    from deepphase.reconstruction import engines
    from .conftest import unchecked_reconstruct as reconstruct

    monkeypatch.setenv("DEEPPHASE_CACHE_DIR", "off")
    monkeypatch.setattr(engines, "ONNX_AUTO_MIN_PATTERNS", 64)  # this 8×8 scan counts as large
    scan = simulate_scan(twisted_hbn((40, 40)), reference_probe(), raster_positions((8, 8), 0.87), seed=0)
    eager = reconstruct(scan.amplitude, scan.positions, engine="eager", progress=False)
    exported = reconstruct(scan.amplitude, scan.positions, progress=False)
    assert exported.processing["engine"] == "onnx (auto)"
    np.testing.assert_allclose(exported.phase, eager.phase, atol=1e-4)

    def no_export(*args, **kwargs):
        raise RuntimeError("this network cannot be traced")

    monkeypatch.setattr(engines, "_export_onnx", no_export)
    fallen_back = reconstruct(scan.amplitude, scan.positions, progress=False)
    assert fallen_back.processing["engine"] == "channels-last (auto)"
    np.testing.assert_allclose(fallen_back.phase, eager.phase, atol=1e-4)
    with pytest.raises(DeepPhaseError, match="cannot be traced"):  # asked for by name, the failure is said
        reconstruct(scan.amplitude, scan.positions, engine="onnx", progress=False)


def test_auto_engine_picks_by_device_size_and_what_is_installed(monkeypatch):
    import importlib.util

    from deepphase.reconstruction.engines import ONNX_AUTO_MIN_PATTERNS, resolve_engine

    assert resolve_engine("auto", "cuda", 10**6) == "eager"
    assert resolve_engine("auto", "cpu", 1000) == "channels-last"
    assert resolve_engine("eager", "cpu", 10**6) == "eager"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert resolve_engine("auto", "cpu", ONNX_AUTO_MIN_PATTERNS) == "channels-last"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert resolve_engine("auto", "cpu", ONNX_AUTO_MIN_PATTERNS) == "onnx"
    assert resolve_engine("auto", "cpu", ONNX_AUTO_MIN_PATTERNS, precision="bfloat16") == "channels-last"


def test_cuda_graphs_on_a_cpu_is_refused(tiny):
    with pytest.raises(DeepPhaseError, match=r"engine: 'cuda-graphs' needs a CUDA device .* runs on 'cpu' here"):
        prepare_network(tiny, "cuda-graphs", "cpu")


def test_cli_accepts_cuda_graphs_and_names_the_device_it_needs(tmp_path, capsys):
    from deepphase.cli import main

    data = tmp_path / "scan.npy"
    np.save(data, np.ones((16, 32, 32), dtype=np.float32))
    status = main(["reconstruct", str(data), "--scan-shape", "4", "4", "--step", "0.87", "--input", "amplitude",
                   "--engine", "cuda-graphs", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert status == 2
    assert "'cuda-graphs' needs a CUDA device" in capsys.readouterr().err


def _cpu_capture(captures):
    """A stand-in for the CUDA capture: static buffers and a 'replay' that runs the network into them."""
    def capture(network, example):
        static_in = example.clone()
        static_out = network(static_in).clone()
        captures.append((len(example), torch.is_autocast_enabled("cpu")))

        def replay():
            static_out.copy_(network(static_in))

        return static_in, static_out, replay

    return capture


def test_graph_runner_pads_small_batches_and_captures_per_size_and_autocast(tiny):
    """The buffer logic of the 'cuda-graphs' engine, with the CUDA capture replaced by a CPU stand-in."""
    captures = []
    run = _GraphRunner(tiny, torch.device("cpu"), capture=_cpu_capture(captures))
    x6, x8 = patterns(6), patterns(8, seed=2)
    with torch.inference_mode():
        first = run(x6)
        np.testing.assert_allclose(first.numpy(), tiny(x6).numpy(), atol=1e-5)
        small = run(x6[:3])  # replayed in the batch-6 graph, its last rows stale
        np.testing.assert_allclose(small.numpy(), tiny(x6[:3]).numpy(), atol=1e-5)
        assert captures == [(6, False)]
        # A returned batch is a copy: the next replay does not change it.
        run(x8[:5])
        np.testing.assert_allclose(first.numpy(), tiny(x6).numpy(), atol=1e-5)
        np.testing.assert_allclose(run(x8).numpy(), tiny(x8).numpy(), atol=1e-5)  # larger: a new graph
        assert captures == [(6, False), (8, False)]
        np.testing.assert_allclose(run(x8[:7]).numpy(), tiny(x8[:7]).numpy(), atol=1e-5)
        assert len(captures) == 2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = run(x6)  # another autocast setting is another graph, captured under it
        assert captures[-1] == (6, True)
        assert float((half.float() - tiny(x6)).abs().max()) < 0.1
    # The caller's network is neither moved to channels_last nor frozen.
    assert all(p.is_contiguous() and p.requires_grad for p in tiny.parameters())
    cl = _GraphRunner(tiny, torch.device("cpu"), channels_last=True, capture=_cpu_capture([]))
    with torch.inference_mode():
        np.testing.assert_allclose(cl(x6).numpy(), tiny(x6).numpy(), atol=1e-5)


def test_a_failed_graph_capture_is_one_line_that_names_the_cause(tiny):
    def failing(network, example):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nlong trace ...")

    run = _GraphRunner(tiny, torch.device("cpu"), capture=failing)
    with pytest.raises(DeepPhaseError) as caught, torch.inference_mode():
        run(patterns(4))
    message = str(caught.value)
    assert message.startswith("engine: capturing a CUDA graph failed (RuntimeError: CUDA error: operation not")
    assert "use the 'eager' engine" in message and "long trace" not in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_equal_eager_on_a_gpu(tiny):
    import copy

    net = copy.deepcopy(tiny).to("cuda")
    x = patterns(6).to("cuda")
    with torch.inference_mode():
        expected = net(x)
        run = prepare_network(net, "cuda-graphs", "cuda")
        assert float((run(x) - expected).abs().max()) < 1e-4
        assert float((run(x[:3]) - expected[:3]).abs().max()) < 1e-4
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert float((run(x).float() - expected).abs().max()) < 0.1


def test_export_onnx_says_a_probe_aware_model_is_exported_for_its_own_probe(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from deepphase.cli import main

    assert main(["export-onnx", "--model", "probe-aware", "--out", str(tmp_path / "aware.onnx")]) == 0
    assert "exported for the model's own probe" in capsys.readouterr().out
    assert main(["export-onnx", "--model", "default", "--out", str(tmp_path / "default.onnx")]) == 0
    assert "probe-aware" not in capsys.readouterr().out
