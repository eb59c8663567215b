"""Single pattern against a 3×3 neighbourhood as input (issue 6, item 2): one JSON report and tables.

Reads two model folders trained with the same budget (``deepphase train ... [--neighbourhood 3]``) and
one or more harness reports that scored both (``deepphase evaluate --model single=... --model nbh=...``),
scores both on the same simulated samples at each dose (paired validation), times both networks'
prediction on the same scan, and writes the comparison::

    python benchmarks/neighbourhood_report.py --single SINGLE_MODEL --neighbourhood NBH_MODEL \\
        --eval EVAL_DIR [EVAL_DIR ...] --out benchmarks/figures/neighbourhood.json

The verdict per dose is the mean over every specimen × forward model (× evaluation seed) of the
correlation difference (neighbourhood − single); the winner is the one with the higher mean.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _training(folder: Path) -> dict:
    meta = json.loads((folder / "model.json").read_text())
    history = meta["training"]["history"]
    return {"folder": str(folder), "command": meta["training"]["command"], "in_channels":
            meta["arch_config"].get("in_channels", 1), "neighbourhood": meta.get("neighbourhood"),
            "validation_loss_rad": meta["validation_loss"], "history": history,
            "train_seconds": round(sum(h["seconds"] for h in history), 1),
            "samples": meta["training"]["steps"] * meta["training"]["batch_size"]}


def _cost(folder: Path, scan_side: int = 64, repeats: int = 3) -> dict:
    """Parameters, FLOPs per position and CPU prediction speed (best of ``repeats``, same scan for both)."""
    import torch

    from deepphase.models import count_parameters, flops_per_pattern
    from deepphase.models.modelfile import load_model
    from deepphase.physics.scan import REFERENCE_STEP_PX, raster_positions
    from deepphase.reconstruction.predict import predict_patches

    model = load_model(folder)
    positions = raster_positions((scan_side, scan_side), REFERENCE_STEP_PX)
    amplitudes = np.sqrt(np.random.default_rng(0).poisson(20.0, (len(positions), 32, 32))).astype(np.float32)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict_patches(model, amplitudes, neighbours=positions, progress=False, precision="float32")
        best = min(best, time.perf_counter() - t0)
    return {"parameters": count_parameters(model.network), "flops_per_position": flops_per_pattern(model.network),
            "predict_patterns_per_second_cpu": round(len(positions) / best, 1), "torch_threads": torch.get_num_threads()}


def _paired_validation(single_folder: Path, nbh_folder: Path, doses, size: int = 512, seed: int = 12345) -> list[dict]:
    """Masked L1 (rad) of both models on the same simulated samples at each dose.

    The neighbourhood stream's centre channel is exactly the single-pattern simulation of the centre
    window (tests/test_neighbourhood.py), so the single-pattern model sees channel 4 of the very samples
    whose 9 channels the neighbourhood model sees. Corpus: the default mix, as both were trained on.
    """
    import torch

    from deepphase.data.phase_objects import CorpusConfig
    from deepphase.data.stream import TrainingStream
    from deepphase.models.modelfile import load_model
    from deepphase.physics.geometry import output_mask
    from deepphase.training.loss import masked_l1

    single, nbh = load_model(single_folder), load_model(nbh_folder)
    mask = torch.as_tensor(output_mask(nbh.probe, nbh.geometry))
    centre = nbh.in_channels // 2
    out = []
    for dose in doses:
        stream = TrainingStream(nbh.probe, nbh.geometry, CorpusConfig(), float(dose),
                                neighbourhood=int(round(nbh.in_channels ** 0.5)), step_px=nbh.neighbourhood["step_px"])
        losses = {"single": 0.0, "neighbourhood": 0.0}
        with torch.no_grad():
            for batch in stream.fixed_set(seed, size, batch_size=128):
                k = len(batch.amplitude)
                losses["single"] += masked_l1(single.network(batch.amplitude[:, centre : centre + 1]), batch.target,
                                              mask).item() * k
                losses["neighbourhood"] += masked_l1(nbh.network(batch.amplitude), batch.target, mask).item() * k
        out.append({"dose_e_per_pattern": float(dose), "samples": size,
                    **{f"{name}_l1_rad": value / size for name, value in losses.items()}})
    return out


def _rows(eval_dirs, single: str, nbh: str) -> list[dict]:
    out = []
    for folder in eval_dirs:
        report = json.loads((Path(folder) / "results.json").read_text())
        seed = report["settings"]["seed"]
        by_key = {}
        for row in report["results"]:
            key = (row["specimen"], row["forward"], row["dose_e_per_pattern"])
            by_key.setdefault(key, {})[row["method"]] = row
        for (specimen, forward, dose), methods in by_key.items():
            if single in methods and nbh in methods:
                a, b = methods[single], methods[nbh]
                out.append({"seed": seed, "specimen": specimen, "forward": forward, "dose_e_per_pattern": dose,
                            "single": a["correlation"], "neighbourhood": b["correlation"],
                            "difference": b["correlation"] - a["correlation"],
                            "single_ssim": a.get("ssim"), "neighbourhood_ssim": b.get("ssim"),
                            "single_seconds": a["seconds"], "neighbourhood_seconds": b["seconds"]})
    return out


def _verdict(rows) -> list[dict]:
    verdict = []
    for dose in sorted({r["dose_e_per_pattern"] for r in rows}):
        d = np.array([r["difference"] for r in rows if r["dose_e_per_pattern"] == dose])
        mean, sem = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        verdict.append({"dose_e_per_pattern": dose, "cases": len(d), "mean_difference": mean,
                        "standard_error": sem, "neighbourhood_wins": int((d > 0).sum()),
                        "min_difference": float(d.min()), "max_difference": float(d.max()),
                        "winner": "neighbourhood" if mean > 0 else "single"})
    return verdict


def markdown(rows, verdict) -> str:
    lines = ["| seed | specimen | forward | e/pattern | single | 3×3 neighbourhood | difference |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['specimen']} | {r['forward']} | {r['dose_e_per_pattern']:,.0f} | "
                     f"{r['single']:.3f} | {r['neighbourhood']:.3f} | {r['difference']:+.3f} |")
    lines += ["", "| e/pattern | cases | mean difference (± s.e.) | neighbourhood better in | range | keep |",
              "|---|---|---|---|---|---|"]
    for v in verdict:
        lines.append(f"| {v['dose_e_per_pattern']:,.0f} | {v['cases']} | {v['mean_difference']:+.3f} "
                     f"(± {v['standard_error']:.3f}) | {v['neighbourhood_wins']} of {v['cases']} | "
                     f"{v['min_difference']:+.3f} … {v['max_difference']:+.3f} | {v['winner']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=Path, required=True, help="single-pattern model folder")
    parser.add_argument("--neighbourhood", type=Path, required=True, help="3×3 neighbourhood model folder")
    parser.add_argument("--eval", nargs="+", required=True, help="harness report folders that scored both")
    parser.add_argument("--names", nargs=2, default=("single", "nbh"), help="their method names in the reports")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = _rows(args.eval, *args.names)
    if not rows:
        raise SystemExit(f"no case scored by both {args.names[0]!r} and {args.names[1]!r} in {args.eval}")
    verdict = _verdict(rows)
    report = {"training": {"single": _training(args.single), "neighbourhood": _training(args.neighbourhood)},
              "cost": {"single": _cost(args.single), "neighbourhood": _cost(args.neighbourhood)},
              "evaluations": [str(e) for e in args.eval],
              "evaluation_settings": json.loads((Path(args.eval[0]) / "results.json").read_text())["settings"],
              "paired_validation": _paired_validation(args.single, args.neighbourhood,
                                                      sorted({r["dose_e_per_pattern"] for r in rows})),
              "correlation": rows, "verdict_per_dose": verdict}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for name in ("single", "neighbourhood"):
        t, c = report["training"][name], report["cost"][name]
        print(f"{name}: validation {t['validation_loss_rad']:.4f} rad, training {t['train_seconds']:.0f} s, "
              f"{c['flops_per_position'] / 1e6:.2f} MFLOP/position, {c['parameters']:,} parameters, "
              f"{c['predict_patterns_per_second_cpu']:.0f} positions/s")
    print("| e/pattern | single L1 (rad) | neighbourhood L1 (rad) | ratio |\n|---|---|---|---|")
    for v in report["paired_validation"]:
        print(f"| {v['dose_e_per_pattern']:,.0f} | {v['single_l1_rad']:.4f} | {v['neighbourhood_l1_rad']:.4f} | "
              f"{v['neighbourhood_l1_rad'] / v['single_l1_rad']:.2f} |")
    print(markdown(rows, verdict))


if __name__ == "__main__":
    main()
