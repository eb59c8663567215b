"""Inference speed: patterns per second of every architecture, and a whole reconstruction from a file.

Usage: python benchmarks/bench_inference.py [--device cpu|cuda] [--scan 256] [--batch-sizes 64 256 1024]

Prints, per architecture and batch size: parameters, GFLOP per pattern, patterns per second, the
ratio to the seed's U-Net measured in the same run and the peak memory of a forward pass (on a GPU
``torch.cuda.max_memory_allocated``; on a CPU the growth of the resident set, VmHWM over VmRSS before
the pass, measured in a fresh process per architecture and batch so that no earlier run's freed memory
hides it; both count the activations and the output, not the input); then the wall time of
``deepphase reconstruct``'s pipeline (read .npy → predict → stitch → write) on a scan of SCAN×SCAN
patterns with the packaged model, and the peak resident memory.
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import deepphase
from deepphase.data.io import AmplitudeView, load_scan
from deepphase.models import count_parameters, create_model, flops_per_pattern, list_models
from deepphase.models.modelfile import load_model
from deepphase.physics import raster_positions
from deepphase.reconstruction.pipeline import reconstruct, write_outputs


@torch.inference_mode()
def patterns_per_second(net, batch: int, device, seconds: float = 3.0) -> float:
    x = torch.rand(batch, 1, 32, 32, device=device) * 10
    net(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        net(x)
        count += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - t0)


def _resident_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu_forward_peak(arch: str, batch: int) -> None:
    """(In the child process) print the resident-set growth of one forward pass, MB."""
    net = create_model(arch).eval()
    x = torch.rand(batch, 1, 32, 32) * 10
    with torch.inference_mode():
        net(x[:2])  # one-off allocations (thread pools, kernels) before the baseline
        before = _resident_kb("VmRSS")
        net(x)
    print((_resident_kb("VmHWM") - before) / 1024)


def forward_peak_mb(arch: str, batch: int, device: torch.device) -> float | None:
    """Peak memory of a forward pass of ``arch`` on ``batch`` patterns, MB (None where not measurable)."""
    if device.type == "cuda":
        net = create_model(arch).to(device).eval()
        x = torch.rand(batch, 1, 32, 32, device=device) * 10
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            net(x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not Path("/proc/self/status").exists():
        return None
    child = subprocess.run([sys.executable, __file__, "--cpu-forward-peak", arch, str(batch)], capture_output=True,
                           text=True, check=True)
    return float(child.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--cpu-forward-peak":
        return _cpu_forward_peak(sys.argv[2], int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scan", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"deepphase {deepphase.__version__}, torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}")
    print("\n| architecture | parameters | GFLOP/pattern | batch | patterns/s | ratio to seed-unet | forward peak MB |\n"
          "|---|---|---|---|---|---|---|")
    seed_rate = {}
    for arch in ["seed-unet"] + [a for a in list_models() if a != "seed-unet"]:
        net = create_model(arch).to(device).eval()
        params, gflop = count_parameters(net), flops_per_pattern(net) / 1e9
        for batch in args.batch_sizes:
            rate = patterns_per_second(net, batch, device)
            seed_rate.setdefault(batch, rate)
            peak = forward_peak_mb(arch, batch, device)
            peak_text = "n/a" if peak is None else f"{peak:,.0f}"
            print(f"| {arch} | {params:,} | {gflop:.3f} | {batch} | {rate:,.0f} | {rate / seed_rate[batch]:.2f}× "
                  f"| {peak_text} |", flush=True)

    n = args.scan
    positions = raster_positions((n, n), 0.87, fastest="row")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        # Counts-like data: the pipeline's cost does not depend on what the patterns show.
        data = rng.poisson(130.0, size=(n * n, 32, 32)).astype(np.float32)
        np.save(Path(tmp) / "scan.npy", data)
        del data
        model = load_model()
        t0 = time.perf_counter()
        scan = load_scan(Path(tmp) / "scan.npy")
        rec = reconstruct(AmplitudeView(scan.frames, "counts"), positions, model, device=args.device, progress=False,
                          batch_size=1024, checks=False)
        write_outputs(rec, Path(tmp) / "out", {"benchmark": True})
        total = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nreconstruct {n}×{n} = {n * n:,} patterns with the packaged model ({model.arch}): {total:.1f} s in all "
          f"(predict {rec.timings['predict_s']:.1f} s = {rec.timings['patterns_per_second']:,.0f} patterns/s, "
          f"stitch {rec.timings['stitch_s']:.2f} s; engine {rec.processing['engine']}); peak resident memory "
          f"{peak_mb:,.0f} MB")


if __name__ == "__main__":
    main()
