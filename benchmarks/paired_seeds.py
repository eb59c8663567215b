"""Issue 4 item 2's paired tables from the stored figures files: networks of the same training seed compared.

Every row of the harness is one network (a method named ``KIND-sS``, training seed ``S``) on one case
(specimen, forward model, dose) of one harness seed (the simulated specimen and its counting noise). For
each dose this prints, for every kind against the seed U-Net (and against the package's compact network),
the difference of the mean correlation over the six cases, averaged over the harness seeds both networks
of a training seed were scored on, then its mean ± standard error over the training seeds and how many
are ahead (RESULTS.md sections 24 and 25). The harness is deterministic, so rows of separate runs pair up
as long as each run's methods are single-pattern networks (the compared region is where every method's
image is finite).

    python benchmarks/paired_seeds.py gate dw lpmix lpgatefeat
    python benchmarks/paired_seeds.py --seeds 0-5 gate dw --rows my-eval/results.json --per-case
    python benchmarks/paired_seeds.py wide --against unetwide unet gate    # sections 26-27

Kinds: ``unet`` (``seed-unet-sS``; ``seed-unet`` is seed 0), ``gate`` (``compact-linear-gate-sS``, the
package's compact network until section 26), ``gate1`` (``compact-pattern-gate-sS``), ``wide`` and
``unetwide`` (section 26: the compact network and the seed U-Net trained with lattice constants of
2.5-16 px), any other ``KIND-sS`` by its ``KIND``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

FIGURES = Path(__file__).parent / "figures"
# Where the seed U-Nets and the compact networks of training seeds 0-7 were scored (sections 20-27).
STORED = ["evaluate-fast-seed-unet-vs-compact-2026-11-30.json", "evaluate-fast-compact-vs-seed-unet-3-seeds-2026-11-30.json",
          "evaluate-fast-compact-variants-2026-11-30.json", "evaluate-fast-compact-linear-path-2026-12-01.json",
          "evaluate-fast-compact-linear-gate-2026-12-01.json", "evaluate-fast-item2-harness-seeds-2026-12-01.json",
          "evaluate-fast-compact-dw-lpmix-2026-12-01.json", "evaluate-fast-lattice-spacing-2026-12-06.json",
          "evaluate-fast-unet-wide-seeds-2026-12-06.json",
          "evaluate-fast-wide-seeds-4-5-2026-12-06.json",
          "evaluate-fast-lattice-spacing-log-uniform-2026-12-06.json",
          "evaluate-fast-lattice-spacing-24px-2026-12-06.json",
          "evaluate-fast-inverted-residual-2026-12-06.json",
          "evaluate-fast-inverted-residual-decoder-2026-12-06.json",
          "evaluate-fast-hybrid-2026-12-06.json", "evaluate-fast-twice-the-budget-2026-12-06.json"]
KINDS = {"seed-unet": "unet", "compact-linear-gate": "gate", "compact-pattern-gate": "gate1"}
HARNESS_SEEDS = range(3)


def kind_and_seed(method: str) -> tuple[str, int] | None:
    """(kind, training seed) of a method name, or None for methods that are not a seeded network."""
    if method == "seed-unet":
        return "unet", 0
    match = re.fullmatch(r"([a-z0-9-]+?)-s(\d+)", method)
    return (KINDS.get(match[1], match[1]), int(match[2])) if match else None


def load_scores(paths) -> dict:
    """{(kind, training seed, harness seed, specimen, forward, dose): correlation} from results files."""
    scores = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        harness_seed = report.get("settings", {}).get("seed") or 0
        for row in report["results"]:
            key = kind_and_seed(row["method"])
            if key is None:
                continue
            seed = row.get("seed")
            case = (*key, harness_seed if seed is None else seed, row["specimen"], row["forward"],
                    round(row["dose_e_per_pattern"]))
            if case in scores and abs(scores[case] - row["correlation"]) > 1e-6:
                raise SystemExit(f"{path}: {case} scored {row['correlation']} here and {scores[case]} before")
            scores.setdefault(case, row["correlation"])
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kinds", nargs="*", default=["gate"], help="kinds to compare with the seed U-Net")
    parser.add_argument("--seeds", default="0-9", help="training seeds, FIRST-LAST (default 0-9)")
    parser.add_argument("--rows", nargs="*", default=[], help="more results.json files (e.g. new runs)")
    parser.add_argument("--against", nargs="+", default=["unet", "gate"], metavar="KIND",
                        help="kinds each is compared with (default: unet gate); --per-case uses the first")
    parser.add_argument("--per-case", action="store_true", help="also each case's difference to the first --against")
    args = parser.parse_args(argv)
    first, last = map(int, args.seeds.split("-"))
    seeds = range(first, last + 1)
    scores = load_scores([FIGURES / name for name in STORED] + args.rows)
    cases = sorted({key[3:5] for key in scores})
    doses = sorted({key[5] for key in scores})

    def mean_over_cases(kind, seed, harness_seed, dose):
        values = [scores.get((kind, seed, harness_seed, *case, dose)) for case in cases]
        return None if None in values else float(np.mean(values))

    for dose in doses:
        print(f"--- {dose:,} e/pattern")
        for kind in args.kinds:
            for reference in [r for r in args.against if r != kind]:
                differences, used = [], []
                for seed in seeds:
                    pairs = [(mean_over_cases(kind, seed, h, dose), mean_over_cases(reference, seed, h, dose))
                             for h in HARNESS_SEEDS]
                    pairs = [(h, a - b) for h, (a, b) in zip(HARNESS_SEEDS, pairs) if a is not None and b is not None]
                    if pairs:
                        differences.append(np.mean([d for _, d in pairs]))
                        used.append(f"s{seed}:h{''.join(str(h) for h, _ in pairs)}")
                if not differences:
                    continue
                error = np.std(differences, ddof=1) / np.sqrt(len(differences)) if len(differences) > 1 else np.nan
                ahead = sum(d > 0 for d in differences)
                print(f"{kind} - {reference}: {np.mean(differences):+.4f} ± {error:.4f} ({ahead}/{len(differences)} "
                      f"ahead)  {' '.join(used)}")
            base = args.against[0]
            if args.per_case and kind != base:
                line = []
                for case in cases:
                    d = [scores[(kind, s, h, *case, dose)] - scores[(base, s, h, *case, dose)]
                         for s in seeds for h in HARNESS_SEEDS
                         if (kind, s, h, *case, dose) in scores and (base, s, h, *case, dose) in scores]
                    if d:
                        name = case[0] if case[1] in case[0] else f"{case[0]} ({case[1]})"
                        line.append(f"{name} {np.mean(d):+.4f}")
                print(f"  {kind} - {base} per case: " + "; ".join(line))


if __name__ == "__main__":
    main()
