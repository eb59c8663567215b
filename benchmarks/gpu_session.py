"""Every GPU figure issue 4 asks for, in one run: the script a session lent a GPU runs once.

Usage (on the GPU machine, from the repository root; benchmarks/gpu_session.sh is the device command):
    PYTHONPATH=$PWD python3 benchmarks/gpu_session.py --device cuda --out $OUT
Here, to test it (tiny sizes, every stage that can run on a CPU):
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/gpu_session.py --device cpu --quick --out /tmp/gs

Stages, in order, each guarded: a stage that fails is recorded with its error in the JSON and the next
one still runs. The JSON (``OUT/gpu_session.json``) is rewritten after every stage, so a run stopped at
its time limit still leaves what it measured. ``benchmarks/gpu_report.py`` turns it into RESULTS.md tables.

  environment   torch, CUDA and cuDNN versions, the GPU, its memory, CPU count
  correctness   the packaged default's patches on a small simulated scan, every engine × precision on the
                device, against float32 on the CPU (max abs difference, rad); the whole reconstruct too
  network       every packaged model × batch size × precision × engine: patterns/s (CUDA events after
                warm-up), peak memory, parameters, GFLOP/pattern; torch.compile last, while time is left
  end_to_end    a 256×256 simulated scan written to .npy; reconstruct() in-process on the device twice
                per setting (the second is the figure), the best against the 0.5 s target, a profile of
                where the time goes when it is missed; then the CLI command under /usr/bin/time
  stitching     the pairwise stitcher and the seed's loop on 65,536 known-offset patches (host CPU)
  training      the packaged default's recipe on the device (the stream simulates on the device), then a
                larger batch; samples/s, validation loss per epoch on the shipped model's own validation
                set, and when it reaches the shipped model's loss on it (measured there); the best model folder to OUT

Time: every stage has a budget (seconds) and the whole run one (``--budget-s``, default 420 s on a GPU),
so that it ends inside 8 minutes of wall time and a rerun fits a 15-minute lease.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_stitching beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # deepphase from this checkout

import deepphase  # noqa: E402
from deepphase.data.io import AmplitudeView  # noqa: E402
from deepphase.models import count_parameters, flops_per_pattern  # noqa: E402
from deepphase.models.modelfile import load_model  # noqa: E402
from deepphase.physics import raster_positions  # noqa: E402
from deepphase.reconstruction import engines as engines_mod  # noqa: E402
from deepphase.reconstruction import pipeline as pipeline_mod  # noqa: E402
from deepphase.reconstruction.engines import prepare_network  # noqa: E402
from deepphase.reconstruction.predict import predict_patches  # noqa: E402

TARGETS = {"network_patterns_per_second": 1_000_000, "scan_256_seconds": 0.5, "training_seconds": 600}
MODELS = ("default", "unet-small", "seed", "neighbourhood")  # every packaged model (default = compact)
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
STEP_PX = 0.87
COMPILE_RESERVE_S = 30  # a torch.compile is not started with less of its stage's budget left (it takes 20-60 s)


class BudgetSpent(Exception):
    """A stage's time budget ran out; what it measured so far stands."""


class Session:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t_start = time.perf_counter()
        self.results = {"script": "benchmarks/gpu_session.py", "argv": sys.argv[1:], "quick": args.quick,
                        "device": str(self.device), "targets": TARGETS,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages": {}}
        self.work = Path(tempfile.mkdtemp(prefix="gpu_session_"))

    # -- bookkeeping -------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t_start)

    def save(self):
        self.results["elapsed_s"] = round(time.perf_counter() - self.t_start, 1)
        path = self.out / "gpu_session.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=_jsonable))
        tmp.replace(path)

    def run_stage(self, name: str, fn, budget: float, needs_cuda: bool = False):
        record = {"status": "running"}
        self.results["stages"][name] = record
        log(f"\n=== stage {name} (budget {budget:.0f} s, {self.left():.0f} s left in the run) ===")
        if needs_cuda and not self.cuda:
            record.update(status="skipped: no CUDA")
            log("skipped: no CUDA")
            self.save()
            return
        deadline = time.perf_counter() + max(0.0, min(budget, self.left()))
        t0 = time.perf_counter()
        try:
            fn(record, deadline)
            record["status"] = "ok"
        except BudgetSpent as exc:
            record["status"] = f"ok (stopped by its time budget: {exc})"
        except Exception as exc:  # a failed stage is a result; the next one runs
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
            record["traceback"] = traceback.format_exc()[-3000:]
            log(f"FAILED: {record['error']}\n{record['traceback']}")
        record["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"=== {name}: {record['status']} in {record['seconds']} s ===")
        if self.cuda:
            torch.cuda.empty_cache()
        self.save()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # -- a: environment ----------------------------------------------------------------------------
    def environment(self, rec, deadline):
        rec.update(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                   deepphase=deepphase.__version__, cuda_available=torch.cuda.is_available(),
                   torch_cuda=torch.version.cuda, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                   machine=platform.machine(), processor=platform.processor(),
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
        try:
            import triton
            rec["triton"] = triton.__version__
        except ImportError:
            rec["triton"] = None
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            rec.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
            with contextlib.suppress(Exception):
                rec["nvidia_smi"] = subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                    capture_output=True, text=True, timeout=20).stdout.strip()
        log(json.dumps(rec, default=_jsonable))

    # -- b: correctness ----------------------------------------------------------------------------
    def correctness(self, rec, deadline):
        from deepphase.data.simulate import required_object_shape, simulate_scan
        from deepphase.data.specimens import twisted_hbn
        from deepphase.reconstruction.pipeline import reconstruct

        side = 16 if self.args.quick else 32
        model = load_model("default")
        positions = raster_positions((side, side), STEP_PX, fastest="row")
        scan = simulate_scan(twisted_hbn(required_object_shape(positions, 32)), model.probe, positions, dose=1e5,
                             seed=0, progress=False)
        batch = 128 if self.args.quick else 512
        reference = predict_patches(model, scan.amplitude, batch_size=batch, device="cpu", precision="float32",
                                    progress=False)
        ref_image = reconstruct(scan.amplitude, scan.positions, model, device="cpu", precision="float32",
                                engine="eager", progress=False, checks=False).phase
        rec.update(patterns=len(positions), reference="CPU float32 eager", rows=[])
        engines = ["eager", "channels-last", "cuda-graphs", "compile"]
        for engine in engines:
            # bfloat16 first: the GPU's "auto" precision, and what a compile that the budget cuts should keep.
            for precision in ("bfloat16", "float32", "float16"):
                row = {"engine": engine, "precision": precision}
                rec["rows"].append(row)
                if engine == "cuda-graphs" and not self.cuda:
                    row["status"] = "skipped: no CUDA"
                    continue
                if engine == "compile" and (self.args.quick or precision == "float16"):
                    row["status"] = "skipped: " + ("--quick" if self.args.quick else "time (float16 compile)")
                    continue
                if time.perf_counter() > deadline - (COMPILE_RESERVE_S if engine == "compile" else 0):
                    row["status"] = "skipped: stage budget"
                    continue
                try:
                    if engine == "compile":
                        torch._dynamo.reset()
                    runner = prepare_network(model, engine, self.device) if engine != "eager" else None
                    t0 = time.perf_counter()
                    got = predict_patches(model, scan.amplitude, batch_size=batch, device=self.device,
                                          precision=precision, progress=False, runner=runner)
                    row["seconds"] = round(time.perf_counter() - t0, 2)
                    row["max_abs_diff_rad"] = float(np.abs(got - reference).max())
                    row["mean_abs_diff_rad"] = float(np.abs(got - reference).mean())
                    row["status"] = "ok"
                except Exception as exc:
                    row["status"] = f"failed: {_why(exc)}"
                log(f"  {engine:14s} {precision:9s} {row}")
                model.network.cpu()
        for precision in ("float32", "bfloat16"):
            try:
                image = reconstruct(scan.amplitude, scan.positions, model, device=self.device, precision=precision,
                                    engine="eager", progress=False, checks=False).phase
                diff = float(np.nanmax(np.abs((image - image.mean()) - (ref_image - ref_image.mean()))))
                rec[f"image_max_abs_diff_rad_{precision}"] = diff
                log(f"  whole reconstruct on {self.device}, {precision}: image max abs diff {diff:.2e} rad")
            finally:
                model.network.cpu()

    # -- c: network throughput ---------------------------------------------------------------------
    def network(self, rec, deadline):
        quick = self.args.quick
        batches = self.args.batch_sizes or ([32] if quick else [1024, 8192, 65536])
        precisions = ["float32", "bfloat16"] if quick else list(PRECISIONS)
        # every engine but eager folds batch norms into convolutions; channels-last+unfolded shows what that gives
        cheap = ["eager", "channels-last", "channels-last+unfolded", "cuda-graphs", "cuda-graphs+channels-last"]
        rec.update(batches=batches, precisions=precisions, timing_s=self.args.seconds, rows=[], models={},
                   clock="torch.cuda.Event" if self.cuda else "time.perf_counter",
                   note="patterns/s of the network alone on input already on the device; peak memory is "
                        "torch.cuda.max_memory_allocated during the variant (weights, input, activations)")
        nets = {}
        for name in MODELS:
            model = load_model(name)
            net = model.network.eval()
            rec["models"][name] = {"arch": model.arch, "in_channels": model.in_channels,
                                   "parameters": count_parameters(net),
                                   "gflop_per_pattern": round(flops_per_pattern(net) / 1e9, 4)}
            nets[name] = (net.to(self.device), model.in_channels)
            log(f"  {name}: {rec['models'][name]}")
        # Most wanted first, so that what the stage budget cuts off is the least wanted: the default model
        # with every cheap engine (and cuDNN's autotuning), the other models, torch.compile of the default
        # in bfloat16 at the two largest batches (tens of seconds per shape and precision), then the
        # remaining compiles.
        cheap_plan = [(name, b, p, e) for name in MODELS for b in batches for p in precisions for e in cheap
                      if name == "default" or e not in ("cuda-graphs+channels-last", "channels-last+unfolded")]
        compile_plan = [(n, b, p, "compile") for n in MODELS for p in ("bfloat16", "float32", "float16")
                        if p in precisions for b in sorted(batches, reverse=True)]
        if quick:
            compile_plan = []
            rec["compile"] = "skipped: --quick (a CPU compile takes ~30 s per shape)"
        first = [v for v in compile_plan if v[0] == "default" and v[2] == "bfloat16"][:2]
        # cuDNN's own benchmark of convolution algorithms (a global switch, off by default and in the CLI).
        autotuned = [("default", b, p, "channels-last+cudnn.benchmark") for b in batches for p in precisions
                     if self.cuda]
        plan = ([v for v in cheap_plan if v[0] == "default"] + autotuned + [v for v in cheap_plan if v[0] != "default"]
                + first + [v for v in compile_plan if v not in first])
        inputs = {}
        for name, batch, precision, engine in plan:
            row = {"model": name, "batch": batch, "precision": precision, "engine": engine}
            rec["rows"].append(row)
            if engine.startswith("cuda-graphs") and not self.cuda:
                row["status"] = "skipped: no CUDA"
                continue
            if time.perf_counter() > deadline - (COMPILE_RESERVE_S if engine == "compile" else 0):
                row["status"] = "skipped: stage budget"
                continue
            net, channels = nets[name]
            key = (channels, batch)
            try:
                if key not in inputs:
                    inputs.clear()
                    inputs[key] = make_input(batch, channels, self.device)
                x = inputs[key]
                row.update(self.time_variant(net, engine, precision, x, deadline))
                row["status"] = "ok"
            except torch.cuda.OutOfMemoryError:
                row["status"] = "out of memory"
                inputs.clear()
            except Exception as exc:
                row["status"] = f"failed: {_why(exc)}"
            finally:
                torch.backends.cudnn.benchmark = False  # also after a variant that failed
                if self.cuda:
                    torch.cuda.empty_cache()
            log(f"  {name:13s} batch {batch:6d} {precision:8s} {engine:26s} "
                + (f"{row['patterns_per_second']:>14,.0f} patterns/s  peak {row['peak_memory_mb']} MB  "
                   f"one-off {row['one_off_s']} s" if row["status"] == "ok" else row["status"]))
            self.save()
        best = {}
        for row in rec["rows"]:
            if row.get("status") == "ok" and row["patterns_per_second"] > best.get(row["model"], {}).get("patterns_per_second", 0):
                best[row["model"]] = row
        rec["best"] = best
        # What reconstruct() can use: the best default-model row among the pipeline's own engines.
        usable = [r for r in rec["rows"] if r["model"] == "default" and r.get("status") == "ok"
                  and r["engine"] in engines_mod.ENGINES]
        self.best_default = max(usable, key=lambda r: r["patterns_per_second"]) if usable else None
        self.network_rows = usable
        rec["best_default_pipeline_engine"] = self.best_default
        log(f"  best: {best}\n  best default with a pipeline engine: {self.best_default}")

    def time_variant(self, net, engine, precision, x, deadline):
        """Patterns/s of ``engine`` at ``precision`` on ``x``, after warm-up; peak memory; one-off cost."""
        cast = PRECISIONS[precision]
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        if engine == "compile":
            torch._dynamo.reset()  # a fresh compile per variant: no recompile limit, no dynamic batch axis
        torch.backends.cudnn.benchmark = engine.endswith("+cudnn.benchmark")
        t0 = time.perf_counter()
        if engine == "cuda-graphs+channels-last":
            run = engines_mod._cuda_graphs(engines_mod.fold_batch_norm(net), self.device, channels_last=True)
        elif engine == "channels-last+unfolded":
            run = prepare_network(net, "channels-last", self.device, fold=False)
        else:
            run = prepare_network(net, engine.removesuffix("+cudnn.benchmark"), self.device)
        autocast = (torch.autocast(self.device.type, dtype=cast) if cast is not None else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            run(x)  # compiles / captures here
            self.sync()
            one_off = time.perf_counter() - t0
            run(x)
            self.sync()
            t1 = time.perf_counter()
            run(x)
            self.sync()
            once = time.perf_counter() - t1
            calls = int(max(2, min(2000, self.args.seconds / max(once, 1e-6))))
            if time.perf_counter() + calls * once > deadline + 5:
                calls = 2
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    run(x)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                t1 = time.perf_counter()
                for _ in range(calls):
                    run(x)
                seconds = time.perf_counter() - t1
        torch.backends.cudnn.benchmark = False
        result = {"patterns_per_second": calls * len(x) / seconds, "calls": calls,
                  "ms_per_batch": round(1000 * seconds / calls, 3), "one_off_s": round(one_off, 2)}
        if self.cuda:
            result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
            result["activation_memory_mb"] = round((torch.cuda.max_memory_allocated(self.device) - base) / 2**20)
        else:
            result["peak_memory_mb"] = None
        del run
        return result

    # -- d: end to end -----------------------------------------------------------------------------
    def end_to_end(self, rec, deadline):
        from deepphase.data.simulate import required_object_shape, simulate_scan
        from deepphase.data.specimens import twisted_hbn
        from deepphase.reconstruction.pipeline import reconstruct

        side = 32 if self.args.quick else 256
        model = load_model("default")
        positions = raster_positions((side, side), STEP_PX, fastest="row")
        t0 = time.perf_counter()
        scan = simulate_scan(twisted_hbn(required_object_shape(positions, 32)), model.probe, positions, dose=1e5,
                             seed=0, progress=False, batch_size=4096)
        big = self.work / "big.npy"
        np.save(big, scan.amplitude)
        rec.update(scan=f"{side}×{side}", patterns=side * side, simulate_s=round(time.perf_counter() - t0, 1),
                   file_mb=round(big.stat().st_size / 2**20))
        del scan
        t0 = time.perf_counter()
        frames = np.load(big)
        rec["np_load_s"] = round(time.perf_counter() - t0, 3)
        # The network's best engine without torch.compile: reconstruct() prepares its engine per call, so a
        # compiled network traces again in every call (the inductor cache only shortens it); compile is
        # tried last, if it was the fastest.
        rows = getattr(self, "network_rows", [])
        best = max((r for r in rows if r["engine"] != "compile"), key=lambda r: r["patterns_per_second"], default={})
        best_engine = best.get("engine", "eager")
        best_precision = best.get("precision", "bfloat16" if self.cuda else "float32")
        # Most wanted first: what the CLI does by default, the network's best setting in one chunk; then
        # the CLI command itself (and a profile if the target is missed); then eager with the same batch,
        # chunks of 16,384 patterns (the CLI's default chunk), one batch of the whole scan, compile.
        n = side * side
        big_batch = min(8192, n)
        settings = [("auto", "auto", 512, 16384), (best_engine, best_precision, big_batch, n), "cli", "profile",
                    # the patches copied to the host and reduced there, as before session 14: what reducing
                    # them on the GPU saves
                    (best_engine, best_precision, big_batch, n, "host")]
        if not self.args.quick:
            settings += [("eager", best_precision, big_batch, n), (best_engine, best_precision, 16384, 16384),
                         ("eager", best_precision, 16384, 16384), (best_engine, best_precision, n, n)]
            if (getattr(self, "best_default", None) or {}).get("engine") == "compile":
                settings.append(("compile", self.best_default["precision"], big_batch, n))
        settings = list(dict.fromkeys(settings))
        rec["runs"] = []
        best_run = None
        for setting in settings:
            if setting == "cli":
                if time.perf_counter() < deadline - 10:
                    try:
                        rec["cli"] = self.cli_run(big, side, deadline)
                    except Exception as exc:  # e.g. its time limit: the in-process runs still go on
                        rec["cli"] = {"status": f"failed: {_why(exc)}"}
                else:
                    rec["cli"] = {"status": "skipped: stage budget"}
                self.save()
                continue
            if setting == "profile":
                missed = best_run is not None and not (side == 256 and best_run["warm_wall_s"] + rec["np_load_s"]
                                                       < TARGETS["scan_256_seconds"])
                if missed and time.perf_counter() < deadline - (3 if self.args.quick else 15):
                    try:
                        rec["profile"] = self.profile_reconstruct(frames, positions, model, best_run)
                    except Exception as exc:
                        rec["profile"] = {"error": _why(exc)}
                    rec["profile"]["of"] = {k: best_run[k] for k in ("engine", "precision", "batch_size", "chunk_size")}
                self.save()
                continue
            engine, precision, batch, chunk, *where = setting
            if time.perf_counter() > deadline - (3 if self.args.quick else 15):
                rec["runs"].append({"engine": engine, "status": "skipped: stage budget"})
                continue
            run = {"engine": engine, "precision": precision, "batch_size": batch, "chunk_size": chunk}
            on_host = mock.patch.object(pipeline_mod, "reduce_on_device", lambda *a: False) if where else contextlib.nullcontext()
            rec["runs"].append(run)
            try:
                for attempt in ("cold", "warm"):
                    self.sync()
                    t0 = time.perf_counter()
                    with on_host:
                        rec_ = reconstruct(AmplitudeView(frames, "amplitude"), positions, model, device=self.device,
                                           precision=precision, engine=engine, batch_size=batch, chunk_size=chunk,
                                           progress=False, checks=False)
                    self.sync()
                    run[f"{attempt}_wall_s"] = round(time.perf_counter() - t0, 3)
                run["timings"] = rec_.timings
                run["engine_used"] = rec_.processing["engine"]
                run["deblurred"] = rec_.processing.get("deblurred")
                run["patches_reduced_on"] = rec_.processing.get("patches_reduced_on")
                run["status"] = "ok"
                if not where and (best_run is None or run["warm_wall_s"] < best_run["warm_wall_s"]):
                    best_run = run
            except Exception as exc:
                run["status"] = f"failed: {_why(exc)}"
            log(f"  {run}")
            self.save()
        rec["best"] = best_run
        if best_run is not None:
            total = best_run["warm_wall_s"] + rec["np_load_s"]
            rec["best_with_file_read_s"] = round(total, 3)
            rec["target_s"] = TARGETS["scan_256_seconds"]
            rec["target_met"] = bool(total < TARGETS["scan_256_seconds"]) if side == 256 else None
            log(f"  best warm reconstruct {best_run['warm_wall_s']} s (+ np.load {rec['np_load_s']} s) "
                f"against the {TARGETS['scan_256_seconds']} s target")
        del frames

    def profile_reconstruct(self, frames, positions, model, run):
        """Where a warm run's time goes: cProfile (Python/CPU side) and, on a GPU, torch.profiler's kernels."""
        from deepphase.reconstruction.pipeline import reconstruct

        kwargs = dict(device=self.device, precision=run["precision"], engine=run["engine"],
                      batch_size=run["batch_size"], chunk_size=run["chunk_size"], progress=False)
        out = {}
        profiler = cProfile.Profile()
        profiler.enable()
        reconstruct(AmplitudeView(frames, "amplitude"), positions, model, **kwargs, checks=False)
        self.sync()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
        out["cprofile_cumulative_top30"] = _trim_pstats(text.getvalue())
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
        out["cprofile_tottime_top20"] = _trim_pstats(text.getvalue())
        log(out["cprofile_tottime_top20"])
        if self.cuda:
            try:
                out.update(self._torch_profile(frames, positions, model, kwargs))
            except Exception as exc:
                out["torch_profiler_error"] = _why(exc)
        return out

    def _torch_profile(self, frames, positions, model, kwargs):
        from deepphase.reconstruction.pipeline import reconstruct
        from torch.profiler import ProfilerActivity, profile

        out = {}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as prof:
            reconstruct(AmplitudeView(frames, "amplitude"), positions, model, **kwargs, checks=False)
            self.sync()
        averages = prof.key_averages()
        if self.cuda:
            try:
                out["torch_profiler_by_cuda_time"] = averages.table(sort_by="device_time_total", row_limit=15)
            except Exception:  # older name of the sort key
                out["torch_profiler_by_cuda_time"] = averages.table(sort_by="cuda_time_total", row_limit=15)
            log(out["torch_profiler_by_cuda_time"])
        out["torch_profiler_by_cpu_time"] = averages.table(sort_by="self_cpu_time_total", row_limit=15)
        return out

    def cli_run(self, big, side, deadline):
        """The command as a user types it, wall time and peak resident memory by /usr/bin/time."""
        out_dir = self.work / "cli_out"
        command = [sys.executable, "-m", "deepphase.cli", "reconstruct", str(big), "--scan-shape", str(side), str(side),
                   "--step", str(STEP_PX), "--device", str(self.device), "--out", str(out_dir), "--overwrite"]
        timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        t0 = time.perf_counter()
        proc = subprocess.run(timer + command, capture_output=True, text=True, env=env,
                              timeout=max(30, deadline - time.perf_counter() + 30))
        wall = time.perf_counter() - t0
        result = {"command": "deepphase " + " ".join(command[3:]).replace(str(self.work) + "/", ""),
                  "returncode": proc.returncode, "wall_s": round(wall, 2)}
        for line in proc.stderr.splitlines():
            if "Maximum resident set size" in line:
                result["peak_rss_mb"] = round(int(line.split(":")[-1]) / 1024)
            if "Elapsed (wall clock)" in line:
                result["time_elapsed"] = line.split(": ", 1)[-1].strip()
        if proc.returncode != 0:
            result["stderr_tail"] = proc.stderr[-1500:]
        meta = out_dir / "metadata.json"
        if meta.exists():
            data = json.loads(meta.read_text())
            result["timings"] = data.get("timings")
            result["engine"] = (data.get("processing") or {}).get("engine")
        log(f"  CLI: {result}")
        return result

    # -- e: stitching ------------------------------------------------------------------------------
    def stitching(self, rec, deadline):
        from bench_stitching import make_case, tensor_runs

        from deepphase.physics.geometry import Geometry, output_mask
        from deepphase.physics.probe import reference_probe
        from deepphase.reconstruction.stitching import PairwiseStitcher, stitch

        n = 64 if self.args.quick else 256
        geometry = Geometry()
        mask = output_mask(reference_probe(), geometry)
        positions, patches, truth = make_case(n, geometry, mask, 0.05)
        template = PairwiseStitcher(positions, mask, geometry)

        def reused():
            stitcher = template.empty_copy()
            stitcher.add(patches)
            return stitcher.image()

        runs = {"pairwise": lambda: stitch(patches, positions, mask, geometry), "pairwise, geometry reused": reused,
                "seed": lambda: stitch(patches, positions, mask, geometry, method="seed")}
        # What reconstruct() does on a GPU: the patches stay there and are reduced with torch; the offsets'
        # solve and the blend stay on the host (they take only the reductions, ~0.12 kB a position).
        runs.update(tensor_runs(template, patches, self.device))
        rec.update(patches=n * n, clock="wall, best of 3", threads=torch.get_num_threads(), times_s={},
                   gpu_stitching="patch reductions by torch on the device (what reconstruct does on CUDA with the "
                                 "pairwise stitcher); offsets and blend on the host")
        for name, fn in runs.items():
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            rec["times_s"][name] = round(best, 4)
        rec["ratio_seed_over_pairwise"] = round(rec["times_s"]["seed"] / rec["times_s"]["pairwise"], 2)
        rec["ratio_seed_over_reused"] = round(rec["times_s"]["seed"] / rec["times_s"]["pairwise, geometry reused"], 2)
        log(f"  {rec['times_s']}, seed/pairwise {rec['ratio_seed_over_pairwise']}×")

    # -- f: training -------------------------------------------------------------------------------
    def training(self, rec, deadline):
        from deepphase.data.phase_objects import CORPUS_PRESETS, CorpusConfig
        from deepphase.data.stream import Batch, TrainingStream
        from deepphase.training.loop import TrainConfig, evaluate_loss, train
        from deepphase.physics.geometry import output_mask

        shipped = load_model("default")
        t = shipped.info["training"]
        corpus = CorpusConfig.from_dict(t["corpus"])
        assert corpus.mix == CORPUS_PRESETS["atoms"], "the shipped default's corpus is the 'atoms' preset"
        dose = tuple(t["dose"]) if isinstance(t["dose"], list) else t["dose"]
        mask = torch.as_tensor(output_mask(shipped.probe, shipped.geometry), device=self.device)
        # The shipped model's own validation set: loop.py draws it with fixed_set(seed, val_size) from a
        # generator on the training device, so the CPU one is the shipped model's; a CUDA generator
        # draws other samples (the loop's per-epoch validation on the GPU is that other set).
        t0 = time.perf_counter()
        cpu_stream = TrainingStream(shipped.probe, shipped.geometry, corpus, dose, "cpu")
        val_cpu = [Batch(b.amplitude.to(self.device), b.target.to(self.device), b.phase.to(self.device))
                   for b in cpu_stream.fixed_set(t["seed"], t["val_size"])]
        net = shipped.network.to(self.device)
        rec["shipped_val_loss_recorded"] = shipped.info["validation_loss"]
        rec["shipped_val_loss_on_its_set"] = evaluate_loss(net, val_cpu, mask)
        stream = TrainingStream(shipped.probe, shipped.geometry, corpus, dose, self.device)
        val_dev = stream.fixed_set(t["seed"], t["val_size"])
        rec["shipped_val_loss_on_device_set"] = evaluate_loss(net, val_dev, mask)
        net.cpu()
        rec["validation_sets_s"] = round(time.perf_counter() - t0, 1)
        log(f"  shipped default: {rec['shipped_val_loss_on_its_set']:.5f} rad on its own validation set "
            f"(recorded {rec['shipped_val_loss_recorded']:.5f}), {rec['shipped_val_loss_on_device_set']:.5f} on the "
            f"{self.device} set")
        # The stream alone and a training step alone: where a step's time goes.
        rec["stream_samples_per_second"] = {}
        sizes = [32, 256] if self.args.quick else [32, 256, 1024, 4096]
        gen = stream.generator(123, 0)
        for size in sizes:
            stream.batch(size, gen)
            self.sync()
            t0, count = time.perf_counter(), 0
            while time.perf_counter() - t0 < (0.3 if self.args.quick else 1.0) or count < 2:
                stream.batch(size, gen)
                count += 1
            self.sync()
            rec["stream_samples_per_second"][size] = round(count * size / (time.perf_counter() - t0))
        log(f"  stream alone, samples/s by batch: {rec['stream_samples_per_second']}")
        rec["step_breakdown_ms"] = self.step_breakdown(stream, mask, t, [32, 256] if not self.args.quick else [32])
        log(f"  one training step, ms (stream / network step / both, as the loop does them): {rec['step_breakdown_ms']}")
        runs = [("shipped recipe", t["batch_size"], None, t["epochs"], t["steps_per_epoch"])]
        if self.args.quick:
            runs = [("shipped recipe (quick: 2 epochs of 5 steps)", t["batch_size"], None, 2, 5),
                    ("batch 64, lr x sqrt(2) (quick)", 64, 2e-3 * math.sqrt(2), 2, 5)]
        else:
            big = self.args.train_batch
            runs.append((f"batch {big}, lr x sqrt({big // t['batch_size']})", big,
                         2e-3 * math.sqrt(big / t["batch_size"]), t["epochs"], t["steps_per_epoch"]))
        rec["runs"] = []
        best = None
        for i, (label, batch, lr, epochs, steps) in enumerate(runs):
            left = deadline - time.perf_counter()
            # The first run may use at most 60 % of what is left, so that the second gets a share.
            budget = left * (0.6 if i == 0 and len(runs) > 1 else 1.0) - 5
            run = {"label": label, "batch_size": batch, "lr": lr or 2e-3, "epochs": epochs, "steps_per_epoch": steps,
                   "budget_s": round(budget, 1), "epochs_log": []}
            rec["runs"].append(run)
            if budget < 10:
                run["status"] = "skipped: stage budget"
                continue
            folder = self.work / f"train{i}"
            config = TrainConfig(arch=t["arch"], epochs=epochs, steps_per_epoch=steps, batch_size=batch,
                                 preset=t["preset"], lr=lr, dose=dose, corpus=corpus, seed=t["seed"],
                                 val_size=t["val_size"], device=str(self.device), loss=t["loss"],
                                 sigma_head=t.get("sigma_head"))  # the shipped default's σ head too
            t_run = time.perf_counter()

            def hook(message, run=run, folder=folder, t_run=t_run, budget=budget):
                elapsed = time.perf_counter() - t_run
                entry = {"elapsed_s": round(elapsed, 1), "message": message}
                if (folder / "model.safetensors").exists():
                    model = load_model(folder, device=self.device)
                    entry["val_loss_shipped_set"] = evaluate_loss(model.network.to(self.device), val_cpu, mask)
                    if "reached_shipped_s" not in run and entry["val_loss_shipped_set"] <= rec["shipped_val_loss_on_its_set"]:
                        run["reached_shipped_s"] = entry["elapsed_s"]
                run["epochs_log"].append(entry)
                log(f"  [{label}] {message} | {elapsed:.1f} s | shipped-set val {entry.get('val_loss_shipped_set', float('nan')):.5f}")
                self.save()
                if elapsed > budget:
                    raise BudgetSpent(f"{label}: {elapsed:.0f} s > {budget:.0f} s")

            try:
                _, history = train(shipped.probe, folder, config, shipped.geometry, probe_info={"probe": {"source": "reference"}},
                                   command=f"benchmarks/gpu_session.py training run {i}: {label}", progress=False, log=hook)
                run["status"] = "ok: all epochs"
            except BudgetSpent as exc:
                run["status"] = f"stopped by its time budget ({exc})"
            except Exception as exc:
                run["status"] = f"failed: {_why(exc)}"
            run["wall_s"] = round(time.perf_counter() - t_run, 1)
            meta = folder / "model.json"
            if meta.exists():
                info = json.loads(meta.read_text())
                run["history"] = info["training"]["history"]
                done = info["training"]["steps"] * batch
                run["samples"] = done
                run["samples_per_second_overall"] = round(done / sum(h["seconds"] for h in run["history"]))
                final = run["epochs_log"][-1].get("val_loss_shipped_set") if run["epochs_log"] else None
                run["final_val_loss_shipped_set"] = final
                if final is not None and (best is None or final < best[0]):
                    best = (final, folder, i)
            log(f"  [{label}] {run['status']}, {run['wall_s']} s")
        if best is not None:
            dest = self.out / "model"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            for name in ("model.safetensors", "model.json", "probe.npy"):
                shutil.copy2(best[1] / name, dest / name)
            rec["model_copied"] = {"run": best[2], "folder": "model/", "val_loss_shipped_set": best[0]}

    def step_breakdown(self, stream, mask, t, sizes):
        """Milliseconds of the stream's batch, of a forward-backward-AdamW step on a fixed batch, and of both
        as the loop does them (the loop reads the loss with .item() every step: a synchronisation)."""
        from deepphase.models import create_model
        from deepphase.training.loss import masked_l1

        out = {}
        for size in sizes:
            net = create_model(t["arch"]).to(self.device).train()
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            gen = stream.generator(7, 0)
            fixed = stream.batch(size, gen)

            def step(batch):
                loss = masked_l1(net(batch.amplitude), batch.target, mask, True)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss

            def timed(fn, reps):
                fn()
                self.sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                self.sync()
                return round(1000 * (time.perf_counter() - t0) / reps, 2)

            reps = 3 if self.args.quick else 20
            out[size] = {"stream": timed(lambda: stream.batch(size, gen), reps),
                         "network_step_no_sync": timed(lambda: step(fixed), reps),
                         "stream_and_step_with_item": timed(lambda: step(stream.batch(size, gen)).item(), reps)}
        return out

    # -- g: summary --------------------------------------------------------------------------------
    def summary(self, rec, deadline):
        stages = self.results["stages"]
        net = stages.get("network", {})
        e2e = stages.get("end_to_end", {})
        tr = stages.get("training", {})
        best = (net.get("best") or {}).get("default")
        rec["network_default_best"] = best and {k: best[k] for k in ("batch", "precision", "engine", "patterns_per_second")}
        if best:
            rec["network_target_ratio"] = round(best["patterns_per_second"] / TARGETS["network_patterns_per_second"], 3)
        if e2e.get("best"):
            rec["scan"] = e2e.get("scan")
            rec["scan_best_s"] = e2e.get("best_with_file_read_s")
            if e2e.get("patterns") == 65536:
                rec["scan_256_target_ratio"] = round(e2e["best_with_file_read_s"] / TARGETS["scan_256_seconds"], 2)
        reached = [r.get("reached_shipped_s") for r in tr.get("runs", []) if r.get("reached_shipped_s") is not None]
        rec["training_reached_shipped_s"] = min(reached) if reached else None
        rec["note"] = ("figures on a CPU are a smoke test of the script, not results" if not self.cuda
                       else "GPU figures")
        log(json.dumps(rec, indent=1, default=_jsonable))


def make_input(batch: int, channels: int, device) -> torch.Tensor:
    """Square roots of Poisson counts (mean 130 per pixel), as the network sees real data; seeded."""
    g = torch.Generator(device=device).manual_seed(0)
    return torch.poisson(torch.full((batch, channels, 32, 32), 130.0, device=device), generator=g).sqrt()


def _why(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _trim_pstats(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(line.replace(str(Path(deepphase.__file__).parent.parent) + "/", "") for line in lines)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    return repr(value)


def log(message: str):
    print(message, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_session_out"), help="folder for the JSON and model")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a 1-2 minute smoke test on a CPU")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of the whole run (default 420 s; 150 s with --quick)")
    parser.add_argument("--seconds", type=float, default=None, help="timing per network variant (default 0.25 s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="network batch sizes (default 1024 8192 65536)")
    parser.add_argument("--train-batch", type=int, default=256, help="the larger training batch (lr scaled by sqrt)")
    parser.add_argument("--stages", nargs="+", default=None,
                        help="run only these stages (environment correctness network end_to_end stitching training)")
    args = parser.parse_args()
    args.budget_s = args.budget_s or (150.0 if args.quick else 420.0)
    args.seconds = args.seconds or (0.1 if args.quick else 0.25)
    session = Session(args)
    # Budgets (s) on a GPU, scaled to the run's budget out of 440: training takes what the others leave
    # (at least ~155 s of the default 420).
    plan = [("environment", session.environment, 15, False), ("correctness", session.correctness, 45, False),
            ("network", session.network, 150, False), ("end_to_end", session.end_to_end, 55, False),
            ("stitching", session.stitching, 10, False), ("training", session.training, None, False)]
    scale = args.budget_s / 440.0
    log(f"gpu_session: device {session.device}, run budget {args.budget_s:.0f} s, out {session.out}")
    try:
        for name, fn, budget, needs_cuda in plan:
            if args.stages and name not in args.stages:
                continue
            # The training stage takes whatever the earlier ones left.
            stage_budget = session.left() - 5 if name == "training" else budget * scale
            session.run_stage(name, fn, stage_budget, needs_cuda)
        session.run_stage("summary", session.summary, 30)
    finally:
        shutil.rmtree(session.work, ignore_errors=True)
        session.save()
    log(f"\ngpu_session: done in {time.perf_counter() - session.t_start:.0f} s; {session.out / 'gpu_session.json'}")


if __name__ == "__main__":
    main()
