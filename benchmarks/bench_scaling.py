"""Weak and strong scaling of DDP training and dask reconstruction on the processes at hand.

Usage: python benchmarks/bench_scaling.py [--procs 1 2] [--steps 60] [--patterns 8192]

Each process (training rank or dask worker) gets one thread (OMP_NUM_THREADS=1), so N processes use
N cores. Training: unet-small, per-rank simulation (``--rank-data per-rank``); strong scaling keeps
the global batch at 32, weak scaling gives every rank 16. Reconstruction: the packaged model on a
counts-like .npy scan; strong scaling keeps ``--patterns`` fixed, weak scaling gives every worker
``--patterns / max(procs)``. Prints samples (patterns) per second and the speed-up over one process.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def train_rate(nproc: int, batch: int, steps: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "deepphase.cli", "train", "--arch", "unet-small", "--epochs", "1",
           "--steps-per-epoch", str(steps), "--batch-size", str(batch), "--val-size", "32", "--device", "cpu",
           "--out", str(out)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--rank-data", "per-rank"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return float(re.findall(r"([\d.]+) samples/s", done.stdout + done.stderr)[-1])


def reconstruct_rate(workers: int, patterns: int, folder: Path) -> float:
    side = int(np.sqrt(patterns))
    data = folder / f"scan{side}.npy"
    if not data.exists():
        rng = np.random.default_rng(0)
        np.save(data, rng.poisson(130.0, size=(side * side, 32, 32)).astype(np.float32))
    out = folder / f"rec-{workers}-{side}"
    cmd = [sys.executable, "-m", "deepphase.cli", "reconstruct", str(data), "--scan-shape", str(side), str(side),
           "--step", "0.87", "--input", "counts", "--out", str(out), "--overwrite"]
    if workers > 1:
        cmd += ["--workers", str(workers), "--tile-size", "1024"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return side * side / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--patterns", type=int, default=8192)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; one thread per process")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("\n| training (unet-small) | processes | global batch | samples/s | speed-up |\n|---|---|---|---|---|")
        for kind in ("strong", "weak"):
            base = None
            for n in args.procs:
                batch = 32 if kind == "strong" else 16 * n
                rate = train_rate(n, batch, args.steps, tmp / f"train-{kind}-{n}")
                base = base or rate
                print(f"| {kind} | {n} | {batch} | {rate:,.0f} | {rate / base:.2f}× |")
        print("\n| reconstruction (packaged model) | workers | patterns | patterns/s (wall, incl. start-up) | speed-up |"
              "\n|---|---|---|---|---|")
        for kind in ("strong", "weak"):
            base = None
            for n in args.procs:
                patterns = args.patterns if kind == "strong" else args.patterns // max(args.procs) * n
                rate = reconstruct_rate(n, patterns, tmp)
                base = base or rate
                print(f"| {kind} | {n} | {int(np.sqrt(patterns)) ** 2:,} | {rate:,.0f} | {rate / base:.2f}× |")


if __name__ == "__main__":
    main()
