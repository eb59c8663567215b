"""Inference engines on the CPU: eager, channels_last, torch.compile, TorchScript, ONNX Runtime.

Usage: python benchmarks/bench_engines.py [--models default unet-small seed] [--batch-sizes 256 1024]
       [--repeats 5] [--seconds 1.0] [--engines eager channels-last compile torchscript onnx bf16]
       [--thread-counts 2 1]

For each packaged model (by name, as ``load_model`` takes it) and batch size, every engine runs the
same input (square roots of Poisson counts, seeded) and its output is compared with the eager float32
output (max abs difference, radians). Then the engines are timed interleaved: in each of ``--repeats``
rounds every engine runs for about ``--seconds`` in turn, so that a change of machine load hits all of
them alike. The table gives the median patterns per second over the rounds, the median of the per-round
ratio to eager, the max abs difference and the one-off cost (compile / trace / export + session).
The load average (/proc/loadavg) is printed before and after each block.

Engines:
  eager          the model as shipped, float32, under torch.inference_mode (the baseline)
  folded         batch norms folded into the convolutions before them (engines.fold_batch_norm)
  channels-last  weights and input in torch.channels_last memory format
  channels-last+folded  both: what reconstruct's "channels-last" engine runs
  compile        torch.compile(model) (default mode; a new batch shape recompiles)
  torchscript    torch.jit.trace + torch.jit.freeze
  onnx           the package's "onnx" engine (engines.prepare_network): its export (the TorchScript exporter),
                 each batch cut into as many slices as threads, each run at once by a one-thread session
  onnx-intra-op  the package's export run as one call per batch with intra_op threads = the thread count
                 (the "onnx" engine until session 25)
  onnx-torch.export  as onnx-intra-op, with torch's torch.export-based exporter (the package's fallback)
  bf16           eager under torch.autocast("cpu", bfloat16): information only, its rounding is far
                 above the 1e-4 rad tolerance
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import deepphase
from deepphase.models.modelfile import load_model
from deepphase.reconstruction.engines import EXPORTERS, _export_onnx, fold_batch_norm, prepare_network

ENGINES = ("eager", "folded", "channels-last", "channels-last+folded", "compile", "torchscript", "onnx",
           "onnx-intra-op", "onnx-torch.export", "bf16")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def make_input(batch: int, channels: int = 1, n_px: int = 32, seed: int = 0) -> torch.Tensor:
    """Square roots of Poisson counts (mean 130 per pixel), as the network sees real data; ``channels``
    patterns per position for a neighbourhood model."""
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.full((batch, channels, n_px, n_px), 130.0), generator=g).sqrt()


def build(engine: str, net: torch.nn.Module, example: torch.Tensor, threads: int):
    """(callable x -> y as a float32 CPU tensor, one-off seconds, note)."""
    t0 = time.perf_counter()
    note = ""
    if engine == "eager":
        fn = net
    elif engine == "folded":
        fn = fold_batch_norm(net)
    elif engine in ("channels-last", "channels-last+folded"):
        cl = (fold_batch_norm(net) if engine.endswith("folded") else net).to(memory_format=torch.channels_last)
        fn = lambda x: cl(x.contiguous(memory_format=torch.channels_last))  # noqa: E731
    elif engine == "compile":
        compiled = torch.compile(net)
        fn = compiled
        with torch.inference_mode():
            fn(example)  # the compile happens here; counted as one-off cost
    elif engine == "torchscript":
        with torch.inference_mode():
            traced = torch.jit.trace(net, example, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
        fn = frozen
        with torch.inference_mode():
            fn(example)
            fn(example)  # the profiling executor optimises on the second call
    elif engine == "onnx":  # the package's engine, a fresh export (no cache): its one-off cost counted
        import onnxruntime as ort

        before = os.environ.get("DEEPPHASE_CACHE_DIR")
        os.environ["DEEPPHASE_CACHE_DIR"] = "off"
        try:
            fn = prepare_network(net, "onnx", "cpu", threads=threads)
            with torch.inference_mode():
                fn(example)
        finally:
            if before is None:
                del os.environ["DEEPPHASE_CACHE_DIR"]
            else:
                os.environ["DEEPPHASE_CACHE_DIR"] = before
        note = f"{EXPORTERS[0]} exporter, {threads} slices, ort {ort.__version__}"
    elif engine in ("onnx-intra-op", "onnx-torch.export"):
        exporter = "torch.export" if engine == "onnx-torch.export" else EXPORTERS[0]
        import onnxruntime as ort

        model_bytes = _export_onnx(net, example, exporter=exporter)  # the package's own export
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])

        def fn(x):
            return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])

        fn(example)
        note = f"{exporter} exporter, ort {ort.__version__}"
    elif engine == "bf16":
        def fn(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net(x).float()
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return fn, time.perf_counter() - t0, note


@torch.inference_mode()
def run_for(fn, x: torch.Tensor, seconds: float) -> float:
    """Patterns per second over at least one call and about ``seconds``."""
    count, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        count += len(x)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return count / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default", "unet-small", "seed"],
                        help="packaged model names (default = compact)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--extra-batch-seed", type=int, nargs="*", default=[64],
                        help="extra batch sizes for the seed U-Net only")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per engine per round")
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch / onnxruntime intra-op threads; several (e.g. 2 1) interleave every engine at "
                             "each count, ratios to eager at the first count")
    args = parser.parse_args()
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "absent"
    print(f"deepphase {deepphase.__version__}, torch {torch.__version__}, onnxruntime {ort_version}, "
          f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"thread counts {args.thread_counts}")
    print(f"load average at start: {loadavg()}")
    baseline = ("eager", args.thread_counts[0])
    rows = []
    for name in args.models:
        model = load_model(name)
        net = model.network.eval()
        batches = list(args.batch_sizes)
        if model.arch == "seed-unet":
            batches = sorted(set(batches) | set(args.extra_batch_seed))
        for batch in batches:
            x = make_input(batch, model.in_channels, model.geometry.n_px)
            torch.set_num_threads(args.thread_counts[0])
            with torch.inference_mode():
                reference = net(x).clone()
            torch._dynamo.reset()  # a fresh compile per batch size: its cost is measured
            fns, ok = {}, []
            for threads in args.thread_counts:
                torch.set_num_threads(threads)
                for engine in args.engines:
                    key = (engine, threads)
                    # Every engine gets its own copy of the weights (channels_last converts in place).
                    fresh = load_model(name).network.eval()
                    try:
                        fn, setup_s, note = build(engine, fresh, x, threads)
                        with torch.inference_mode():
                            diff = float((fn(x).float() - reference).abs().max())
                    except Exception as exc:  # a failing engine is a result, not a crash
                        msg = str(exc).strip()
                        line = f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"[:200]
                        rows.append(dict(model=name, arch=model.arch, batch=batch, engine=engine, threads=threads,
                                         error=line))
                        print(f"  {name} batch {batch} {engine} ({threads} threads): FAILED {line}")
                        continue
                    fns[key] = fn
                    ok.append(dict(model=name, arch=model.arch, batch=batch, engine=engine, threads=threads,
                                   setup_s=setup_s, diff=diff, note=note, rates=[], ratios=[]))
            load_before = loadavg()
            for _ in range(args.repeats):
                round_rates = {}
                for row in ok:  # interleaved: every variant once per round, in the same order
                    key = (row["engine"], row["threads"])
                    torch.set_num_threads(row["threads"])
                    round_rates[key] = run_for(fns[key], x, args.seconds)
                    row["rates"].append(round_rates[key])
                for row in ok:
                    if baseline in round_rates:
                        row["ratios"].append(round_rates[(row["engine"], row["threads"])] / round_rates[baseline])
            load_after = loadavg()
            for row in ok:
                row["load"] = f"{load_before} → {load_after}"
            rows.extend(ok)
            summary = ", ".join(f"{r['engine']}/{r['threads']}t {statistics.median(r['rates']):,.0f}" for r in ok)
            print(f"  {name} ({model.arch}) batch {batch}: {summary} (load {load_before} → {load_after})",
                  flush=True)
            del fns
    print(f"load average at end: {loadavg()}")
    print(f"\n{args.repeats} interleaved rounds of ~{args.seconds:g} s per engine; medians over the rounds; "
          f"ratios to eager with {baseline[1]} threads, per round.\n")
    print("| model (arch) | batch | engine | threads | patterns/s | ratio to eager | min–max ratio "
          "| max abs diff (rad) | one-off s | load avg (1, 5, 15 min) before → after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        label = f"{r['model']} ({r['arch']})"
        if "error" in r:
            print(f"| {label} | {r['batch']} | {r['engine']} | {r['threads']} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{statistics.median(r['ratios']):.2f}×" if r["ratios"] else "n/a"
        spread = f"{min(r['ratios']):.2f}–{max(r['ratios']):.2f}" if r["ratios"] else ""
        print(f"| {label} | {r['batch']} | {r['engine']} | {r['threads']} | {statistics.median(r['rates']):,.0f} "
              f"| {ratio} | {spread} | {r['diff']:.1e} | {r['setup_s']:.1f} | {r['load']} |")


if __name__ == "__main__":
    main()
