"""The figure of docs/libertem-live.png: the phase image as LiberTEM delivers partitions of a scan.

Usage: python benchmarks/figure_libertem_live.py [--side 96] [--partitions 4] [--out docs/libertem-live.png]

Simulates a SIDE×SIDE raster of the built-in twisted hBN (step 0.87 px, the reference probe at its own dose,
27,882 e/pattern, Poisson counts), runs :class:`~deepphase.reconstruction.libertem_udf.PhaseUDF` with the σ
head on LiberTEM's inline executor with ``ctx.run_udf_iter`` and draws the phase after each partition, then
the σ map of the whole scan. Prints the correlation of the final image with the truth and each step's
number of patterns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=96, help="scan positions per side")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("docs/libertem-live.png"))
    args = parser.parse_args()

    import libertem.api as lt
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.evaluation.metrics import correlation
    from deepphase.io_utils import atomic_path
    from deepphase.physics import reference_probe
    from deepphase.physics.scan import REFERENCE_STEP_PX, raster_positions
    from deepphase.reconstruction.libertem_udf import PhaseUDF, to_reconstruction

    nav = (args.side, args.side)
    positions = raster_positions(nav, REFERENCE_STEP_PX, 0.0, "col")
    truth = builtin_specimen("twisted-hbn", required_object_shape(positions, 32), seed=0)
    scan = simulate_scan(truth, reference_probe(), positions, seed=0, progress=True)
    counts = np.square(scan.amplitude).round().astype(np.float32).reshape(*nav, 32, 32)

    ctx = lt.Context.make_with("inline")
    ds = ctx.load("memory", data=counts, sig_dims=2, num_partitions=args.partitions)
    udf = PhaseUDF(step_px=REFERENCE_STEP_PX, uncertainty="head")
    steps = []
    for part in ctx.run_udf_iter(dataset=ds, udf=udf):
        buffers = part.buffers[0]
        steps.append((int(buffers["patterns"].data[0]), np.array(buffers["phase"].data)))
        print(f"{steps[-1][0]:,} of {counts.shape[0] * counts.shape[1]:,} patterns")
    rec = to_reconstruction(udf, buffers)
    r0, c0 = rec.origin_px
    corr = correlation(rec.phase, truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]])
    print(f"final image {rec.phase.shape[0]}×{rec.phase.shape[1]}, correlation with the truth {corr:.3f}")

    final = steps[-1][1]
    lo, hi = np.nanpercentile(final, [1, 99])
    fig, axes = plt.subplots(1, len(steps) + 1, figsize=(3.0 * (len(steps) + 1), 3.3), constrained_layout=True)
    for ax, (done, image) in zip(axes, steps):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"{done:,} patterns", fontsize=10)
    shown = axes[-1].imshow(np.asarray(buffers["uncertainty"].data), cmap="magma")
    axes[-1].set_title("σ (rad), σ head", fontsize=10)
    fig.colorbar(shown, ax=axes[-1], shrink=0.8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"PhaseUDF in LiberTEM: the phase while a {args.side}×{args.side} scan arrives "
                 f"(twisted hBN, 27,882 e/pattern; final correlation {corr:.3f})", fontsize=11)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out, ".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
