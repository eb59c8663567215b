"""Where ONNX Runtime pays for its export: ``deepphase reconstruct`` end to end on a CPU, by scan size and engine.

Usage: python benchmarks/bench_auto_engine.py [--scans 64x64 128x128 128x256 256x256] [--rounds 3]
       [--kept] [--folder DIR]

Simulates one twisted-hBN scan (256×256 positions, step 0.87 px, the reference probe at its own dose,
27,882 e/pattern; float32 amplitudes in FOLDER/scan-256x256.npy, made once) and crops the smaller scans
from it. Each round runs the whole command, a fresh process from the file to phase.npy, once per engine
in turn, so that a change of machine load hits all of them alike:

* ``channels-last``: what ``--engine auto`` runs below its ONNX threshold;
* ``onnx``: ONNX Runtime with a fresh export every run (``DEEPPHASE_CACHE_DIR=off``);
* with ``--kept``, ``auto`` with the export kept in FOLDER/cache (primed by one ``--engine onnx`` run): what
  every run after the first gets.

Prints the wall time of each run, the per-round ratio channels-last ÷ engine (above 1: faster than
channels-last) and the engine each run recorded in metadata.json.
``deepphase.reconstruction.engines.ONNX_AUTO_MIN_PATTERNS`` comes from this table (RESULTS §31).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import deepphase
from deepphase.data.simulate import required_object_shape, simulate_scan
from deepphase.data.specimens import twisted_hbn
from deepphase.physics.probe import reference_probe
from deepphase.physics.scan import raster_positions

STEP = 0.87
FULL = (256, 256)


def machine_line(*modules: str) -> str:
    """deepphase's, torch's and ``modules``' versions, the machine and its load: the first line of a benchmark."""
    import importlib

    import torch

    versions = ", ".join(f"{name} {importlib.import_module(name).__version__}" for name in ("torch", *modules))
    return (f"deepphase {deepphase.__version__}, {versions}, python {platform.python_version()}, "
            f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
            f"load average {os.getloadavg()[0]:.1f}")


def scan_argument(text: str) -> tuple[int, int]:
    """``ROWSxCOLS``, a crop of the full scan."""
    try:
        rows, cols = (int(k) for k in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--scan(s): expected ROWSxCOLS such as 128x256, got {text!r}") from None
    if not (0 < rows <= FULL[0] and 0 < cols <= FULL[1]):
        raise SystemExit(f"--scan(s): {text} is not a crop of the {FULL[0]}×{FULL[1]} scan")
    return rows, cols


def scan_file(folder: Path, rows: int, cols: int) -> Path:
    """The (rows·cols, 32, 32) amplitudes of a rows×cols crop of the full scan, frames in the CLI's default
    order (the scan row changes fastest)."""
    path = folder / f"scan-{rows}x{cols}.npy"
    if path.exists():
        return path
    full = folder / f"scan-{FULL[0]}x{FULL[1]}.npy"
    if not full.exists():
        folder.mkdir(parents=True, exist_ok=True)
        positions = raster_positions(FULL, STEP)
        truth = twisted_hbn(required_object_shape(positions, 32), seed=0)
        scan = simulate_scan(truth, reference_probe(), positions, seed=0, progress=True)
        np.save(full, scan.amplitude.astype(np.float32))
    if (rows, cols) == FULL:
        return full
    frames = np.load(full, mmap_mode="r")
    by_column = frames.reshape(FULL[1], FULL[0], *frames.shape[1:])  # [scan col, scan row]: rows change fastest
    np.save(path, np.ascontiguousarray(by_column[:cols, :rows]).reshape(rows * cols, *frames.shape[1:]))
    return path


def reconstruct(path: Path, rows: int, cols: int, engine: str, out: Path, cache: str) -> dict:
    """One ``deepphase reconstruct`` in a fresh process: its wall time and the engine it recorded."""
    cmd = [sys.executable, "-m", "deepphase.cli", "reconstruct", str(path), "--scan-shape", str(rows), str(cols),
           "--step", str(STEP), "--input", "amplitude", "--engine", engine, "--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DEEPPHASE_CACHE_DIR": cache})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    metadata = json.loads((out / "metadata.json").read_text())
    return {"wall_s": wall, "engine": metadata["processing"]["engine"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", nargs="+", default=["64x64", "128x128", "128x256", "256x256"],
                        help="ROWSxCOLS crops of the 256×256 scan")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kept", action="store_true", help="also auto with the export kept in the cache")
    parser.add_argument("--folder", type=Path, default=Path("bench_auto_engine_work"),
                        help="where the scans, outputs and the kept export go")
    args = parser.parse_args()
    scans = [scan_argument(spec) for spec in args.scans]
    args.folder.mkdir(parents=True, exist_ok=True)
    print(machine_line("onnxruntime"))
    cache = args.folder / "cache"
    engines = {"channels-last": "off", "onnx": "off"}
    if args.kept:
        engines["auto"] = str(cache)
        first = scan_file(args.folder, *scans[0])
        reconstruct(first, *scans[0], "onnx", args.folder / "out-prime", str(cache))  # the export, kept
    results = {}
    for r in range(args.rounds):
        for rows, cols in scans:
            path = scan_file(args.folder, rows, cols)
            for engine, cache_setting in engines.items():
                run = reconstruct(path, rows, cols, engine, args.folder / f"out-{rows}x{cols}-{engine}", cache_setting)
                results.setdefault((rows, cols, engine), []).append(run)
                print(f"round {r + 1}, {rows}×{cols}, {engine}: {run['wall_s']:.2f} s ({run['engine']})", flush=True)
    others = [e for e in engines if e != "channels-last"]
    print("\n| scan (patterns) | " + " | ".join(f"{e}, wall s" for e in engines) + " | "
          + " | ".join(f"channels-last ÷ {e}, per round" for e in others) + " | engine recorded |")
    print("|---" * (1 + len(engines) + len(others) + 1) + "|")
    for rows, cols in scans:
        walls = {e: [run["wall_s"] for run in results[(rows, cols, e)]] for e in engines}
        ratios = {e: [c / w for c, w in zip(walls["channels-last"], walls[e])] for e in others}
        recorded = sorted({run["engine"] for e in engines for run in results[(rows, cols, e)]})
        print(f"| {rows}×{cols} ({rows * cols:,}) | "
              + " | ".join(", ".join(f"{w:.2f}" for w in walls[e]) for e in engines) + " | "
              + " | ".join(", ".join(f"{q:.2f}" for q in ratios[e]) for e in others) + " | "
              + "; ".join(map(str, recorded)) + " |")


if __name__ == "__main__":
    main()
