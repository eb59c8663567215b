"""ONNX Runtime on a CPU: a batch cut into one slice per core against one call with intra-op threads, end to end.

Usage: python benchmarks/bench_onnx_slices.py [--scan 256x256] [--rounds 3] [--batch-size 512] [--folder DIR]

The scan is bench_auto_engine.py's (simulated twisted hBN, step 0.87 px, 27,882 e/pattern, float32
amplitudes in FOLDER/scan-ROWSxCOLS.npy; made once). Each round reconstructs it in this process with
``engine="onnx"`` twice: as the package runs it (each batch cut into ``torch.get_num_threads()`` slices, run
at once by one-thread session calls) and with one session call per batch whose intra-op threads split every
layer (the engine until session 25; ``engines._slice_pool`` patched to give no pool). The export is made
once, before the rounds. Prints the wall times, the prediction times the pipeline records, their ratio
(intra-op ÷ sliced, per round) and the largest difference between the two images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_auto_engine import STEP, machine_line, scan_argument, scan_file  # noqa: E402  (the same scan file)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="256x256", help="ROWSxCOLS crop of the 256×256 scan")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--folder", type=Path, default=Path("bench_auto_engine_work"))
    args = parser.parse_args()
    rows, cols = scan_argument(args.scan)
    args.folder.mkdir(parents=True, exist_ok=True)
    path = scan_file(args.folder, rows, cols)

    from deepphase.data.io import AmplitudeView
    from deepphase.physics.scan import raster_positions
    from deepphase.reconstruction import engines
    from deepphase.reconstruction.pipeline import reconstruct

    print(machine_line("onnxruntime"))
    positions = raster_positions((rows, cols), STEP, 0.0, "row")
    sliced_pool = engines._slice_pool

    def run(variant: str):
        engines._slice_pool = sliced_pool if variant == "sliced" else (lambda workers: None)
        t0 = time.perf_counter()
        rec = reconstruct(AmplitudeView(np.load(path, mmap_mode="r"), "amplitude"), positions, progress=False,
                          engine="onnx", batch_size=args.batch_size, checks=False)
        return time.perf_counter() - t0, rec

    run("sliced"), run("intra-op")  # the export made and kept; both variants warm
    walls, predicts, worst = {"sliced": [], "intra-op": []}, {"sliced": [], "intra-op": []}, 0.0
    for r in range(args.rounds):
        images = {}
        for variant in ("intra-op", "sliced"):
            wall, rec = run(variant)
            walls[variant].append(wall)
            predicts[variant].append(rec.timings["predict_s"])
            images[variant] = rec.phase
        worst = max(worst, float(np.nanmax(np.abs(images["sliced"] - images["intra-op"]))))
        print(f"round {r + 1}: intra-op {walls['intra-op'][-1]:.2f} s, sliced {walls['sliced'][-1]:.2f} s", flush=True)
    engines._slice_pool = sliced_pool
    print(f"\n{rows}×{cols} scan ({len(positions):,} patterns), batch {args.batch_size}, {args.rounds} rounds")
    print("| onnx engine | wall (s) | predict_s | ratio intra-op ÷ sliced (wall), per round |")
    print("|---|---|---|---|")
    ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(walls["intra-op"], walls["sliced"]))
    for variant in ("intra-op", "sliced"):
        print(f"| {variant} | {', '.join(f'{x:.2f}' for x in walls[variant])} | "
              f"{', '.join(f'{x:.2f}' for x in predicts[variant])} | {ratios if variant == 'sliced' else '1'} |")
    print(f"largest difference between the images: {worst:.1e} rad")


if __name__ == "__main__":
    main()
