"""Peak memory and throughput of `deepphase reconstruct` on detector files larger than the chunk.

Usage: python benchmarks/bench_out_of_core.py --sides 256 512 [--detector 128] [--folder /tmp/ooc]

For each scan side S, writes (once) an S×S scan of DET×DET uint16 detector patterns as a .npy file:
the twisted-hBN specimen simulated on the model's 32×32 grid (noise-free), each pattern magnified
(DET − 16) // 32 times onto the detector with the disk off centre (a different camera length, so that
calibration has work to do), then Poisson counts. Then runs `deepphase reconstruct FILE --step 0.87`
in a subprocess, polling /proc every 0.1 s, and prints wall time, patterns per second, peak resident
memory (VmHWM: includes the file's pages mapped by NumPy's memmap, which the kernel can drop at any
time) and peak anonymous memory (RssAnon: the process's own arrays — the figure that must stay
bounded), and the correlation with the truth.
"""

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


def write_scan(path: Path, side: int, detector: int, seed: int = 0) -> np.ndarray:
    """Write the scan (rows, cols, det, det) uint16 to ``path`` chunk by chunk; return the truth."""
    probe = reference_probe()
    positions = raster_positions((side, side), STEP, fastest="col")  # frame [i, j] is at (i, j)·step
    truth = twisted_hbn(required_object_shape(positions, 32), seed=seed)
    if path.exists():
        return truth
    zoom = max(2, (detector - 16) // 32)  # 128 → 3×: the disk (radius 7.6 px on the model grid) becomes ~23 px
    size = 32 * zoom
    offset = ((detector - size) // 2 + 3, (detector - size) // 2 - 2)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(side, side, detector, detector))
    for row in range(side):  # one scan row at a time: bounded memory here too
        sl = slice(row * side, (row + 1) * side)
        amp = simulate_scan(truth, probe, positions[sl], noise=False, progress=False).amplitude
        fine = np.repeat(np.repeat(amp.astype(np.float64) ** 2 / zoom**2, zoom, axis=1), zoom, axis=2)
        block = np.zeros((side, detector, detector), dtype=np.uint16)
        block[:, offset[0] : offset[0] + size, offset[1] : offset[1] + size] = rng.poisson(fine)
        out[row] = block
        if row % 32 == 0:
            print(f"  writing {path.name}: row {row}/{side}", file=sys.stderr, flush=True)
    out.flush()
    del out
    os.replace(tmp, path)
    return truth


def run(cmd: list[str]) -> dict:
    """Run ``cmd``; return its wall time and peak VmHWM / RssAnon (bytes) polled from /proc."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = peak_hwm = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except FileNotFoundError:
            break
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        kb = lambda k: int(fields.get(k, "0 kB").split()[0]) * 1024  # noqa: E731
        peak_anon, peak_hwm = max(peak_anon, kb("RssAnon")), max(peak_hwm, kb("VmHWM"))
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_anon": peak_anon, "peak_hwm": peak_hwm, "stdout": out}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 512], help="scan sides")
    parser.add_argument("--detector", type=int, default=128, help="detector side in pixels")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/deepphase-ooc"), help="where the files go")
    parser.add_argument("--chunk-size", type=int, default=16384)
    parser.add_argument("--write-only", action="store_true", help="only write the files")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    print(f"deepphase {deepphase.__version__}, numpy {np.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| scan | file (GB) | wall (s) | patterns/s | peak anonymous memory (GB) | peak resident incl. mapped file (GB) "
          "| correlation |\n|---|---|---|---|---|---|---|")
    for side in args.sides:
        path = args.folder / f"scan-{side}-{args.detector}.npy"
        truth = write_scan(path, side, args.detector)
        if args.write_only:
            continue
        out = args.folder / f"rec-{side}"
        cmd = [sys.executable, "-m", "deepphase.cli", "reconstruct", str(path), "--step", str(STEP), "--out", str(out),
               "--overwrite", "--chunk-size", str(args.chunk_size)]
        result = run(cmd)
        meta = json.loads((out / "metadata.json").read_text())
        phase = np.load(out / "phase.npy")
        r0, c0 = meta["origin_px"]
        crop = truth[r0 : r0 + phase.shape[0], c0 : c0 + phase.shape[1]]
        corr = np.corrcoef(phase.ravel(), crop.ravel())[0, 1]
        n = side * side
        print(f"| {side}×{side} ({n:,}) | {path.stat().st_size / 1e9:.2f} | {result['wall_s']:.1f} | "
              f"{n / result['wall_s']:,.0f} | {result['peak_anon'] / 1e9:.2f} | {result['peak_hwm'] / 1e9:.2f} | "
              f"{corr:.3f} |", flush=True)
        print(f"  timings: {meta['timings']}; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
