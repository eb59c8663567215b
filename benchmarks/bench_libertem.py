"""deepphase inside LiberTEM against the pipeline: wall time of a 256×256 scan, and the images' difference.

Usage: python benchmarks/bench_libertem.py [--scan 256x256] [--engines channels-last onnx] [--rounds 3]
       [--folder DIR] [--workers 2] [--partial-only]

The scan is bench_auto_engine.py's (one simulated twisted-hBN raster, 27,882 e/pattern, float32
amplitudes in FOLDER/scan-ROWSxCOLS.npy, frames with the scan row changing fastest; made once). Each
round runs, one after another in this process, for each engine:

* ``pipeline``: :func:`deepphase.reconstruction.pipeline.reconstruct` of the memory-mapped file;
* ``libertem inline``: :class:`~deepphase.reconstruction.libertem_udf.PhaseUDF` on LiberTEM's inline
  executor (this process, its partitions one after another);
* ``libertem dask``: the same UDF on LiberTEM's default executor, WORKERS local worker processes of one
  thread each (started once, outside the timing).

Each timing goes from the file on disk to the stitched image, cropped to the scanned area (model loaded
and network prepared before, once per executor). Prints the wall times, the ratio pipeline ÷ LiberTEM per round, and the largest
difference between the LiberTEM images and the pipeline's (rad). ``--partial-only`` prints instead what
one image costs while the scan runs (a live plot's update) at several fractions of the positions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_auto_engine import STEP, machine_line, scan_argument, scan_file  # noqa: E402  (the same scan file)


def partial_images(rows: int, cols: int) -> None:
    """Time of one image while the scan runs (what a live plot pays per update), at several fractions of the
    positions; random reductions (the time depends on the geometry only)."""
    from types import SimpleNamespace

    from deepphase.models.modelfile import load_model
    from deepphase.physics.scan import raster_positions
    from deepphase.reconstruction.libertem_udf import _scan, _stitch

    model = load_model()
    positions = raster_positions((rows, cols), STEP, 0.0, "col")
    t0 = time.perf_counter()
    scan = _scan(model, positions)
    print(f"the scan's stitcher (made once per process): {time.perf_counter() - t0:.3f} s")
    rng = np.random.default_rng(0)
    shape = (len(positions), len(scan.reducer.lags))
    sums_i, sums_j = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    binned = rng.normal(size=scan.shape)
    params = SimpleNamespace(deblur=True, remove_plane=True)
    _stitch(model, scan, positions, np.arange(len(positions)) < cols, sums_i, sums_j, binned, params, 3e4)  # warm
    for fraction in (0.0625, 0.25, 0.5, 0.5 + 0.5 / rows, 1.0):
        done = np.arange(len(positions)) < int(fraction * len(positions))
        t0 = time.perf_counter()
        _stitch(model, scan, positions, done, sums_i, sums_j, binned, params, 3e4)
        print(f"image of {done.sum():,} of {len(positions):,} positions: {time.perf_counter() - t0:.3f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="256x256", help="ROWSxCOLS crop of the 256×256 scan")
    parser.add_argument("--engines", nargs="+", default=["channels-last", "onnx"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="LiberTEM dask worker processes (one thread each)")
    parser.add_argument("--folder", type=Path, default=Path("bench_auto_engine_work"))
    parser.add_argument("--partial-only", action="store_true",
                        help="only time the image while the scan runs (no scan file needed)")
    args = parser.parse_args()
    rows, cols = scan_argument(args.scan)
    if args.partial_only:
        return partial_images(rows, cols)
    args.folder.mkdir(parents=True, exist_ok=True)
    path = scan_file(args.folder, rows, cols)

    import libertem.api as lt

    from deepphase.data.io import AmplitudeView
    from deepphase.physics.scan import raster_positions
    from deepphase.reconstruction.libertem_udf import PhaseUDF, to_reconstruction
    from deepphase.reconstruction.pipeline import reconstruct

    print(machine_line("libertem"))
    positions = raster_positions((rows, cols), STEP, 0.0, "row")
    n = len(positions)
    frames = np.load(path, mmap_mode="r")

    def pipeline(engine):
        rec = reconstruct(AmplitudeView(np.load(path, mmap_mode="r"), "amplitude"), positions, progress=False,
                          engine=engine, checks=False)
        return rec.phase, rec.origin_px

    def with_libertem(ctx, engine):
        ds = ctx.load("npy", path=str(path), nav_shape=(cols, rows), sig_shape=frames.shape[1:])
        udf = PhaseUDF(step_px=STEP, fastest="row", kind="amplitude", engine=engine)
        rec = to_reconstruction(udf, ctx.run_udf(dataset=ds, udf=udf))
        return rec.phase, rec.origin_px

    inline = lt.Context.make_with("inline")
    # LiberTEM's workers need the same thread limit as this process for a fair comparison: one each.
    dask = lt.Context.make_with("dask", cpus=args.workers)
    runs = {"pipeline": pipeline, "libertem inline": lambda e: with_libertem(inline, e),
            "libertem dask": lambda e: with_libertem(dask, e)}
    try:
        for engine in args.engines:  # warm: models loaded, networks prepared, exports made, workers started
            for run in runs.values():
                run(engine)
        times = {(name, e): [] for name in runs for e in args.engines}
        worst = {(name, e): 0.0 for name in runs for e in args.engines}
        for r in range(args.rounds):
            for engine in args.engines:
                reference = None
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    image, origin = run(engine)
                    times[name, engine].append(time.perf_counter() - t0)
                    if reference is None:
                        reference = image, origin
                    elif origin != reference[1] or image.shape != reference[0].shape:
                        raise SystemExit(f"{name}: image {image.shape} at {origin}, the pipeline's "
                                         f"{reference[0].shape} at {reference[1]}")
                    else:
                        worst[name, engine] = max(worst[name, engine],
                                                  float(np.nanmax(np.abs(image - reference[0]))))
                print(f"round {r + 1}, {engine}: " + ", ".join(f"{name} {times[name, engine][-1]:.2f} s"
                                                             for name in runs), flush=True)
    finally:
        dask.close()
    print(f"\n{rows}×{cols} scan ({n:,} patterns), {args.rounds} rounds; ratio = pipeline ÷ run, per round")
    print("| engine | run | wall (s) | patterns/s | ratio | max |Δ| against the pipeline (rad) |")
    print("|---|---|---|---|---|---|")
    for engine in args.engines:
        base = times["pipeline", engine]
        for name in runs:
            t = times[name, engine]
            ratio = ", ".join(f"{b / x:.2f}" for b, x in zip(base, t))
            diff = "—" if name == "pipeline" else f"{worst[name, engine]:.1e}"
            print(f"| {engine} | {name} | {', '.join(f'{x:.2f}' for x in t)} | {n / min(t):,.0f} | {ratio} | {diff} |")


if __name__ == "__main__":
    main()
