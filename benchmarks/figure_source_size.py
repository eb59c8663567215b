"""The figure of docs/source_size.png: what a finite source does to the image, and what ``--source-size`` gives back.

Usage: python benchmarks/figure_source_size.py [--side 64] [--source 1.0] [--dose 27882] [--out docs/source_size.png]

Simulates a SIDE×SIDE raster of the built-in twisted hBN (step 0.87 px, Poisson counts) twice: with a coherent probe
and with a Gaussian source of σ = SOURCE real-space px (physics.instrument). Reconstructs each with the packaged
default, and the partially coherent one again with the source divided out (``reconstruct --source-size``). Shows the
truth, the truth seen through the source, and the three images, each with its correlation with the truth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64, help="scan positions per side")
    parser.add_argument("--source", type=float, default=1.0, help="σ of the source, real-space px")
    parser.add_argument("--dose", type=float, default=27882.0, help="electrons per pattern")
    parser.add_argument("--out", type=Path, default=Path("docs/source_size.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.ndimage import gaussian_filter

    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import twisted_hbn
    from deepphase.evaluation.metrics import correlation
    from deepphase.io_utils import atomic_path
    from deepphase.physics import raster_positions, reference_probe
    from deepphase.physics.instrument import FWHM_PER_SIGMA
    from deepphase.reconstruction.pipeline import reconstruct, with_source_divided_out

    probe = reference_probe()
    positions = raster_positions((args.side, args.side), 0.87, 0.0, "col")
    truth = twisted_hbn(required_object_shape(positions, 32), seed=2)
    images = {}
    for source in (0.0, args.source):
        scan = simulate_scan(truth, probe, positions, dose=args.dose, seed=0, progress=False, source_size_px=source)
        counts = np.square(scan.amplitude, dtype=np.float64).round().astype(np.float32)
        rec = reconstruct(np.sqrt(counts), positions, progress=False, checks=False)
        images["coherent probe" if source == 0 else f"source σ = {source:g} px"] = rec
    rec = images[f"source σ = {args.source:g} px"]
    images[f"σ = {args.source:g} px, --source-size {args.source:g}"] = with_source_divided_out(rec, args.source)
    r0, c0 = rec.origin_px
    window = (slice(r0, r0 + rec.phase.shape[0]), slice(c0, c0 + rec.phase.shape[1]))
    panels = {"truth": truth[window], "truth seen through the source": gaussian_filter(truth, args.source)[window]}
    panels.update({name: r.phase for name, r in images.items()})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), constrained_layout=True)
    for ax, (name, image) in zip(axes, panels.items()):
        shown = image - np.mean(image)
        limit = np.percentile(np.abs(shown), 99.5)
        ax.imshow(shown, cmap="gray", vmin=-limit, vmax=limit)
        score = "" if name == "truth" else f"\ncorrelation {correlation(image, truth[window]):.3f}"
        ax.set_title(name + score, fontsize=9)
        ax.axis("off")
    fwhm = args.source * FWHM_PER_SIGMA * 0.2
    fig.suptitle(f"twisted hBN, {args.dose:,.0f} e/pattern; a Gaussian source of σ = {args.source:g} px "
                 f"({fwhm:.2f} Å FWHM at 0.2 Å/px) and the packaged default", fontsize=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as path:
        fig.savefig(path, dpi=110, format="png")
    for name, image in panels.items():
        if name != "truth":
            print(f"{name}: correlation with the truth {correlation(image, truth[window]):.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
