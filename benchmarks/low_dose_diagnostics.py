"""Where a model's low-dose quality comes from (issue 4 item 2; RESULTS.md section 21). Prints tables.

Two questions, for any model folders or packaged names (NAME=PATH):

* ``training-loss``: is one model better than another on the training distribution itself? Masked,
  offset-free L1 (rad, as in training) on fresh samples of a corpus at fixed doses.
* ``low-pass``: is a gap on the harness a matter of spatial frequencies? Correlation with the truth of
  each model's image on the fast preset's cases after a Gaussian low-pass (normalised inside the
  evaluated region), at the doses given.

    python benchmarks/low_dose_diagnostics.py training-loss default=default seed-unet=seed-unet
    python benchmarks/low_dose_diagnostics.py low-pass default=default seed-unet=seed-unet --doses 30 300

Models of the experimental architectures load after ``import compact_variants`` (``--variants``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from deepphase.data.phase_objects import CORPUS_PRESETS, CorpusConfig
from deepphase.data.stream import TrainingStream
from deepphase.evaluation import harness, metrics
from deepphase.models.modelfile import load_model
from deepphase.physics.geometry import output_mask
from deepphase.training.loop import evaluate_loss


def training_loss(models: dict, doses, corpus: str = "atoms", samples: int = 2048, seed: int = 12345) -> dict:
    """{dose: {name: mean masked offset-free L1 (rad)}} on the same fresh samples for every model."""
    first = next(iter(models.values()))
    mask = torch.as_tensor(output_mask(first.probe, first.geometry))
    table = {}
    for dose in doses:
        stream = TrainingStream(first.probe, first.geometry, CorpusConfig(mix=dict(CORPUS_PRESETS[corpus])), dose)
        batches = stream.fixed_set(seed, samples)
        with torch.inference_mode():
            table[dose] = {name: evaluate_loss(model.network, batches, mask) for name, model in models.items()}
    return table


def _low_passed(image: np.ndarray, inside: np.ndarray, width: float) -> np.ndarray:
    if width == 0:
        return image
    weight = ndimage.gaussian_filter(inside.astype(float), width)
    blurred = ndimage.gaussian_filter(np.where(inside, image, 0.0), width) / np.maximum(weight, 1e-9)
    return np.where(inside, blurred, np.nan)


def low_pass(paths: dict, doses, widths=(0, 0.5, 1, 1.5, 2, 3)) -> dict:
    """{(case label, dose, name): [correlation after a Gaussian of each width (px)]} on the fast preset.

    ``paths``: {name: model folder or packaged name}, reconstructed as the harness does."""
    config = harness.resolve_preset("fast")
    probe = load_model(next(iter(paths.values()))).probe
    methods = {name: harness.network_method(path) for name, path in paths.items()}
    table = {}
    for case in harness.make_cases(config["specimens"], doses, probe, config["scan_shape"],
                                   forward=config["forward"]):
        results = {name: run(case, probe) for name, run in methods.items()}
        region, box, truth = harness.compared_region(case, [r.phase for r in results.values()], probe.shape[-1])
        inside = np.isfinite(truth)
        for name, result in results.items():
            image = np.where(region, result.phase, np.nan)[box]
            table[(case.label, case.dose, name)] = [metrics.correlation(_low_passed(image, inside, w), truth)
                                                    for w in widths]
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", choices=["training-loss", "low-pass"])
    parser.add_argument("models", nargs="+", metavar="NAME=PATH", help="model folders or packaged names")
    parser.add_argument("--doses", type=float, nargs="+", help="e/pattern (default: 30 300 3000 27882 for "
                                                               "training-loss, 30 300 for low-pass)")
    parser.add_argument("--variants", action="store_true", help="register benchmarks/compact_variants.py first")
    args = parser.parse_args(argv)
    if args.variants:
        sys.path.insert(0, str(Path(__file__).parent))
        import compact_variants  # noqa: F401  (registers the x-compact-* architectures)
    torch.set_num_threads(2)
    paths = {}
    for item in args.models:
        name, _, path = item.partition("=")
        paths[name] = path or name
    if args.question == "training-loss":
        models = {name: load_model(path) for name, path in paths.items()}
        doses = args.doses or [30, 300, 3000, 27882]
        table = training_loss(models, doses)
        print("masked offset-free L1 (rad), atoms corpus, 2,048 fresh samples per dose")
        print("| e/pattern | " + " | ".join(models) + " |\n|---|" + "---|" * len(models))
        for dose in doses:
            print(f"| {dose:,.0f} | " + " | ".join(f"{table[dose][n]:.4f}" for n in models) + " |")
    else:
        doses, widths = args.doses or [30, 300], (0, 0.5, 1, 1.5, 2, 3)
        table = low_pass(paths, doses, widths)
        print("correlation with the truth after a Gaussian low-pass of width (px): " + ", ".join(map(str, widths)))
        for key, values in table.items():
            print(f"{key[0]} | {key[1]:,.0f} | {key[2]} | " + " ".join(f"{v:.3f}" for v in values))
        for dose in doses:
            for name in paths:
                rows = [v for k, v in table.items() if k[1] == dose and k[2] == name]
                print(f"mean over cases | {dose:,.0f} | {name} | "
                      + " ".join(f"{np.mean([r[i] for r in rows]):.3f}" for i in range(len(widths))))


if __name__ == "__main__":
    main()
