"""The ``deepphase`` command line: thin wrappers around the Python API.

Every user error is a :class:`~deepphase.errors.DeepPhaseError`; it is printed as one line and the
command exits with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import os
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import __version__
import numpy as np

from .errors import DeepPhaseError
from .wording import speaking_to_the_command_line


def _number(kind=float, minimum=None, above=False, what="a number"):
    """An argparse type: a finite number of ``kind`` (≥ or > ``minimum``); argparse prints the option, the value
    and what was expected, and exits with 2 before any work is done."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not np.isfinite(value) or (minimum is not None and (value <= minimum if above else value < minimum)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_finite = _number(what="a finite number")
_positive = _number(minimum=0, above=True, what="a positive number")
_non_negative = _number(minimum=0, what="a number ≥ 0")
_count = _number(int, minimum=1, what="a positive whole number")


def _add_probe_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("probe (a file, 'reference', or optics parameters)")
    g.add_argument("--probe", default="reference",
                   help="complex probe as .npy, or 'reference' (the PRL 130, 016101 probe; default)")
    g.add_argument("--energy", type=_positive, help="beam energy in keV (builds a probe from optics instead of --probe)")
    g.add_argument("--semi-angle", type=_positive, help="convergence semi-angle in mrad")
    g.add_argument("--defocus", type=_finite, default=0.0, help="defocus in Å, positive = underfocus (default 0)")
    g.add_argument("--cs", type=_finite, default=0.0, help="spherical aberration C30 in Å (default 0)")
    g.add_argument("--sampling", type=_positive, help="real-space pixel size in Å (with --energy; with a probe "
                                                        "file, that probe's: train's model and simulate's .npz "
                                                        "record it)")
    g.add_argument("--grid", type=_count, default=32, help="probe and pattern grid in pixels (default 32)")


class _ArchitectureNames:
    """The registered architectures, looked up only when argparse checks or lists them (with an explicit
    metavar, building the parser does neither): every command and --help then starts without importing torch."""

    def __contains__(self, name) -> bool:
        from .models import list_models

        return name in list_models()

    def __iter__(self):
        from .models import list_models

        return iter(list_models())


#: A --cs below this (Å) is noted: too small to matter, so likely meant in mm or µm (the physics audit, s40).
CS_NOTE_ANGSTROM = 100.0


def _probe_from_args(args) -> tuple:
    """The probe the options give and what to record of it (with a probe file, ``--sampling`` is its pixel size:
    a model records it, and is then refused on data of another; a simulated scan's file records it)."""
    from .physics.probe import ProbeParameters, load_probe, probe_from_parameters

    if args.energy is not None or args.semi_angle is not None:
        missing = [name for name, v in (("--energy", args.energy), ("--semi-angle", args.semi_angle),
                                        ("--sampling", args.sampling)) if v is None]
        if missing:
            raise DeepPhaseError(f"probe: building a probe from optics needs {', '.join(missing)} as well")
        if 0 < abs(args.cs) < CS_NOTE_ANGSTROM:  # (taken as Å, which the help says; a value in mm or µm is likely)
            from .wording import note_to_caller

            note_to_caller(f"cs: {args.cs:g} Å is a spherical aberration too small to matter (an uncorrected lens has "
                           f"~1 mm = 10⁷ Å, a corrected one ~1 µm = 10⁴ Å); --cs takes Å: {args.cs:g} mm is --cs "
                           f"{args.cs * 1e7:g}")
        params = ProbeParameters(args.energy, args.semi_angle, args.defocus, args.cs, args.grid, args.sampling)
        info = {"probe": {"source": "parameters", **params.__dict__}, "sampling": args.sampling,
                "energy": args.energy, "semiangle_cutoff": args.semi_angle}
        return probe_from_parameters(params), info
    ignored = [name for name, given in (("--defocus", args.defocus != 0.0), ("--cs", args.cs != 0.0),
                                        ("--grid", args.grid != 32)) if given]
    if ignored:
        raise DeepPhaseError(f"probe: {', '.join(ignored)} {'build' if len(ignored) > 1 else 'builds'} a probe from optics (with --energy, --semi-angle and "
                             f"--sampling); with --probe {args.probe} {'they' if len(ignored) > 1 else 'it'} would do nothing")
    return load_probe(args.probe), {"probe": {"source": str(args.probe)},
                                    **({"sampling": args.sampling} if args.sampling is not None else {})}


def _value_or_range(name: str, values, default=0.0):
    """``--dose E [E]``, ``--source-size PX [PX]``, ``--focal-spread RAD [RAD]``: one value, or a range (lo, hi) the
    training patterns draw from."""
    if values is None:
        return default
    if len(values) > 2:
        raise DeepPhaseError(f"{name}: expected one value or a range LO HI, got {len(values)} numbers")
    if len(values) == 2 and values[0] > values[1]:
        raise DeepPhaseError(f"{name}: expected a range LO HI with LO ≤ HI, got {values[0]:g} {values[1]:g}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def _cmd_train(args) -> None:
    from .data.phase_objects import CORPUS_PRESETS, DEFAULT_LATTICE_SPACING_PX, CorpusConfig
    from .physics.geometry import Geometry
    from .physics.scan import REFERENCE_STEP_PX
    from .training.loop import TrainConfig, train

    if args.out.suffix.lower() in (".safetensors", ".pt", ".pth", ".ckpt", ".json", ".onnx", ".npy"):
        raise DeepPhaseError(f"out: the model folder to write (model.safetensors, model.json and probe.npy go into "
                             f"it), got {str(args.out)!r}, a file's name; name a folder")
    if args.rank_data != "shared" and args.nproc == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise DeepPhaseError("rank-data: how several processes share the batches, and this training runs in one; "
                             "add --nproc N (or start it with torchrun), or drop it")
    probe, info = _probe_from_args(args)
    dose = _value_or_range("dose", args.dose, default=None)
    if args.sigma_weight != 1.0 and not args.sigma_head:
        raise DeepPhaseError("sigma-weight: weighs the σ head's likelihood; it needs --sigma-head")
    if args.neighbourhood_step != REFERENCE_STEP_PX and args.neighbourhood == 1:
        raise DeepPhaseError("neighbourhood-step: the scan step of a 3×3 neighbourhood's patterns; it needs "
                             "--neighbourhood 3")
    config = TrainConfig(arch=args.arch, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                         batch_size=args.batch_size, preset=args.preset, lr=args.lr, dose=dose,
                         corpus=CorpusConfig(mix=dict(CORPUS_PRESETS[args.corpus]),
                                             phase_range=tuple(args.phase_range),
                                             phase_scale=args.phase_scale,
                                             lattice_spacing=tuple(args.lattice_spacing or DEFAULT_LATTICE_SPACING_PX),
                                             lattice_spacing_scale=args.lattice_spacing_scale),
                         seed=args.seed,
                         val_size=args.val_size, device=args.device, half=args.half, loss=args.loss,
                         neighbourhood=args.neighbourhood, neighbourhood_step_px=args.neighbourhood_step,
                         sigma_head=args.sigma_head, sigma_weight=args.sigma_weight, init_from=args.init_from,
                         defocus_spread=args.defocus_spread, aberration_range=args.probe_aware,
                         source_size_px=_value_or_range("source-size", args.source_size),
                         focal_spread_rad=_value_or_range("focal-spread", args.focal_spread))
    geometry = Geometry(n_px=probe.shape[0])
    command = args.command_line
    if args.nproc != 1:  # several processes on this machine: torchrun starts them (deepphase/train.py)
        from .train import launch

        launch(args, command)  # rank 0 reports
        return
    model, history = train(probe, args.out, config, geometry, resume=args.resume, overwrite=args.overwrite,
                           probe_info=info, command=command, rank_data=args.rank_data)
    if int(os.environ.get("RANK", "0")) != 0:  # a torchrun process other than rank 0: rank 0 reports
        return
    epochs = history[-1]["epoch"]
    print(f"model written to {args.out} (validation loss {history[-1]['val_loss']:.4f} rad, a flat phase's "
          f"{model.info['validation_loss_flat_phase']:.4f}, after {epochs} epoch{'s' * (epochs != 1)}); use it with: "
          f"deepphase reconstruct DATA --model {shlex.quote(str(args.out))}")


def _add_scan_arguments(p: argparse.ArgumentParser, simulating: bool) -> None:
    """The scan options simulate and reconstruct share; only reconstruct can find the step and rotation."""
    g = p.add_argument_group("scan positions (top-left corner of each probe window, real-space pixels)")
    g.add_argument("--positions", type=_path, help="(N, 2) .npy of (row, col) positions")
    g.add_argument("--scan-shape", type=_count, nargs=2, metavar=("ROWS", "COLS"),
                   help="raster shape (default 64 64)" if simulating else
                   "raster shape, where the file does not say it (needed for (N, k, k) data)")
    if not simulating:
        g.add_argument("--step", type=_step, metavar="S|auto",
                       help="raster step in real-space pixels of the model's grid; 'auto': the step the model's "
                            "probe fits best (the weak-phase transfer on the central 64×64 positions, ~2 s; rasters up to ~1.4 px)")
    else:
        g.add_argument("--step", type=_positive, help="raster step in real-space pixels of the model's grid "
                                                      "(default 0.87, the reference scan's)")
    angle = "rotation of the scan axes against the detector's, degrees counter-clockwise (default 0)"
    if simulating:
        g.add_argument("--rotation", type=_rotation(auto=False), default=0.0, metavar="DEG", help=angle)
    else:
        g.add_argument("--rotation", type=_rotation(auto=True), default=0.0, metavar="DEG|auto",
                       help=angle + "; 'auto' finds it from the data by the DPC curl criterion")
    g.add_argument("--fastest", choices=["row", "col"],
                   help="scan axis that varies fastest between frames (default: 'row', the convention of the paper's data, for "
                        "(N, k, k) data; 'col' for (rows, cols, k, k) arrays)")


def _path(text: str) -> Path:
    """A path option: an empty one would be Path("."), the current folder, written into without a word (train
    --out '' did: the training audit, s40)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return Path(text)


def _step(text: str):
    """reconstruct's ``--step``: a positive number of pixels, or 'auto'."""
    return text if text == "auto" else _number(minimum=0, above=True, what="a positive number of pixels or 'auto'")(text)


def _rotation(auto: bool):
    """``--rotation``: an angle in degrees, or (reconstruct) 'auto'."""
    expected = "an angle in degrees or 'auto'" if auto else "an angle in degrees"

    def parse(text: str):
        if auto and text == "auto":
            return text
        try:
            angle = float(text)
        except ValueError:
            angle = float("nan")
        if not np.isfinite(angle):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return angle
    return parse


def _cmd_simulate(args) -> None:
    import json

    from .data.simulate import required_object_shape, simulate_scan
    from .data.specimens import builtin_specimen, load_phase_image
    from .io_utils import remove_leftover_temporaries, save_npz
    from .physics.forward import dose_per_pattern
    from .physics.geometry import Geometry
    from .physics.scan import check_spacing

    out = args.out
    if out.suffix != ".npz":
        raise DeepPhaseError(f"out: expected a file name ending in .npz, got {str(out)!r}")
    if out.exists() and not args.overwrite:
        raise DeepPhaseError(f"out: {str(out)!r} exists; choose another name or pass --overwrite")
    probe, probe_info = _probe_from_args(args)
    if args.positions is None and args.scan_shape is None:
        args.scan_shape = [64, 64]
    if args.positions is None and args.step is None:
        from .physics.scan import REFERENCE_STEP_PX

        args.step = REFERENCE_STEP_PX
    from .reconstruction.from_file import scan_positions

    positions, scan_info = scan_positions(args.positions, args.scan_shape, args.step, args.rotation, args.fastest,
                                          n_frames=None)
    check_spacing(positions, Geometry(n_px=probe.shape[0]))
    dose = args.dose
    if args.dose_per_area is not None:
        if args.sampling is None:
            raise DeepPhaseError("dose-per-area: needs the real-space pixel size (--sampling, Å)")
        if dose is not None:
            raise DeepPhaseError("dose: give either --dose or --dose-per-area, not both")
        step_px = scan_info.get("step_px")
        if step_px is None:
            raise DeepPhaseError("dose-per-area: needs a raster step (--step)")
        dose = dose_per_pattern(args.dose_per_area, step_px * args.sampling)
    if args.object is None and args.phase_max is not None:
        raise DeepPhaseError("phase-max: scales an --object; the built-in specimens have their own phase")
    if args.object is not None:
        truth = load_phase_image(args.object, args.phase_max)
        source = str(args.object)
    else:
        truth = builtin_specimen(args.specimen, required_object_shape(positions, probe.shape[0]), seed=args.seed)
        source = f"builtin:{args.specimen}"
    scan = simulate_scan(truth, probe, positions, dose=dose, seed=args.seed, noise=not args.no_noise,
                         source_size_px=args.source_size, detector_psf_px=args.detector_psf,
                         focal_spread_rad=args.focal_spread)
    if args.dose_per_area is not None:
        probe_info = {**probe_info, "dose_per_area_electrons_per_angstrom2": args.dose_per_area}
    parameters = {"object": source, "dose_electrons_per_pattern": scan.dose, "noise": not args.no_noise,
                  **{k: v for k, v in scan.parameters.items() if k in ("source_size_px", "detector_psf_px", "focal_spread_rad", "coherent_modes")},
                  "seed": args.seed, **scan_info, **probe_info,
                  "command": args.command_line}
    remove_leftover_temporaries(out.parent, [out.name])  # (a simulate killed outright left its half-written file)
    save_npz(out, amplitude=scan.amplitude, positions=scan.positions, truth=scan.truth.astype(np.float32),
             probe=probe, parameters=np.array(json.dumps(parameters, default=str)))
    from .physics.forward import REFERENCE_DOSE

    reference = "" if np.isclose(scan.dose, REFERENCE_DOSE, rtol=1e-3) else (
        f"; the reference experiment's is {REFERENCE_DOSE:,.0f}")
    origin = "" if dose is not None else f" (no --dose given: the probe's own scale, n²·Σ|P|²{reference})"
    print(f"wrote {out}: {len(scan.amplitude)} patterns of {probe.shape[0]}×{probe.shape[1]}, "
          f"{scan.dose:.0f} electrons per pattern{origin}")


def _cmd_reconstruct(args) -> None:
    from .reconstruction.from_file import reconstruct_file

    rec = reconstruct_file(
        args.data, args.out, model=args.model, dataset=args.dataset, positions=args.positions,
        scan_shape=args.scan_shape, step_px=args.step, rotation_deg=args.rotation, fastest=args.fastest,
        kind=None if args.input == "auto" else args.input, calibration=args.calibration, gain=args.gain,
        energy=args.energy, semi_angle=args.semi_angle, mrad_per_px=args.mrad_per_px,
        model_mrad_per_px=args.model_mrad_per_px, probe_check=args.probe_check, flip_patterns=args.flip_patterns,
        stitching=args.stitching, source_size_px=args.source_size, deblur=_DEBLUR[args.deblur],
        sampling=args.pixel_size, batch_size=args.batch_size, precision=args.precision,
        uncertainty=args.uncertainty or None, engine=args.engine, ensemble=args.ensemble or (),
        sigma_scale=args.sigma_scale, device=args.device, chunk_size=args.chunk_size, resume=args.resume,
        overwrite=args.overwrite, workers=args.workers, scheduler=args.scheduler, tile_size=args.tile_size,
        libertem=args.libertem, progress=sys.stderr.isatty() if args.libertem else None, log=_say("reconstruct"),
        command=args.command_line)
    meta = rec.metadata
    msg = (f"phase image {rec.phase.shape[0]}×{rec.phase.shape[1]} written to {args.out}/phase.npy "
           f"({meta['n_patterns']} patterns"
           + (f" read by {meta['data_info']['reader']} as {meta['data_info']['libertem_dataset']}"
              if args.libertem else "")
           + _speed(rec)
           + (f", stitching {rec.timings['stitch_s']:.2f} s" if "stitch_s" in rec.timings else "") + ")")
    if rec.uncertainty is not None:  # (not said: the figures audit, s41)
        from .reconstruction.pipeline import uncertainty_source

        msg += f"; σ in uncertainty.npy ({uncertainty_source(rec.processing.get('uncertainty'))})"
    calibration = meta["calibration"]
    if calibration is not None:
        shape = meta.get("pattern_shape") or meta["data_info"]["pattern_shape"]
        msg += (f"; calibrated {shape[0]}×{shape[1]}" + (
            f" → {calibration['grid_px']}×{calibration['grid_px']}: disk r = {calibration['radius_px']:.2f} px, "
            f"zoom {calibration['zoom']:.4f}, {calibration['masked_pixels']['count']} pixel{'s' * (calibration['masked_pixels']['count'] != 1)} masked"
            if "grid_px" in calibration else "") + " (see calibration.png)")
    if "correlation_with_truth" in meta:
        msg += f"; correlation with the truth {meta['correlation_with_truth']:.3f}"
        if "truth_mapped" in meta:
            mapped = meta["truth_mapped"]
            msg += (" (the truth taken through the positions given: " + ("mirrored, " if mapped["mirrored"] else "")
                    + f"turned {mapped['rotation_deg']:.1f}°, scaled {mapped['scale']:.3f}; "
                    f"{mapped['correlation_unmapped']:.3f} as simulated"
                    + ("" if mapped["affine"] else f"; but they are no turned or scaled copy of the simulation's "
                       f"(residual {mapped['residual_px']:.1f} px): neither figure means much") + ")")
    print(msg)


def _say(command: str):
    """What a command prints as the work proceeds (:func:`deepphase.reconstruction.from_file.reconstruct_file`'s
    ``log``): on stderr, notes marked as such."""
    def say(message: str, is_note: bool) -> None:
        print(f"deepphase {command}: {'note: ' if is_note else ''}{message}", file=sys.stderr)
    return say


_DEBLUR = {"auto": "auto", "on": True, "off": False}


def _uncertainty_argument(text: str):
    """``--uncertainty``: a number of Monte Carlo dropout samples, or 'head' (the model's σ head)."""
    if text == "head":
        return text
    try:
        samples = int(text)
    except ValueError:
        samples = 0
    if samples < 2:  # one sample has no spread
        raise argparse.ArgumentTypeError(f"expected at least 2 dropout samples, or 'head', got {text!r}")
    return samples


def _cmd_calibrate_uncertainty(args) -> None:
    from .io_utils import check_writable, folder_lock

    folder = Path(args.model).parent if Path(args.model).name == "model.json" else Path(args.model)
    if not (folder / "model.json").exists():
        from .models.modelfile import packaged_models

        why = (" (the packaged models are calibrated already)" if args.model in packaged_models()
               else " (no such folder)" if not folder.exists() else "")
        raise DeepPhaseError(f"model: expected a model folder with a model.json, got {args.model!r}{why}")
    args.model = str(folder)
    check_writable(folder / "model.json", "model", folder=False)
    # Held while fitting: a training going on in the folder rewrites model.json after each epoch, and the factor,
    # fitted on the weights of one epoch, was lost with the next (the training audit, s40).
    with folder_lock(folder, "model"):
        _calibrate_uncertainty(args)


def _calibrate_uncertainty(args) -> None:
    from .models.modelfile import load_model
    from .models.registry import has_sigma_head
    from .reconstruction.uncertainty import RECORD_KEYS, fit_sigma_scale, save_sigma_scale

    model = load_model(args.model)
    method = args.method if args.method != "auto" else ("head" if has_sigma_head(model.network) else "dropout")
    earlier = model.info.get(RECORD_KEYS[method])
    if earlier and not args.overwrite:  # (fitted on other scans or samples, perhaps on purpose)
        raise DeepPhaseError(f"model: {args.model}/model.json already holds a fitted factor for "
                             f"{'the σ head' if method == 'head' else 'Monte Carlo dropout'} "
                             f"({earlier.get('sigma_scale', float('nan')):.3g}); pass --overwrite to fit it again")
    result = fit_sigma_scale(model, n_scans=args.scans, side=args.side, samples=args.samples, seed=args.seed,
                             method=method)
    save_sigma_scale(args.model, result)
    what = "the σ head's σ" if method == "head" else "Monte Carlo dropout σ"
    print(f"{what} × {result['sigma_scale']:.3g} covers 68 % of the error on {args.scans} simulated scans "
          f"(raw σ covered {100 * result['within_1sigma_raw']:.1f} % within ±1σ; scaled, "
          f"{100 * result['within_2sigma_scaled']:.1f} % within ±2σ); stored in {args.model}/model.json")


def _cmd_inspect(args) -> None:
    import json

    from .data.inspection import inspect_scan, plot_inspection

    if args.figure is not None and args.figure.exists() and not args.overwrite:
        raise DeepPhaseError(f"figure: {str(args.figure)!r} exists; choose another name or pass --overwrite")
    summary, arrays = inspect_scan(args.data, dataset=args.dataset, scan_shape=args.scan_shape, fastest=args.fastest,
                                   kind=None if args.input == "auto" else args.input, gain=args.gain or 1.0,
                                   model=args.model, virtual_image=args.figure is not None)
    if args.figure is not None:
        plot_inspection(summary, arrays, args.figure)
    if args.json:
        print(json.dumps(summary, indent=2, default=str, ensure_ascii=False))
        return
    s, v = summary, summary["values"]
    where = f", dataset {s['dataset']}" if s.get("dataset") else ""
    scan = (f"scan {s['scan_shape'][0]}×{s['scan_shape'][1]} ({s['scan_shape_from']}, the {s['fastest']} varying "
            "fastest)" if s["scan_shape"] else "no scan shape (give --scan-shape ROWS COLS to reconstruct a raster)")
    print(f"{s['file']} ({s['format']}{where}): {s['patterns']:,} patterns of {s['pattern_shape'][0]}×"
          f"{s['pattern_shape'][1]} {s['dtype']}; {scan}")
    recorded = s["recorded"]
    if recorded:
        words = {"scan_step_angstrom": "scan step {} Å", "energy_kev": "beam {} keV", "pixel_size_angstrom": "pixel {} Å",
                 "truncated": "truncated: {}"}
        said = [words[k].format(f"{val:.4g}" if isinstance(val, float) else val) for k, val in recorded.items()
                if k in words]
        if "detector_sampling" in recorded:
            said.append(f"detector {recorded['detector_sampling']['value']:.4g} {recorded['detector_sampling']['units']}"
                        " per pixel")
        print("recorded: " + ", ".join(said))
    print(f"values: {v['kind']}; {v['electrons_per_pattern']:,.1f} electrons per pattern on average (of "
          f"{v['sample']} patterns{'' if v['gain_units_per_electron'] == 1 else ', gain ' + str(v['gain_units_per_electron'])})"
          f", largest pixel {v['largest_pixel']:.4g}"
          + (f"; {v['patterns_zero_everywhere_in_sample']} zero everywhere" if v["patterns_zero_everywhere_in_sample"]
             else ""))
    disk = s["disk"]
    if disk["found"]:
        print(f"bright-field disk: centre ({disk['center_px'][0]:.2f}, {disk['center_px'][1]:.2f}) px, radius "
              f"{disk['radius_px']:.2f} px (from its {disk['radius_from']}), {disk['level_counts']:.4g} counts per pixel "
              f"inside, {disk['background_counts']:.3g} around; {s['masked_pixels']} detector pixels look hot or dead")
        m = s["model"]
        if m["on_its_grid"]:
            print(f"model {m['name']!r}: the patterns are on its {m['grid_px']}×{m['grid_px']} grid, disk centre "
                  f"{m['disk_offset_px']:.2f} px from its own (along the axis further off); reconstruct: "
                  f"{m['reconstruct']}")
        else:
            print(f"model {m['name']!r}: reconstruct calibrates the patterns onto its {m['grid_px']}×{m['grid_px']} "
                  f"grid, zoom {m['zoom']:.4g} ({m['zoom_from']})")
    else:
        print(f"bright-field disk: not found ({disk['why']})")
    for text in s["notes"]:
        print(f"note: {text}")
    if args.figure is not None:
        print(f"figure: {args.figure}")


def _cmd_models(args) -> None:
    import json

    from .models.modelfile import load_model, packaged_models, summarise

    names = args.model or packaged_models()
    rows = [summarise(load_model(name)) for name in names]
    if args.json:
        print(json.dumps(rows, indent=2, default=str, ensure_ascii=False))
        return

    def doses(d):
        if d is None:
            return "?"
        return f"{d[0]:,.0f}–{d[1]:,.0f}" if isinstance(d, list) else f"{d:,.0f}"

    def corpus(mix):
        return ", ".join(f"{k} {v:.0%}" for k, v in mix.items()) if isinstance(mix, dict) else (mix or "?")

    # (no validation loss: each model's is on its own corpus and doses, and side by side it would read as a ranking)
    table = [("model", "arch", "parameters", "input", "doses (e/pattern)", "trained on", "uncertainty", "MB")]
    for r in rows:
        table.append((r["name"], r["arch"], f"{r['parameters']:,}", r["input"], doses(r["dose_e_per_pattern"]),
                      corpus(r["corpus"]), ", ".join(r["uncertainty"]) or "none",
                      "?" if r["weights_mb"] is None else f"{r['weights_mb']:.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"\nall for the {rows[0]['grid_px']}×{rows[0]['grid_px']} grid of the reference probe; use one with: "
          "deepphase reconstruct DATA --model NAME (the default: 'default'); --json for everything recorded"
          if all(r["grid_px"] == rows[0]["grid_px"] for r in rows) and not args.model else
          "\nuse one with: deepphase reconstruct DATA --model NAME_OR_FOLDER; --json for everything recorded")


def _cmd_export_onnx(args) -> None:
    from .io_utils import folder_lock
    from .models.modelfile import load_model
    from .models.registry import LOG_SCALE_RANGE, has_sigma_head
    from .reconstruction.engines import export_onnx

    if args.out.suffix != ".onnx":
        raise DeepPhaseError(f"out: expected a file name ending in .onnx, got {str(args.out)!r}")
    if args.out.exists() and not args.overwrite:
        raise DeepPhaseError(f"out: {str(args.out)!r} exists; choose another name or pass --overwrite")
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:  # onnx for torch's exporter, onnxruntime for the check before writing
        raise DeepPhaseError(f"export-onnx needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                             "not installed: pip install -e '.[onnx]' (in deepphase's source folder)")
    folder = args.out.parent
    # Into a model's folder, held as a training holds it: a training going on there removes model.onnx when it saves
    # the next epoch's weights (the export was reported written, then gone: the training audit, s40).
    with folder_lock(folder, "out") if (folder / "model.json").exists() else contextlib.nullcontext():
        model = load_model(args.model)
        path = export_onnx(model, args.out, overwrite=args.overwrite)
    n, c, out = model.geometry.n_px, model.in_channels, model.geometry.output_px
    sigma = has_sigma_head(model.network)
    inputs = ("diffraction amplitudes (√counts)" if c == 1 else
              "diffraction amplitudes (√counts) of each position's 3×3 neighbourhood, in the order of "
              "deepphase.data.stream.neighbourhood_offsets (channel 4: the position itself)")
    # (how to get σ and the mask from the file: not said, the figures audit, s41)
    lo, hi = LOG_SCALE_RANGE
    outputs = (f"phase (rad), then the σ head's log Laplace scale b: σ = √2·exp(clip(y[:, 1], {lo:g}, {hi:g})) rad, times "
               "the model's fitted factor (model.json: uncertainty_head.sigma_scale)" if sigma else "phase (rad)")
    g = model.geometry
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)\n"
          f"  input 'x': (batch, {c}, {n}, {n}) float32 {inputs}\n"
          f"  output 'y': (batch, {2 if sigma else 1}, {out}, {out}) {outputs}\n"
          "  as reconstruct does, remove each phase patch's mean inside the illuminated mask before stitching "
          f"(deepphase.physics.geometry.output_mask(probe, geometry): |P|² > {g.mask_threshold:g}·max|P|², the central "
          f"{g.crop_px}×{g.crop_px} pixels upsampled {g.upsample}×)"
          + ("\n  probe-aware: exported for the model's own probe (told no difference); reconstruct tells the network "
             "the data's probe, which this file cannot be told" if model.probe_aware else ""))


def _cmd_demo(args) -> None:
    from .evaluation.demo import run_demo

    meta = run_demo(args.out, specimen=args.specimen, stitching=args.stitching, command=args.command_line)
    print(f"demo: {meta['specimen']}, {meta['scan_shape'][0]}×{meta['scan_shape'][1]} positions, "
          f"{meta['dose_electrons_per_pattern']:.0f} electrons per pattern, {meta['total_s']:.1f} s")
    print(f"correlation with the truth: {meta['correlation_with_truth']:.3f}")
    print(f"outputs: {args.out}/phase.npy (also .tif and .emd), phase.png, comparison.png, truth.npy, metadata.json")


def _cmd_evaluate(args) -> None:
    from .evaluation import harness

    if args.seed_model is not None:
        harness.register_method("seed-method", "the seed's U-Net trained the seed's way, the seed's stitching")(
            harness.network_method(args.seed_model, stitching="seed", remove_plane=False))
    extra = []
    for option, items, sigma_head in (("model", args.model, False), ("sigma-head", args.sigma_head, True)):
        for item in items or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise DeepPhaseError(f"{option}: expected NAME=FOLDER (a model folder or a packaged model's name), "
                                     f"got {item!r}")
            if name in harness.list_methods():
                raise DeepPhaseError(f"{option}: the name {name!r} is taken by a built-in method; choose another")
            about = ("with its σ head: σ from the same forward pass × its fitted factor" if sigma_head
                     else "pairwise stitching, plane removed")
            harness.register_method(name, f"model {path}, {about}")(harness.network_method(path, sigma_head=sigma_head))
            extra.append(name)
    if args.sigma_scale is not None and not args.ensemble:
        raise DeepPhaseError("sigma-scale: a factor on an ensemble's spread; it needs --ensemble NAME=FOLDER,FOLDER")
    for item in args.ensemble or []:
        name, sep, paths = item.partition("=")
        folders = [f for f in paths.split(",") if f]
        if not sep or not name or len(folders) < 2:
            raise DeepPhaseError(f"ensemble: expected NAME=FOLDER,FOLDER[,...] with at least two models, got {item!r}")
        if name in harness.list_methods():
            raise DeepPhaseError(f"ensemble: the name {name!r} is taken by a built-in method; choose another")
        harness.register_method(name, f"ensemble of {', '.join(folders)}: mean image, σ = spread × {args.sigma_scale or 1}")(
            harness.network_method(folders[0], ensemble=folders[1:], sigma_scale=args.sigma_scale))
        extra.append(name)
    methods = args.methods
    if methods is None:
        methods = harness.available_methods() + (["seed-method"] if args.seed_model is not None else []) + extra
    else:  # (the named models were dropped without a word when --methods was given: the figures audit, s41)
        methods = [*methods, *extra, *(["seed-method"] if args.seed_model is not None else [])]
    methods = list(dict.fromkeys(methods))
    rows, table = harness.evaluate(args.preset, args.out, methods=methods, specimens=args.specimens,
                                   doses=args.doses, scan_shape=args.scan_shape, seed=args.seed,
                                   overwrite=args.overwrite, forward=args.forward, cache_dir=args.cache_dir,
                                   repeats=args.repeats, divide_source=args.divide_source,
                                   source_size_px=args.source_size, command=args.command_line)
    print(table)
    print("\n" + harness.summary_table(harness.summarise(rows)))
    print(f"report: {args.out}/results.md, results.json, montage.png, dose_series.png")


class _Parser(argparse.ArgumentParser):
    """argparse with the package's one-line errors: what was wrong, and where the options are listed."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deepphase", description="Phase images from 4D-STEM data with a convolutional network (after Phys. Rev. Lett. 130, 016101). See 'deepphase COMMAND --help'.")
    parser.add_argument("--version", action="version", version=f"deepphase {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a network for a probe on simulated data",
                       description="Train a network on an endless stream of simulated patterns and write a model folder.")
    _add_probe_arguments(p)
    p.add_argument("--out", required=True, type=_path, help="model folder to write")
    p.add_argument("--like", metavar="MODEL",
                   help="train with the recipe a model records (a packaged name such as 'default', or a model folder): "
                        "its training options, then the ones given here, which win; the probe is this command's "
                        "(e.g. --probe probe_estimate.npy from reconstruct)")
    p.add_argument("--defocus-spread", type=_non_negative, default=0.0, metavar="RAD",
                   help="give each training pattern's probe a defocus of its own, up to this many rad at the "
                        "bright-field disk's edge either way (default 0: the probe as given), for data whose focus "
                        "is known only so well (see benchmarks/RESULTS.md §36 for what it costs and gains)")
    p.add_argument("--source-size", type=_non_negative, nargs="+", metavar="PX",
                   help="a finite electron source: the standard deviation of its Gaussian image on the specimen in "
                        "real-space pixels (FWHM = 2.355 σ), or a range LO HI each pattern draws from, with the object "
                        "itself as the target (default: a coherent probe). In our 8-epoch fine-tunes of the default "
                        "this gained ≤ 0.05 where 'reconstruct --source-size' gains up to 0.15 (RESULTS.md §38)")
    p.add_argument("--focal-spread", type=_non_negative, nargs="+", metavar="RAD",
                   help="an incoherent spread of focus (energy spread × chromatic aberration): its standard deviation "
                        "as rad at the bright-field disk's edge, or a range LO HI each pattern draws from "
                        "(default: none; RESULTS.md §38)")
    p.add_argument("--probe-aware", type=_non_negative, default=0.0, metavar="RAD",
                   help="train a probe-aware network (compact archs): one model for probes whose defocus differs "
                        "from --probe's by up to this many rad at the bright-field disk's edge either way (and "
                        "astigmatism by up to half of it), told each pattern's difference; reconstruct tells it the "
                        "difference its probe check measures (default 0: a model for the probe as given)")
    p.add_argument("--init-from", metavar="MODEL",
                   help="start from the weights of a model (a packaged name or a folder) of the same architecture "
                        "instead of random ones: fine-tuning, e.g. the default for another probe with --like default")
    p.add_argument("--arch", default="unet-small", choices=_ArchitectureNames(), metavar="ARCH",
                   help="architecture: %(choices)s (default %(default)s); compact-rep trains the compact network "
                        "with reparameterisable convolutions and writes a plain compact model")
    p.add_argument("--epochs", type=_count, default=10, help="passes over --steps-per-epoch batches (default 10)")
    p.add_argument("--steps-per-epoch", type=_count, default=500,
                   help="batches of freshly simulated patterns per epoch; a checkpoint after each epoch (default 500)")
    p.add_argument("--batch-size", type=_count, default=32, help="patterns per step (default 32)")
    p.add_argument("--preset", default="default", choices=["default", "seed"],
                   help="optimiser: 'default' AdamW with cosine decay, or the paper's SGD lr 1e-4")
    p.add_argument("--lr", type=_positive, help="learning rate (default: the preset's)")
    p.add_argument("--dose", type=_positive, nargs="+", metavar="E",
                   help="electrons per pattern; two numbers draw from that range (default: the probe's own scale, "
                        "27,882 for the reference probe)")
    p.add_argument("--loss", default="offset-free", choices=["offset-free", "absolute"],
                   help="L1 in the mask after removing each patch's mean (default; the mean is not measurable), "
                        "or on the absolute phase (the paper's)")
    p.add_argument("--corpus", default="mix", choices=["mix", "natural", "procedural", "atoms"],
                   help="training objects: 'mix' (default: natural images, smooth fields, lattices, amorphous, "
                        "edges), 'natural' (the paper's: images only), 'procedural' or 'atoms'")
    p.add_argument("--phase-range", type=_finite, nargs=2, default=(0.1, 1.6), metavar=("MIN", "MAX"),
                   help="range of each object's maximum phase in rad (default 0.1 1.6)")
    p.add_argument("--phase-scale", choices=["uniform", "log-uniform"], default="uniform",
                   help="how each object's maximum phase is drawn from --phase-range: uniformly (default) or "
                        "log-uniformly (as many weak objects, e.g. one light-atom layer, as strong ones)")
    p.add_argument("--lattice-spacing", type=_positive, nargs=2, metavar=("MIN", "MAX"),
                   help="range of the lattice objects' lattice constant in object pixels (default 2.5 8: 0.5–1.6 Å "
                        "at the reference 0.2 Å/px; 2.5 16 also covers hBN and MoS2)")
    p.add_argument("--lattice-spacing-scale", choices=["uniform", "log-uniform"], default="uniform",
                   help="how each lattice constant is drawn from --lattice-spacing: uniformly (default) or "
                        "log-uniformly (a wide range that keeps as many dense lattices as wide ones)")
    p.add_argument("--neighbourhood", type=int, default=1, choices=[1, 3],
                   help="patterns per position the network sees: 1 (default) or 3 for the 3×3 neighbourhood of "
                        "adjacent scan positions (9 input channels; reconstruction then needs a raster of about "
                        "--neighbourhood-step)")
    from .physics.scan import REFERENCE_STEP_PX

    p.add_argument("--neighbourhood-step", type=_positive, default=REFERENCE_STEP_PX, metavar="PX",
                   help=f"scan step of the neighbourhood in real-space pixels (default {REFERENCE_STEP_PX:.4g}, "
                        "the reference scan's)")
    p.add_argument("--sigma-head", nargs="?", const="shared", choices=["shared", "detached"],
                   help="also train a second output channel that predicts each pixel's error scale (Laplace "
                        "likelihood; its gradient does not reach the phase, which the L1 loss trains as without "
                        "it): 'shared' (the default form) makes it from the phase's features, which it also "
                        "shapes; 'detached' (compact only) from a small branch that reads them without changing "
                        "them. 'reconstruct --uncertainty head' then writes σ from the same forward pass")
    p.add_argument("--sigma-weight", type=_non_negative, default=1.0, metavar="W",
                   help="with --sigma-head: weight of its likelihood beside the phase's L1 loss (default 1; the "
                        "likelihood does not pull on the phase, but it shares the network's features)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights and the simulated training data (default 0)")
    p.add_argument("--val-size", type=_count, default=512,
                   help="fixed simulated patterns the validation loss is measured on after each epoch (default 512)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default auto)")
    p.add_argument("--half", action="store_true", help="store float16 weights (half the file size)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    # Several processes (DistributedDataParallel); several machines: torchrun -m deepphase.train (README).
    p.add_argument("--nproc", type=_count, default=1, metavar="N",
                   help="train with N processes on this machine (one per GPU, or N CPU processes) through torchrun; "
                        "--batch-size is the global batch and must be a multiple of N (default 1)")
    p.add_argument("--rank-data", default="shared", choices=["shared", "per-rank"],
                   help="with several processes: 'shared' (default) each simulates the global batch and trains on "
                        "its slice, the same samples as one process; 'per-rank' each simulates only its share from "
                        "its own seed (no repeated simulation, not the same samples)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("simulate", help="simulate a 4D-STEM scan of a phase object",
                       description="Simulate noisy diffraction amplitudes of a phase image scanned by a probe; "
                                   "writes an .npz with amplitude, positions, truth, probe and parameters.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--object", type=_path, help="phase image: .npy in rad, or an image file scaled to --phase-max")
    from .data.specimens import BUILTIN_SPECIMENS

    src.add_argument("--specimen", default="twisted-hbn", choices=BUILTIN_SPECIMENS, help="built-in specimen")
    p.add_argument("--phase-max", type=_finite,
                   help="phase of the brightest pixel (rad): scales an image file to 0..MAX (default 1), or a .npy "
                        "(default: its radians as they are)")
    _add_probe_arguments(p)
    _add_scan_arguments(p, simulating=True)
    p.add_argument("--dose", type=_positive, help="electrons per pattern (default: the probe's own scale, 27,882 for "
                                              "the reference probe)")
    p.add_argument("--dose-per-area", type=_positive, help="dose in e/Å² (needs --sampling and --step)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the specimen and the counting noise (default 0)")
    p.add_argument("--no-noise", action="store_true", help="noise-free amplitudes")
    p.add_argument("--source-size", type=_non_negative, default=0.0, metavar="PX",
                   help="a finite electron source: the standard deviation of its Gaussian image on the specimen in "
                        "real-space pixels (FWHM = 2.355 σ; 0.5 Å FWHM is σ = 1.06 px at 0.2 Å/px); each pattern is "
                        "then partially coherent (default 0: a coherent probe)")
    p.add_argument("--focal-spread", type=_non_negative, default=0.0, metavar="RAD",
                   help="an incoherent Gaussian spread of focus (the energy spread through the chromatic aberration, "
                        "Cc·ΔE/E), its standard deviation as the phase it adds at the bright-field disk's edge in rad "
                        "(about 1 rad per nm at 300 kV and 25 mrad; default 0: none)")
    p.add_argument("--detector-psf", type=_non_negative, default=0.0, metavar="PX",
                   help="a counting detector's Gaussian point spread, standard deviation in detector pixels "
                        "(default 0: none)")
    p.add_argument("--out", required=True, type=_path, help="output .npz")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("reconstruct", help="reconstruct a phase image from a 4D-STEM scan",
                       description="Predict a phase patch for every pattern and stitch them into one phase image. "
                                   "Writes OUT/phase.npy (float32, rad), the same as phase.tif (ImageJ) and phase.emd (EMD 1.0), "
                                   "OUT/phase.png and OUT/metadata.json. "
                                   "Detector patterns that are not the model's n×n grid are calibrated first "
                                   "(bright-field disk, descan, angular sampling, hot/dead pixels; "
                                   "OUT/calibration.png shows it).")
    p.add_argument("data", type=_path,
                   help=".npy (N,k,k) or (R,C,k,k), .npz from 'deepphase simulate', HDF5/EMD 1.0 (py4DSTEM); with the "
                        "'files' extra (pip install -e \".[files]\"): zarr, Merlin .mib, EMPAD .xml, Gatan "
                        ".dm4/.dm3, .blo")
    p.add_argument("--dataset", help="dataset (or EMD group) path inside an HDF5 or zarr file")
    p.add_argument("--model", help="a packaged model's name (default, neighbourhood, probe-aware, seed-unet, ...) or a "
                                   "model folder (default: the packaged default)")
    _add_scan_arguments(p, simulating=False)
    p.add_argument("--input", choices=["auto", "counts", "amplitude"], default="auto",
                   help="whether the data are counts or amplitudes sqrt(counts) (default: read or inferred; "
                        "detector patterns that need calibration are taken as counts)")
    g = p.add_argument_group("detector calibration (patterns that are not the model's n×n grid)")
    cal = g.add_mutually_exclusive_group()
    cal.add_argument("--no-calibration", dest="calibration", action="store_const", const="off",
                     help="use the patterns as they are (they must be the model's n×n grid)")
    cal.add_argument("--calibrate", dest="calibration", action="store_const", const="on",
                     help="calibrate even n×n patterns (descan, disk centring, bad pixels)")
    p.set_defaults(calibration="auto")
    g.add_argument("--semi-angle", type=_positive, metavar="MRAD",
                   help="the data's convergence semi-angle in mrad (default: assumed equal to the model's, so the "
                        "ratio of the disk radii sets the angular resampling)")
    g.add_argument("--energy", type=_positive, metavar="KEV",
                   help="beam energy in keV (default: from the file), to convert detector calibrations in 1/Å or "
                        "1/nm and to get the real-space pixel size")
    g.add_argument("--mrad-per-px", type=_positive, metavar="X", help="angular size of a detector pixel in mrad")
    g.add_argument("--model-mrad-per-px", type=_positive, metavar="Y",
                   help="angular size of a model pixel in mrad (default: what the model records)")
    g.add_argument("--gain", type=float, metavar="G",
                   help="detector units per electron: counts = data / G (default 1)")
    g.add_argument("--no-probe-check", dest="probe_check", action="store_false",
                   help="skip measuring the data's probe against the model's (defocus and astigmatism from the "
                        "scan's weak-phase transfer, on the central 64×64 positions of a raster, about 1 s); by default a "
                        "clear difference is noted and the probe it implies written to probe_estimate.npy")
    g.add_argument("--flip-patterns", action="store_true",
                   help="mirror every pattern in k_row (k_row → −k_row) before the network: for a detector whose "
                        "rows run the other way against the scan, which no --rotation undoes; --rotation auto "
                        "finds whether it is needed (when this flag is not given)")
    p.add_argument("--stitching", choices=["pairwise", "least-squares", "seed"], default="pairwise",
                   help="pairwise (default, fast), least-squares (exact canvas least squares) or seed (the original)")
    p.add_argument("--source-size", type=_non_negative, default=0.0, metavar="PX",
                   help="the standard deviation of your source's Gaussian image on the specimen, real-space pixels "
                        "(FWHM = 2.355 σ; 0.5 Å FWHM is σ = 1.06 px at 0.2 Å/px): its blur, which the network cannot "
                        "undo, is divided out of the image by a Wiener filter (default 0: none; RESULTS.md §38)")
    p.add_argument("--deblur", choices=["auto", "on", "off"], default="auto",
                   help="divide out the blur of blending sub-pixel patches (atomic contrast 10–25 %% stronger, "
                        "more noise at the finest scale): auto (default) unless the patterns are counts below "
                        "10,000 electrons per pattern; never with --stitching seed")
    p.add_argument("--pixel-size", type=_positive, help="real-space pixel size in Å (for the scale bar and checks; default: the "
                        "calibration's, or the one a 'deepphase simulate' file records; a given one that differs "
                        "from them by more than 5 %% is noted)")
    p.add_argument("--batch-size", type=_count, default=512, help="patterns per forward pass (default 512)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="network arithmetic (default auto: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--uncertainty", type=_uncertainty_argument, default=0, metavar="N|head",
                   help="also write uncertainty.npy, a per-pixel standard deviation: from N Monte Carlo dropout "
                        "samples (N extra predictions), or 'head': from the σ head of a model trained with "
                        "--sigma-head (no extra prediction); see benchmarks/RESULTS.md for how well each is calibrated")
    p.add_argument("--engine", choices=["auto", "eager", "channels-last", "compile", "cuda-graphs", "onnx"],
                   default="auto",
                   help="how the network runs: auto (default: on a CPU onnx when onnxruntime is installed and the "
                        "model has an ONNX export (its folder's model.onnx, or one kept from an earlier onnx run) or "
                        "the scan has ≥ 16,384 patterns, else channels-last; eager on a GPU), "
                        "eager, channels-last (~1.3× eager on a CPU), compile (torch.compile: ~1.5×, after a 30-60 s "
                        "compilation), cuda-graphs (CUDA only: the network replayed as one CUDA graph per batch size; "
                        "unmeasured), onnx (ONNX Runtime, CPU: ~2.1×; a model without an export is exported at the "
                        "first run, ~1 s, and the export kept in ~/.cache/deepphase or $DEEPPHASE_CACHE_DIR; "
                        "the 'onnx' extra)")
    p.add_argument("--ensemble", nargs="+", metavar="FOLDER",
                   help="further models for the same probe: the image is the mean of all, and uncertainty.npy their "
                        "per-pixel spread (instead of --uncertainty)")
    p.add_argument("--sigma-scale", type=_positive, metavar="K",
                   help="multiply the uncertainty by K (default: the factor fitted for the model by "
                        "'deepphase calibrate-uncertainty', else 1)")
    p.add_argument("--device", default="auto", help="'auto' (a GPU if there is one), 'cpu' or 'cuda'")
    p.add_argument("--out", required=True, type=_path, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--chunk-size", type=_count, metavar="P",
                   help="patterns read and predicted at a time (default 16384); memory is bounded by it")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted reconstruction from its progress in OUT/.deepphase-partial")
    # Several processes or machines (dask.distributed): deepphase/reconstruction/distributed.py
    g = p.add_argument_group("several processes or machines (dask.distributed; the same image as one process)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_count, metavar="N",
                       help="predict with N local worker processes (a dask LocalCluster, one thread each)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="predict on a running dask cluster, e.g. tcp://host:8786 (dask-jobqueue, dask scheduler); "
                            "its workers must see the data file and the model folder")
    g.add_argument("--tile-size", type=_count, metavar="P", help="patterns per task (default 4096)")
    g.add_argument("--libertem", action="store_true",
                   help="open DATA with LiberTEM instead (every format it reads: K2IS, Frms6, TVIPS, SEQ, MRC, Merlin, "
                        "raw, ...; --scan-shape where the file does not say) and reconstruct on LiberTEM's workers "
                        "(--workers N: N local processes; default all cores). Frames in LiberTEM's order: --fastest "
                        "defaults to col. Pairwise stitching; --uncertainty head and --rotation auto, but no dropout "
                        "samples, --ensemble or --resume. "
                        "Needs the 'libertem' extra.")
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("calibrate-uncertainty", help="fit the factor that makes a model's --uncertainty cover 68 %% "
                                                     "of the error, on scans simulated from its training corpus",
                       description="Simulates scans of new objects from the model's training corpus at its training "
                                   "dose(s), reconstructs them with Monte Carlo dropout (or the model's σ head), and "
                                   "stores in model.json the factor k for which k·σ covers 68 % of the actual error. "
                                   "'reconstruct --uncertainty N' (or '--uncertainty head') then applies it.")
    p.add_argument("--model", required=True, help="model folder (its model.json gets the factor)")
    p.add_argument("--scans", type=_count, default=6, help="simulated scans (default 6)")
    p.add_argument("--side", type=_count, default=32, help="positions per scan side (default 32)")
    p.add_argument("--samples", type=_count, default=8, help="dropout samples, as you will reconstruct with (default 8)")
    p.add_argument("--method", choices=["auto", "dropout", "head"], default="auto",
                   help="whose σ to calibrate: Monte Carlo dropout's, or the σ head's (default auto: the head if "
                        "the model has one); stored under 'uncertainty' or 'uncertainty_head' in model.json")
    p.add_argument("--seed", type=int, default=20261125,
                   help="random seed of the simulated scans and their noise (default 20261125)")
    p.add_argument("--overwrite", action="store_true", help="replace a factor fitted before for the same method")
    p.set_defaults(func=_cmd_calibrate_uncertainty)

    p = sub.add_parser("export-onnx", help="write a model's network as an ONNX file, for ONNX Runtime or a pipeline "
                                           "of your own",
                       description="Exports the network (batch norms folded, batch axis dynamic) and checks the export "
                                   "against the weights before writing it. Written into a model folder as model.onnx, "
                                   "it is what reconstruct's onnx engine uses for that model.")
    p.add_argument("--model", default="default", help="packaged model name or model folder (default: default)")
    p.add_argument("--out", required=True, type=_path, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_cmd_export_onnx)

    p = sub.add_parser("inspect", help="what a 4D-STEM file holds and how reconstruct would read it",
                       description="Reads a sample of the patterns: the file's shape, dtype and records (scan step, "
                                   "energy, detector sampling), the counts, the bright-field disk, bad pixels, and "
                                   "whether reconstruct would calibrate the patterns onto the model's grid. With "
                                   "--figure, also the mean pattern and a virtual bright-field image (all patterns "
                                   "read once).")
    p.add_argument("data", type=_path, help="the file (as reconstruct takes it)")
    p.add_argument("--dataset", help="the array inside an HDF5 or zarr file")
    p.add_argument("--scan-shape", type=_count, nargs=2, metavar=("ROWS", "COLS"),
                   help="the raster's shape, where the file does not say it")
    p.add_argument("--fastest", choices=["row", "col"],
                   help="scan axis that varies fastest between frames (as reconstruct: 'row' for (N, k, k) data, "
                        "'col' for a file that records its scan)")
    p.add_argument("--input", default="auto", choices=["auto", "counts", "amplitude"],
                   help="what the values are (default: the file's word, else told from the values)")
    p.add_argument("--gain", type=_positive, help="detector units per electron (default 1)")
    p.add_argument("--model", default="default", help="packaged model name or model folder whose grid the patterns "
                                                      "are compared with (default: default)")
    p.add_argument("--figure", type=_path, metavar="PNG", help="write the mean pattern with the disk found and a "
                                                              "virtual bright-field image here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing figure")
    p.add_argument("--json", action="store_true", help="print everything found, as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("models", help="the packaged models (or model folders): what each is and was trained for",
                       description="A table of the packaged models, or of the models named: architecture, "
                                   "parameters, input, the doses and corpus they were trained on, the uncertainty they "
                                   "offer and size (--json: everything recorded, the validation loss on each model's "
                                   "own corpus and doses too).")
    p.add_argument("model", nargs="*", help="packaged model names or model folders (default: every packaged model)")
    p.add_argument("--json", action="store_true", help="print everything recorded, as JSON")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("demo", help="the whole pipeline on a built-in specimen with the packaged model",
                       description="Simulate a built-in specimen at the paper's step and dose, reconstruct it with "
                                   "the packaged model and print the correlation with the truth.")
    p.add_argument("--out", type=_path, default=Path("deepphase-demo"), help="output folder (default deepphase-demo)")
    p.add_argument("--specimen", default="twisted-hbn", choices=BUILTIN_SPECIMENS,
                   help="built-in specimen (default twisted-hbn: the reference experiment's bilayer, as simulated)")
    p.add_argument("--stitching", choices=["pairwise", "least-squares", "seed"], default="pairwise",
                   help="pairwise (default, fast), least-squares (exact canvas least squares) or seed (the original)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("evaluate", help="methods × specimens × doses against the truth: tables and figures",
                       description="Simulate each specimen at each dose, reconstruct it with every method and "
                                   "write a report folder: results.md/json (every metric and wall time), "
                                   "montage.png and dose_series.png. Material specimens need the 'sim' extra.")
    p.add_argument("--preset", choices=["fast", "full"], default="fast",
                   help="'fast' (under 10 minutes on a 2-core CPU) or 'full' (for a GPU)")
    p.add_argument("--methods", nargs="+", help="methods to run (default: all available)")
    p.add_argument("--specimens", nargs="+", help="specimens (default: the preset's)")
    p.add_argument("--doses", type=_positive, nargs="+", metavar="E", help="electrons per pattern (default: the preset's)")
    p.add_argument("--scan-shape", type=_count, nargs=2, metavar=("ROWS", "COLS"), help="scan size (default: the preset's)")
    p.add_argument("--forward", nargs="+", choices=["phase-object", "multislice"],
                   help="forward models of the simulated data (default: the preset's; multislice needs the sim "
                        "extra and applies to material specimens)")
    p.add_argument("--cache-dir", type=_path, help="folder for simulated multislice data (default: multislice/ in ~/.cache/deepphase, or in "
                        "$DEEPPHASE_CACHE_DIR; 'off' there keeps nothing)")
    p.add_argument("--model", action="append", metavar="NAME=FOLDER",
                   help="also evaluate the model in FOLDER under NAME (repeatable), e.g. mine=my-model/")
    p.add_argument("--ensemble", action="append", metavar="NAME=FOLDER,FOLDER,...",
                   help="add an ensemble of models as a method: the mean image and their spread as σ (repeatable)")
    p.add_argument("--sigma-scale", type=_positive, help="factor on the ensembles' spread (default 1)")
    p.add_argument("--sigma-head", action="append", metavar="NAME=FOLDER",
                   help="add a model trained with --sigma-head as a method whose σ (from its head, with its fitted "
                        "factor) is scored beside its image (repeatable)")
    p.add_argument("--seed-model", help="model folder of the paper's method (seed-unet, --preset seed); adds "
                                        "'seed-method' with the paper's stitching")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated specimens and noise (default 0)")
    p.add_argument("--repeats", type=_count, default=1, metavar="N",
                   help="simulate every case N times (seeds SEED … SEED+N-1) and report each method's mean with "
                        "its standard error, and its difference to the first method paired by seed (default 1)")
    p.add_argument("--source-size", type=_non_negative, default=0.0, metavar="PX",
                   help="simulate the phase-object cases with a finite source of this σ in real-space pixels "
                        "(default 0: a coherent probe; the multislice cases always have σ = 0.25 Å)")
    p.add_argument("--divide-source", action="store_true",
                   help="divide each case's finite source out of every method's image before scoring it, as "
                        "'reconstruct --source-size' does (default: score the images as made)")
    p.add_argument("--out", type=_path, default=Path("deepphase-evaluation"), help="report folder")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.set_defaults(func=_cmd_evaluate)
    return parser


#: Options of a recorded training command that ``train --like`` does not take over: where to write, the probe
#: (the new model's own) and how to run; with the number of values each takes.
# What a recorded command says about its own run, not its recipe: the probe, the folders (a model it started from
# lies on the machine that trained it: --init-from is given anew), resumption, processes, device.
_NOT_LIKE = {"--out": 1, "--like": 1, "--probe": 1, "--energy": 1, "--semi-angle": 1, "--defocus": 1, "--cs": 1,
             "--sampling": 1, "--grid": 1, "--resume": 0, "--overwrite": 0, "--nproc": 1, "--device": 1,
             "--init-from": 1}


def _without(tokens: list[str], options: dict, known: list[str] = ()) -> list[str]:
    """``tokens`` without ``options`` and their values; an option may be written as argparse takes it, shortened to
    a prefix of one of the ``known`` option strings (a recorded ``--ov`` is ``--overwrite``: --like once took it
    over and replaced a model unasked, the training audit, s40)."""
    def full(name: str) -> str:
        matches = [option for option in known if option.startswith(name)] if name.startswith("--") else []
        return name if name in known or len(matches) != 1 else matches[0]

    out, skip = [], 0
    for token in tokens:
        if skip:
            skip -= 1
            continue
        name = full(token.split("=", 1)[0])
        if name in options:
            skip = options[name] if "=" not in token else 0
            continue
        out.append(token)
    return out


def recipe_options(config, who: str = "config") -> list[str]:
    """The ``deepphase train`` options that train ``config``'s recipe (a TrainConfig), without those a recorded
    command's ``--like`` leaves out (the probe, folders, device): how ``train --like`` takes over the recipe of a
    model trained from Python."""
    from .data.phase_objects import CORPUS_PRESETS
    from .physics.scan import REFERENCE_STEP_PX

    def values(option, value):
        return [option, *(str(float(v)) for v in np.atleast_1d(value))]

    corpus = [name for name, mix in CORPUS_PRESETS.items() if mix == config.corpus.mix]
    if not corpus:
        raise DeepPhaseError(f"{who} trained on a corpus mix {config.corpus.mix} that no --corpus name gives "
                             f"({', '.join(CORPUS_PRESETS)}); train it from Python with TrainConfig.like")
    options = ["--arch", config.arch, "--epochs", str(config.epochs), "--steps-per-epoch", str(config.steps_per_epoch),
               "--batch-size", str(config.batch_size), "--preset", config.preset, "--loss", config.loss,
               "--corpus", corpus[0], *values("--phase-range", config.corpus.phase_range),
               "--phase-scale", config.corpus.phase_scale,
               *values("--lattice-spacing", config.corpus.lattice_spacing),
               "--lattice-spacing-scale", config.corpus.lattice_spacing_scale,
               "--seed", str(config.seed), "--val-size", str(config.val_size)]
    optional = [("--lr", config.lr, config.lr is not None), ("--dose", config.dose, config.dose is not None),
                ("--defocus-spread", config.defocus_spread, config.defocus_spread),
                ("--probe-aware", config.aberration_range, config.aberration_range),
                ("--source-size", config.source_size_px, np.any(config.source_size_px)),
                ("--focal-spread", config.focal_spread_rad, np.any(config.focal_spread_rad))]
    options += [token for option, value, given in optional if given for token in values(option, value)]
    if config.neighbourhood != 1 or config.neighbourhood_step_px != REFERENCE_STEP_PX:
        options += ["--neighbourhood", str(config.neighbourhood), *values("--neighbourhood-step",
                                                                           config.neighbourhood_step_px)]
    if config.sigma_head:
        head = "shared" if config.sigma_head is True else config.sigma_head
        options += ["--sigma-head", head, *values("--sigma-weight", config.sigma_weight)]
    return options + (["--half"] if config.half else [])


def _like_arguments(parser: argparse.ArgumentParser, args, argv: list[str]):
    """``train --like MODEL``: the model's recorded training options, then the command's own (the last wins)."""
    from .models.modelfile import load_model
    from .training.loop import TrainConfig

    model = load_model(args.like)
    record = (getattr(model, "info", None) or {}).get("training")
    if not isinstance(record, dict):
        raise DeepPhaseError(f"like: model {args.like!r} records no training recipe to start from")
    tokens = shlex.split(record.get("command") or "")
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    known = [option for option in commands["train"]._option_string_actions if option.startswith("--")]
    if tokens[:2] == ["deepphase", "train"]:
        recipe = _without(tokens[2:], _NOT_LIKE, known)
    else:  # trained from Python (its command is the script's): the options that train its recorded recipe
        recipe = recipe_options(TrainConfig.like(model), f"like: model {args.like!r}")
    own = argv[argv.index("train") + 1 :]
    expanded = ["train"] + recipe + _without(own, {"--like": 1}, known)
    new = parser.parse_args(expanded)
    new.command_line = "deepphase " + " ".join(shlex.quote(a) for a in expanded)
    print(f"deepphase train: the recipe of {args.like!r}: {new.command_line}", file=sys.stderr)
    return new


# The commands' --out: a folder to write into (True) or a file (False).
_WRITES = {"train": True, "reconstruct": True, "demo": True, "evaluate": True, "simulate": False, "export-onnx": False}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        # The command as the user gave it, for the records (main(argv) from Python or a test is not sys.argv; --like
        # and a torchrun process, deepphase.train, set their own).
        args.command_line = "deepphase " + " ".join(shlex.quote(a) for a in argv)
    except SystemExit as exc:  # --help, --version, or a malformed option (one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:  # (Ctrl-C while the parser imports torch to check --arch)
        print("deepphase: interrupted before any work", file=sys.stderr)
        return 130
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        # A batch system's kill is a SIGTERM: handled like Ctrl-C, so a reconstruction saves its progress.
        signal.signal(signal.SIGTERM, _terminate)
    new_folder = None  # an --out folder this run makes: removed again if the run fails and leaves it empty
    try:
        with speaking_to_the_command_line():
            if getattr(args, "like", None):
                args = _like_arguments(parser, args, argv)
            if args.command in _WRITES:  # an unwritable output is found before the work, not after it
                from .io_utils import check_writable

                check_writable(args.out, folder=_WRITES[args.command])
                new_folder = None if args.out.exists() or not _WRITES[args.command] else args.out
            with _notes_as_lines(args.command):
                args.func(args)
        new_folder = None
    except DeepPhaseError as exc:
        print(f"deepphase {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not a file the user named or must fix: a defect, shown in full
            raise
        said = f"{str(exc.filename)!r}: {exc.strerror or exc}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            said += (f"; free some space and run the same command again{' with --resume' if _resumable(args) else ''}"
                     " (completed outputs are intact)")
        print(f"deepphase {args.command}: error: {said}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        said = str(exc) or "interrupted"  # (an exception is truthy even when its message is empty)
        if args.command == "train" and _resumable(args):
            said += (f"; the last finished epoch's checkpoint is in {args.out}: the same command with --resume "
                     "continues from it")
        elif args.command == "reconstruct" and not _said_by_the_pipeline(exc) and _resumable(args):
            said += (f"; the progress is saved in {args.out}: the same command with --resume continues from it")
        print(f"deepphase {args.command}: {said}; completed outputs are intact", file=sys.stderr)
        return 130
    finally:
        if new_folder is not None and new_folder.is_dir() and not any(new_folder.iterdir()):
            new_folder.rmdir()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    return 0


def _speed(rec) -> str:
    """The prediction's speed; on a resume, of the patterns this run predicted (none, where the interrupted run had
    predicted them all: "0 patterns/s" read as a stall)."""
    resumed_from = rec.processing.get("resumed_from_pattern")
    if resumed_from is None:
        return f", {rec.timings['patterns_per_second']:.0f} patterns/s"
    if resumed_from >= rec.metadata["n_patterns"]:
        return ", all predicted before the interruption"
    return f", resumed from pattern {resumed_from:,} at {rec.timings['patterns_per_second']:.0f} patterns/s"


def _resumable(args) -> bool:
    """Whether the command's --out holds what its --resume continues from: a training's last checkpoint, or a
    reconstruction's progress (said by the pipeline when the prediction is interrupted; not when the stitching, the
    figures or the writing are, after every pattern's prediction was saved)."""
    from .errors import DeepPhaseError

    if args.command == "train":
        return (Path(args.out) / _training_checkpoint()).exists()
    # (not imported here: a Ctrl-C while torch was being imported must not wait for it again; the hint is left out)
    pipeline = sys.modules.get("deepphase.reconstruction.pipeline")
    if args.command != "reconstruct" or pipeline is None:
        return False
    from .reconstruction.from_file import PARTIAL_FOLDER

    try:
        return pipeline.read_checkpoint(Path(args.out) / PARTIAL_FOLDER) is not None
    except DeepPhaseError:
        return False


def _said_by_the_pipeline(exc: KeyboardInterrupt) -> bool:
    """An interrupt of the prediction, whose message says already whether and where the progress is saved."""
    pipeline = sys.modules.get("deepphase.reconstruction.pipeline")
    return pipeline is not None and isinstance(exc, pipeline.InterruptedReconstruction)


def _training_checkpoint() -> str:
    from .training.loop import CHECKPOINT

    return CHECKPOINT


@contextlib.contextmanager
def _notes_as_lines(command: str):
    """The API's notes (:class:`~deepphase.errors.DeepPhaseNote` warnings) printed as the command's own note lines,
    each time; other warnings as Python prints them."""
    from .errors import DeepPhaseNote

    shown, say = warnings.showwarning, _say(command)

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeepPhaseNote):
            say(str(message), True)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", DeepPhaseNote)
        warnings.showwarning = show
        yield


def _terminate(signum, frame):
    raise KeyboardInterrupt("terminated (SIGTERM)")


if __name__ == "__main__":
    sys.exit(main())
