"""The figure of docs/probe_aware.png: the packaged default against ``--model probe-aware`` across defocus.

Usage: python benchmarks/figure_probe_aware.py [--side 48] [--show 1.6] [--out docs/probe_aware.png]

Simulates SIDE×SIDE rasters of the built-in twisted hBN (step 0.87 px, 27,882 and 1,000 e/pattern, Poisson
counts) with the reference probe plus a defocus from −2.5 to +2.5 rad at the bright-field disk's edge, and
reconstructs each with the default and with the probe-aware model told what the probe check finds on the scan
(:func:`deepphase.data.aberrations.told_for_scan`, as ``deepphase reconstruct`` tells it). Left: the correlation
with the truth against the defocus; right: the truth and both images at SHOW rad, 27,882 e/pattern. Prints the
curve's figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=48, help="scan positions per side")
    parser.add_argument("--show", type=float, default=1.6, help="the defocus (rad at the edge) whose images are shown")
    parser.add_argument("--out", type=Path, default=Path("docs/probe_aware.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepphase.data.aberrations import add_aberrations, told_for_scan
    from deepphase.data.calibration import model_disk
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import twisted_hbn
    from deepphase.evaluation.metrics import correlation
    from deepphase.io_utils import save_png
    from deepphase.models.modelfile import load_model
    from deepphase.physics import raster_positions, reference_probe
    from deepphase.reconstruction.pipeline import reconstruct

    probe = reference_probe()
    radius2 = model_disk(probe)["radius"] ** 2
    positions = raster_positions((args.side, args.side), 0.87)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=1)
    default, aware = load_model("default"), load_model("probe-aware")
    edges = np.round(np.arange(-2.5, 2.51, 0.5), 2)
    if args.show not in edges:
        edges = np.sort(np.append(edges, args.show))
    curves, shown = {}, {}
    for dose in (27882.0, 1000.0):
        for edge in edges:
            a = edge / radius2
            amplitudes = simulate_scan(truth, add_aberrations(probe, (a, 0, a)), positions, dose=dose, seed=1,
                                       progress=False).amplitude
            told, _ = told_for_scan(aware, amplitudes, positions)
            for name, model in (("default", default), ("probe-aware, told", told)):
                rec = reconstruct(amplitudes, positions, model, progress=False, checks=False)
                r0, c0 = rec.origin_px
                window = truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]]
                curves.setdefault((name, dose), []).append(correlation(rec.phase, window))
                if dose == 27882.0 and edge == args.show:
                    shown[name], shown["truth"] = rec.phase, window
    for (name, dose), values in curves.items():
        print(f"{name}, {dose:,.0f} e/pattern: " + ", ".join(f"{e:+.1f}: {v:.3f}" for e, v in zip(edges, values)))

    fig = plt.figure(figsize=(11, 3.6))
    ax = fig.add_axes([0.06, 0.15, 0.3, 0.75])
    for (name, dose), values in curves.items():
        ax.plot(edges, values, "o-" if name == "default" else "s-", color="C0" if name == "default" else "C1",
                alpha=1.0 if dose > 10_000 else 0.5, label=f"{name}, {dose:,.0f} e")
    ax.axvspan(-2.0, 2.0, color="0.9", zorder=0)
    ax.set_xlabel("defocus against the model's probe (rad at the disk's edge)")
    ax.set_ylabel("correlation with the truth")
    ax.set_title("simulated twisted hBN (grey: the training range)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    for k, name in enumerate(("truth", "default", "probe-aware, told")):
        image = shown[name] - np.nanmean(shown[name])
        axk = fig.add_axes([0.42 + 0.19 * k, 0.1, 0.18, 0.8])
        axk.imshow(image, cmap="gray")
        axk.set_axis_off()
        title = name if name == "truth" else (f"{name}: {correlation(shown[name], shown['truth']):.3f}")
        axk.set_title(f"{title}\n(defocus {args.show:+.1f} rad)" if name != "truth" else title, fontsize=9)
    save_png(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
