"""Speed and accuracy of the stitchers on exact patches with unknown offsets and noise.

Usage: python benchmarks/bench_stitching.py [--sizes 64 256] [--repeat 3] [--noise 0.05] [--clock cpu]
       [--stages] [--torch-device cuda]

For an n×n raster at the reference step, the patches are cut from a known smooth object (σ = 2 px
gaussian-filtered noise, 1 rad standard deviation) by the physical definition, their masked mean is
removed, a random constant (σ = 3 rad) is added to each and Gaussian noise on every pixel. Prints the
best time of each stitcher over ``--repeat`` runs, its RMSE against the truth after removing the
mean difference and its correlation, and the speed ratios, all from the same run.

"pairwise" is a first call (``stitch``: neighbour graph, reductions, offsets, blend). "pairwise, geometry
reused" is the same stitching from ``PairwiseStitcher.empty_copy()`` of a stitcher made once for the
scan's positions (untimed), as a session that reconstructs many scans of one geometry would do.
``--stages`` adds where the first call's time goes. ``--torch-device D`` adds the path the pipeline takes
on a GPU: the patches as a torch tensor on D (put there untimed, as the network leaves them), reduced there,
and for comparison the same patches first copied to the host (timed: the copy is what the path saves).
"""

import argparse
import os
import platform
import time

import numpy as np
import scipy
from scipy.ndimage import gaussian_filter

import deepphase
from deepphase.evaluation.metrics import correlation, offset_rmse
from deepphase.physics.geometry import Geometry, output_mask
from deepphase.physics.probe import reference_probe
from deepphase.physics.scan import REFERENCE_STEP_PX, raster_positions
from deepphase.reconstruction.stitching import PairwiseStitcher, _check_inputs, canvas_shape, stitch


def make_case(n, geometry, mask, noise, seed=0):
    """Positions, noisy patches with unknown offsets (float32, like the network's) and the truth."""
    rng = np.random.default_rng(seed)
    positions = raster_positions((n, n), REFERENCE_STEP_PX)
    rows, cols = (s // geometry.upsample for s in canvas_shape(positions, geometry))
    truth = gaussian_filter(rng.normal(size=(rows, cols)), 2.0)
    truth /= truth.std()
    centres = geometry.crop_start + (np.arange(geometry.output_px) + 0.5) / geometry.upsample
    r = np.floor(positions[:, 0, None] + centres).astype(np.int64)
    c = np.floor(positions[:, 1, None] + centres).astype(np.int64)
    patches = truth.astype(np.float32)[r[:, :, None], c[:, None, :]]
    patches -= patches[:, mask].mean(axis=1)[:, None, None]
    patches += rng.normal(scale=3.0, size=(n * n, 1, 1)).astype(np.float32)
    patches += rng.normal(scale=noise, size=patches.shape).astype(np.float32)
    return positions, patches, truth


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="raster sides")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per stitcher; the best is shown")
    parser.add_argument("--noise", type=float, default=0.05, help="noise per upsampled patch pixel, rad")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or the process's CPU time (steadier on a shared machine; run with "
                             "OMP_NUM_THREADS=1 so that both stitchers use one core)")
    parser.add_argument("--stages", action="store_true", help="also time the stages of the pairwise stitcher")
    parser.add_argument("--torch-device", default=None,
                        help="also time patches held as a torch tensor on this device (cpu, cuda), reduced there")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"deepphase {deepphase.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}")
    geometry = Geometry()
    mask = output_mask(reference_probe(), geometry)
    print(f"step {REFERENCE_STEP_PX:.5f} px, reference probe mask ({int(mask.sum())} output pixels), "
          f"offsets σ = 3 rad, noise σ = {args.noise} rad, best of {args.repeat}")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"clock: {args.clock}")
    print("| patches | raster | method | time (s) | RMSE (rad) | correlation |\n|---|---|---|---|---|---|")
    stages = {}
    for n in args.sizes:
        positions, patches, truth = make_case(n, geometry, mask, args.noise)
        template = PairwiseStitcher(positions, mask, geometry)

        def reused():
            stitcher = template.empty_copy()
            stitcher.add(patches)
            return stitcher.image()

        runs = {"pairwise": lambda: stitch(patches, positions, mask, geometry),
                "pairwise, geometry reused": reused,
                "least-squares": lambda: stitch(patches, positions, mask, geometry, method="least-squares"),
                "seed": lambda: stitch(patches, positions, mask, geometry, method="seed")}
        if args.torch_device:
            runs.update(tensor_runs(template, patches, args.torch_device))
        times = {}
        for method, run in runs.items():
            best = np.inf
            for _ in range(args.repeat):
                t0 = clock()
                image = run()
                best = min(best, clock() - t0)
            times[method] = best
            reference = truth[: image.shape[0], : image.shape[1]]
            print(f"| {n * n:,} | {n}×{n} | {method} | {best:.3f} | {offset_rmse(image, reference):.4f} | "
                  f"{correlation(image, reference):.5f} |")
        for ours in [m for m in times if m != "seed"]:
            print(f"| {n * n:,} | {n}×{n} | speed ratio seed / {ours} | {times['seed'] / times[ours]:.2f}× | | |")
        if args.stages:
            stages[n] = time_stages(patches, positions, mask, geometry, clock, args.repeat)
    for n, best in stages.items():
        print(f"pairwise stages at {n * n:,} patches (best of {args.repeat}, s): "
              + ", ".join(f"{name} {t:.4f}" for name, t in best.items()))


def tensor_runs(template, patches, device):
    """Stitching of patches that lie on ``device`` as a torch tensor: reduced there, or copied to the host."""
    import torch

    on_device = torch.from_numpy(patches).to(device)

    def reduced_there():
        stitcher = template.empty_copy()
        stitcher.add(on_device)
        return stitcher.image()  # the reductions came back with .cpu(): the device's work is done

    def copied_to_host():
        stitcher = template.empty_copy()
        stitcher.add(on_device.cpu().numpy())
        return stitcher.image()

    runs = {f"pairwise, geometry reused, reduced by torch on {device}": reduced_there}
    if torch.device(device).type != "cpu":
        runs[f"pairwise, geometry reused, patches copied from {device} to the host"] = copied_to_host
    return runs


def time_stages(patches, positions, mask, geometry, clock, repeat):
    """Best time of each stage of a first call of the pairwise stitcher (what ``stitch`` does, step by step)."""
    best = {}
    for _ in range(repeat):
        t0 = clock()
        patches_, positions_, mask_ = _check_inputs(patches, positions, mask, geometry, check_finite=False)
        stitcher = PairwiseStitcher(positions_, mask_, geometry)
        t1 = clock()
        reduced = stitcher.reducer.reduce(patches_, stitcher.origins)
        stitcher.add_reductions(reduced, 0)
        t2 = clock()
        stitcher._equations()
        t3 = clock()
        offsets = stitcher.offsets()
        t4 = clock()
        stitcher.image()
        t5 = clock()
        solve = t4 - t3
        # image() solves again before it blends; the solve is counted once, as stitch() does it once
        times = {"checks and neighbour graph": t1 - t0, "reductions": t2 - t1, "offset equations (setup)": t3 - t2,
                 "offset solve": solve, "blend": t5 - t4 - solve, "total": t5 - t0 - solve}
        del offsets
        best = {k: min(v, best.get(k, np.inf)) for k, v in times.items()}
    return best


if __name__ == "__main__":
    main()
