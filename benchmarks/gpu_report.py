"""Markdown tables for RESULTS.md from the JSON that benchmarks/gpu_session.py writes.

Usage: python benchmarks/gpu_report.py gpu_session.json [> section.md]

Prints: the machine, issue 4's targets (met or missed, and by how much), correctness of every engine ×
precision against float32 on the CPU, network throughput (patterns/s per engine), the end-to-end runs
and the CLI command, where the time goes if the scan target is missed, stitching, and training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _num(value, digits=0):
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def _sci(value):
    return "–" if value is None else f"{value:.1e}"


def _status(stage: dict) -> str:
    status = stage.get("status", "absent")
    return status if status == "ok" else f"**{status}**" + (f" ({stage['error']})" if stage.get("error") else "")


def targets(data: dict) -> list[str]:
    t = data["targets"]
    stages = data["stages"]
    rows = ["| issue 4 target | measured | ratio | verdict |", "|---|---|---|---|"]
    best = (stages.get("network", {}).get("best") or {}).get("default")
    if best:
        rate = best["patterns_per_second"]
        ratio = rate / t["network_patterns_per_second"]
        rows.append(f"| network ≥ {t['network_patterns_per_second']:,} patterns/s (default model) | {rate:,.0f} "
                    f"({best['engine']}, {best['precision']}, batch {best['batch']:,}) | {ratio:.2f}× of target | "
                    f"{'met' if ratio >= 1 else f'missed: {1 / ratio:.1f}× too slow'} |")
    else:
        rows.append("| network ≥ 1,000,000 patterns/s | not measured | | |")
    e2e = stages.get("end_to_end", {})
    if e2e.get("best_with_file_read_s") is not None:
        s = e2e["best_with_file_read_s"]
        ratio = s / t["scan_256_seconds"]
        full = e2e.get("patterns") == 65536
        verdict = ("met" if ratio < 1 else f"missed: {ratio:.1f}× the target") if full else "not the 256×256 scan"
        b = e2e["best"]
        rows.append(f"| {e2e.get('scan')} scan in < {t['scan_256_seconds']} s, stitching included (warm, in-process, "
                    f"+ np.load) | {s:.3f} s ({b['engine']}, {b['precision']}, batch {b['batch_size']:,}, chunk "
                    f"{b['chunk_size']:,}) | {ratio:.2f}× of target | {verdict} |")
    else:
        rows.append("| 256×256 scan in < 0.5 s | not measured | | |")
    tr = stages.get("training", {})
    reached = [r for r in tr.get("runs", []) if r.get("reached_shipped_s") is not None]
    if reached:
        r = min(reached, key=lambda r: r["reached_shipped_s"])
        ratio = r["reached_shipped_s"] / t["training_seconds"]
        rows.append(f"| default model to the shipped validation loss ({tr.get('shipped_val_loss_on_its_set', 0):.4f} rad "
                    f"on its own set) in < {t['training_seconds'] / 60:.0f} min | {r['reached_shipped_s']:.0f} s "
                    f"({r['label']}) | {ratio:.2f}× of target | {'met' if ratio < 1 else 'missed'} |")
    elif tr.get("runs"):
        finals = [r.get("final_val_loss_shipped_set") for r in tr["runs"] if r.get("final_val_loss_shipped_set")]
        rows.append(f"| default model to the shipped validation loss in < 10 min | not reached within the run's "
                    f"budget (best {min(finals):.4f} rad) | | not shown (budget) |" if finals else
                    "| default model to the shipped validation loss in < 10 min | no run finished an epoch | | |")
    return rows


def correctness(stage: dict) -> list[str]:
    rows = [f"{stage.get('patterns', '?')} patterns of a simulated scan (twisted hBN, 10⁵ e/pattern), packaged "
            f"default model; reference: {stage.get('reference')}. Status: {_status(stage)}.", "",
            "| engine | precision | max abs diff (rad) | mean abs diff (rad) | s |", "|---|---|---|---|---|"]
    for r in stage.get("rows", []):
        if r.get("status") == "ok":
            rows.append(f"| {r['engine']} | {r['precision']} | {_sci(r['max_abs_diff_rad'])} | "
                        f"{_sci(r['mean_abs_diff_rad'])} | {r['seconds']} |")
        else:
            rows.append(f"| {r['engine']} | {r['precision']} | {r.get('status')} | | |")
    for p in ("float32", "bfloat16"):
        key = f"image_max_abs_diff_rad_{p}"
        if key in stage:
            rows.append(f"\nWhole `reconstruct` on the device, {p}, eager: stitched image max abs diff "
                        f"{_sci(stage[key])} rad (means removed).")
    return rows


def network(stage: dict) -> list[str]:
    rows = [f"Status: {_status(stage)}. Clock: {stage.get('clock')}; ~{stage.get('timing_s')} s per variant after "
            "warm-up. " + (stage.get("note") or ""), "",
            "| model | arch | parameters | GFLOP/pattern |", "|---|---|---|---|"]
    for name, m in (stage.get("models") or {}).items():
        rows.append(f"| {name} | {m['arch']}{' (9 patterns in)' if m['in_channels'] > 1 else ''} | "
                    f"{m['parameters']:,} | {m['gflop_per_pattern']:.3f} |")
    engines = []
    for r in stage.get("rows", []):
        if r["engine"] not in engines:
            engines.append(r["engine"])
    table: dict = {}
    for r in stage.get("rows", []):
        key = (r["model"], r["batch"], r["precision"])
        cell = (f"{r['patterns_per_second']:,.0f}" if r.get("status") == "ok" else
                "OOM" if r.get("status") == "out of memory" else "–" if "skipped" in str(r.get("status")) else "failed")
        table.setdefault(key, {})[r["engine"]] = cell
        if r.get("status") == "ok" and r["engine"] == "eager":
            table[key]["_peak"] = r.get("peak_memory_mb")
    rows += ["", "Patterns per second ('–': skipped, by budget or device; peak memory of eager):", "",
             "| model | batch | precision | " + " | ".join(engines) + " | peak MB (eager) |",
             "|---|---|---|" + "---|" * len(engines) + "---|"]
    for (model, batch, precision), cells in table.items():
        rows.append(f"| {model} | {batch:,} | {precision} | " + " | ".join(cells.get(e, "–") for e in engines)
                    + f" | {_num(cells.get('_peak'))} |")
    failed = [r for r in stage.get("rows", []) if str(r.get("status", "")).startswith("failed")]
    for r in failed[:10]:
        rows.append(f"\n{r['model']} batch {r['batch']} {r['precision']} {r['engine']}: {r['status']}")
    compiles = [r for r in stage.get("rows", []) if r["engine"] == "compile" and r.get("status") == "ok"]
    if compiles:
        rows.append("\ntorch.compile one-off cost (s): " + ", ".join(
            f"{r['model']} {r['precision']} batch {r['batch']:,}: {r['one_off_s']}" for r in compiles))
    return rows


def end_to_end(stage: dict) -> list[str]:
    rows = [f"Scan {stage.get('scan')} ({_num(stage.get('patterns'))} patterns, {stage.get('file_mb')} MB float32 .npy; "
            f"simulated in {stage.get('simulate_s')} s; np.load {stage.get('np_load_s')} s). `reconstruct()` in-process "
            f"on an in-memory array, twice per setting. Status: {_status(stage)}.", "",
            "| engine | precision | batch | chunk | patches reduced on | cold s | warm s | predict s | stitch s | engine setup s | patterns/s (predict) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in stage.get("runs", []):
        if r.get("status") != "ok":
            rows.append(f"| {r.get('engine')} | {r.get('precision', '')} | {_num(r.get('batch_size'))} | "
                        f"{_num(r.get('chunk_size'))} | | {r.get('status')} | | | | | |")
            continue
        t = r["timings"]
        rows.append(f"| {r['engine_used']} | {r['precision']} | {r['batch_size']:,} | {r['chunk_size']:,} | "
                    f"{r.get('patches_reduced_on', '–')} | {r['cold_wall_s']} | **{r['warm_wall_s']}** | {t['predict_s']} | {t['stitch_s']} | "
                    f"{t['engine_setup_s']} | {t['patterns_per_second']:,.0f} |")
    cli = stage.get("cli")
    if cli and "command" not in cli:
        rows += ["", f"CLI: {cli.get('status')}"]
    elif cli:
        rows += ["", f"CLI: `{cli['command']}`: wall {cli['wall_s']} s (exit {cli['returncode']}), peak resident "
                     f"memory {_num(cli.get('peak_rss_mb'))} MB, engine {cli.get('engine')}; its own timings "
                     f"{json.dumps(cli.get('timings'))}."]
        if cli.get("stderr_tail"):
            rows += ["", "```", cli["stderr_tail"], "```"]
    prof = stage.get("profile")
    if prof:
        rows += ["", f"Where a warm run's time goes ({json.dumps(prof.get('of'))}; cProfile, by own time):", "", "```",
                 prof.get("cprofile_tottime_top20", ""), "```"]
        if prof.get("torch_profiler_by_cuda_time"):
            rows += ["", "torch.profiler, by device time:", "", "```", prof["torch_profiler_by_cuda_time"], "```"]
    return rows


def stitching(stage: dict) -> list[str]:
    rows = [f"{_num(stage.get('patches'))} known-offset patches (bench_stitching's case), {stage.get('clock')}, "
            f"{stage.get('threads')} torch threads on the host CPU. Status: {_status(stage)}.", "",
            "| stitcher | s |", "|---|---|"]
    for name, s in (stage.get("times_s") or {}).items():
        rows.append(f"| {name} | {s} |")
    if stage.get("ratio_seed_over_pairwise"):
        rows.append(f"\nseed / pairwise: **{stage['ratio_seed_over_pairwise']}×** (first call), "
                    f"{stage['ratio_seed_over_reused']}× with the geometry reused. GPU stitching: {stage.get('gpu_stitching')}")
    return rows


def training(stage: dict) -> list[str]:
    rows = [f"Status: {_status(stage)}. The shipped default: {stage.get('shipped_val_loss_on_its_set', float('nan')):.5f} "
            f"rad on its own validation set (recorded {stage.get('shipped_val_loss_recorded', float('nan')):.5f}), "
            f"{stage.get('shipped_val_loss_on_device_set', float('nan')):.5f} rad on the set the loop draws on this "
            "device (another generator, other samples).", "",
            "Training stream alone (simulation on the device), samples/s by batch: "
            + ", ".join(f"{k}: {v:,}" for k, v in (stage.get("stream_samples_per_second") or {}).items()), "",
            "One step, ms by batch (the stream's batch / forward-backward-AdamW on a fixed batch / both with the "
            "loop's .item()): " + "; ".join(f"{k}: {v['stream']} / {v['network_step_no_sync']} / "
                                             f"{v['stream_and_step_with_item']}"
                                             for k, v in (stage.get("step_breakdown_ms") or {}).items()), "",
            "| run | batch | lr | status | wall s | samples | samples/s | final val (shipped set) | reached shipped at |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in stage.get("runs", []):
        rows.append(f"| {r['label']} | {r['batch_size']} | {r['lr']:.2g} | {r.get('status')} | {_num(r.get('wall_s'), 1)} | "
                    f"{_num(r.get('samples'))} | {_num(r.get('samples_per_second_overall'))} | "
                    f"{_num(r.get('final_val_loss_shipped_set'), 4)} | "
                    f"{_num(r.get('reached_shipped_s'), 1) + ' s' if r.get('reached_shipped_s') is not None else 'no'} |")
    for r in stage.get("runs", []):
        if not r.get("epochs_log"):
            continue
        history = {h["epoch"]: h for h in r.get("history", [])}
        rows += ["", f"{r['label']}, per epoch:", "",
                 "| epoch | elapsed s | train loss | val (device set) | val (shipped set) | samples/s |",
                 "|---|---|---|---|---|---|"]
        for i, e in enumerate(r["epochs_log"], 1):
            h = history.get(i, {})
            rows.append(f"| {i} | {e['elapsed_s']} | {_num(h.get('train_loss'), 4)} | {_num(h.get('val_loss'), 4)} | "
                        f"{_num(e.get('val_loss_shipped_set'), 4)} | {_num(h.get('samples_per_second'))} |")
    return rows


def report(data: dict) -> str:
    env = data["stages"].get("environment", {})
    out = [f"Device {data.get('device')}: {env.get('gpu', 'no GPU')} ({env.get('gpu_memory_gib', '–')} GiB), "
           f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}), "
           f"{env.get('cpu_count')} CPUs; run started {data.get('started')}, {data.get('elapsed_s')} s in all"
           + (" (**--quick smoke test: not results**)" if data.get("quick") else "") + ".", ""]
    out += ["### Issue 4 targets", ""] + targets(data)
    sections = [("Correctness on the device", "correctness", correctness), ("Network throughput", "network", network),
                ("End to end", "end_to_end", end_to_end), ("Stitching", "stitching", stitching),
                ("Training", "training", training)]
    for title, key, fn in sections:
        stage = data["stages"].get(key)
        out += ["", f"### {title}", ""]
        if stage is None:
            out.append("not run")
        elif str(stage.get("status", "")).startswith("skipped"):
            out.append(stage["status"])
        else:
            out += fn(stage)
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="gpu_session.json")
    args = parser.parse_args()
    sys.stdout.write(report(json.loads(args.json.read_text())))


if __name__ == "__main__":
    main()
