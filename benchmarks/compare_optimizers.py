"""The seed's optimiser (SGD, lr 1e-4) against ours (AdamW, cosine) after the same number of steps.

Usage: python benchmarks/compare_optimizers.py [--arch unet-small] [--steps 2000] [--batch-size 16]
Prints the validation loss (mean absolute phase error in the mask, rad) of each, on the same
validation set and the same training batches.
"""

import argparse
import platform
import tempfile
import time

import torch

import deepphase
from deepphase.physics import reference_probe
from deepphase.training.loop import TrainConfig, train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="unet-small")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    print(f"deepphase {deepphase.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    for preset in ("seed", "default"):
        config = TrainConfig(arch=args.arch, epochs=2, steps_per_epoch=args.steps // 2, batch_size=args.batch_size,
                             preset=preset, val_size=512, device="cpu", seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            _, history = train(reference_probe(), tmp, config, progress=False, log=lambda *_: None)
            rows.append((preset, config.optimizer_settings(), history[-1]["val_loss"], time.perf_counter() - t0))
    print(f"\n{args.arch}, {args.steps} steps of batch {args.batch_size}, dose 27,882 e/pattern")
    print("| preset | optimiser | lr | validation loss (rad) | time (s) |\n|---|---|---|---|---|")
    for preset, settings, val, seconds in rows:
        print(f"| {preset} | {settings['optimizer']} ({settings['schedule']}) | {settings['lr']:g} | {val:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
