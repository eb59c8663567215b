"""The figure of docs/probe_check.png: what ``deepphase reconstruct``'s probe check saw on a defocused scan.

Usage: python benchmarks/figure_probe_check.py [--side 64] [--edge 1.1] [--out docs/probe_check.png]

Simulates a SIDE×SIDE raster of the built-in twisted hBN (step 0.87 px, 27,882 e/pattern, Poisson counts) with
the reference probe plus a defocus of EDGE rad at the bright-field disk's edge, saves it as a (rows, cols, 32,
32) .npy and runs ``deepphase reconstruct`` with the packaged default on it in a temporary folder (with
``--energy 300 --semi-angle 25``, so that the note gives the defocus in Å too). Prints the note's figures and
the correlation with the truth, and copies the command's probe_check.png to OUT.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64, help="scan positions per side")
    parser.add_argument("--edge", type=float, default=1.1, help="defocus added, as rad at the disk's edge")
    parser.add_argument("--out", type=Path, default=Path("docs/probe_check.png"))
    args = parser.parse_args()

    from deepphase.cli import main as cli
    from deepphase.data.aberrations import add_aberrations
    from deepphase.data.calibration import model_disk
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import twisted_hbn
    from deepphase.evaluation.metrics import correlation
    from deepphase.physics import raster_positions, reference_probe

    probe = reference_probe()
    a = args.edge / model_disk(probe)["radius"] ** 2
    positions = raster_positions((args.side, args.side), 0.87, 0.0, "col")
    truth = twisted_hbn(required_object_shape(positions, 32), seed=2)
    scan = simulate_scan(truth, add_aberrations(probe, (a, 0.0, a)), positions, dose=27882, seed=0, progress=False)
    counts = np.square(scan.amplitude, dtype=np.float64).round()  # whole numbers: read as counts
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "scan.npy"
        np.save(data, counts.astype(np.float32).reshape(args.side, args.side, 32, 32))
        out = Path(folder) / "result"
        cli(["reconstruct", str(data), "--step", "0.87", "--energy", "300", "--semi-angle", "25", "--out", str(out)])
        check = json.loads((out / "metadata.json").read_text())["probe_check"]
        phase = np.load(out / "phase.npy")
        r0, c0 = json.loads((out / "metadata.json").read_text())["origin_px"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "probe_check.png", args.out)
    print(f"put in: defocus {args.edge:+.2f} rad at the edge (a = {a:.4f} rad/px²); found {check['edge_phase_rad']:.2f} "
          f"± {check['uncertainty_rad']:.2f} rad (coefficients {np.round(check['coefficients'], 4).tolist()}), "
          f"{check['wall_s']:.2f} s; correlation of the default's image with the truth "
          f"{correlation(phase, truth[r0 : r0 + phase.shape[0], c0 : c0 + phase.shape[1]]):.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
