"""The ``deepphase`` command line: thin wrappers around the Python API.

Every user error is a :class:`~deepphase.errors.DeepPhaseError`; it is printed as one line and the
command exits with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
import numpy as np

from .errors import DeepPhaseError


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
    g.add_argument("--sampling", type=_positive, help="real-space pixel size in Å (with --energy)")
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


def _probe_from_args(args) -> tuple:
    from .physics.probe import ProbeParameters, load_probe, probe_from_parameters

    if args.energy is not None or args.semi_angle is not None:
        missing = [name for name, v in (("--energy", args.energy), ("--semi-angle", args.semi_angle),
                                        ("--sampling", args.sampling)) if v is None]
        if missing:
            raise DeepPhaseError(f"probe: building a probe from optics needs {', '.join(missing)} as well")
        params = ProbeParameters(args.energy, args.semi_angle, args.defocus, args.cs, args.grid, args.sampling)
        info = {"probe": {"source": "parameters", **params.__dict__}, "sampling": args.sampling,
                "energy": args.energy, "semiangle_cutoff": args.semi_angle}
        return probe_from_parameters(params), info
    ignored = [name for name, given in (("--defocus", args.defocus != 0.0), ("--cs", args.cs != 0.0),
                                        ("--grid", args.grid != 32)) if given]
    if ignored:
        raise DeepPhaseError(f"probe: {', '.join(ignored)} build a probe from optics (with --energy, --semi-angle and "
                             f"--sampling); with --probe {args.probe} they would do nothing")
    return load_probe(args.probe), {"probe": {"source": str(args.probe)}}


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
    command = "deepphase " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    command = getattr(args, "command_line", None) or command  # set by deepphase.train (torchrun processes)
    if args.nproc != 1:  # several processes on this machine: torchrun starts them (deepphase/train.py)
        from .train import launch

        launch(args, command)  # rank 0 reports
        return
    model, history = train(probe, args.out, config, geometry, resume=args.resume, overwrite=args.overwrite,
                           probe_info=info, command=command, rank_data=args.rank_data)
    if int(os.environ.get("RANK", "0")) != 0:  # a torchrun process other than rank 0: rank 0 reports
        return
    print(f"model written to {args.out} (validation loss {history[-1]['val_loss']:.4f} rad after "
          f"{history[-1]['epoch']} epochs)")


def _add_scan_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("scan positions (top-left corner of each probe window, real-space pixels)")
    g.add_argument("--positions", type=Path, help="(N, 2) .npy of (row, col) positions")
    g.add_argument("--scan-shape", type=_count, nargs=2, metavar=("ROWS", "COLS"), help="raster shape")
    g.add_argument("--step", type=_positive, help="raster step in real-space pixels of the model's grid (simulate: "
                                                  "default 0.87, the reference scan's)")
    g.add_argument("--rotation", type=_rotation, default=0.0, metavar="DEG|auto",
                   help="rotation of the scan axes against the detector's, degrees counter-clockwise (default 0); "
                        "'auto' (reconstruct) finds it from the data by the DPC curl criterion")
    g.add_argument("--fastest", choices=["row", "col"],
                   help="scan axis that varies fastest between frames (default: 'row', the convention of the paper's data, for "
                        "(N, k, k) data; 'col' for (rows, cols, k, k) arrays)")


def _positions_from_args(args, n_frames: int | None, scan_shape=None, default_fastest="row"):
    from .physics.scan import raster_positions, validate_positions

    if args.positions is not None:
        if args.scan_shape is not None or args.step is not None:
            raise DeepPhaseError("positions: give either --positions or --scan-shape/--step, not both")
        if args.rotation not in (0.0, "auto") or args.fastest is not None:
            raise DeepPhaseError("positions: --rotation DEG and --fastest describe a raster, and --positions gives every "
                                 "position already; rotate the positions themselves (--rotation auto still checks them)")
        if not args.positions.exists():
            raise DeepPhaseError(f"positions: file {str(args.positions)!r} does not exist")
        if args.positions.suffix.lower() != ".npy":
            raise DeepPhaseError(f"positions: expected an (N, 2) .npy file, got {str(args.positions)!r} (a .npz from "
                                 "deepphase simulate is the data file itself: its positions are read with it)")
        try:
            positions = np.load(args.positions, allow_pickle=False)
        except Exception as exc:
            from .data.io import npy_problem

            raise DeepPhaseError(f"positions: could not read {str(args.positions)!r} as .npy "
                                 f"({npy_problem(args.positions, exc)})") from exc
        return validate_positions(positions, n_frames if n_frames is not None else len(positions)), {
            "positions_file": str(args.positions)}
    shape = args.scan_shape or scan_shape
    if shape is None or args.step is None:
        return None, {}
    shape = tuple(shape)
    if n_frames is not None and shape[0] * shape[1] != n_frames:
        raise DeepPhaseError(
            f"scan-shape: {shape[0]}×{shape[1]} = {shape[0] * shape[1]} positions do not match the {n_frames} patterns"
        )
    fastest = args.fastest or default_fastest
    rotation = 0.0 if args.rotation == "auto" else args.rotation  # 'auto': found later from the patterns
    positions = raster_positions(shape, args.step, rotation, fastest)
    return positions, {"scan_shape": list(shape), "step_px": args.step, "rotation_deg": rotation,
                       "fastest": fastest}


_DEBLUR = {"auto": "auto", "on": True, "off": False}


def _rotation(text: str):
    if text == "auto":
        return text
    try:
        angle = float(text)
    except ValueError:
        angle = float("nan")
    if not np.isfinite(angle):
        raise argparse.ArgumentTypeError(f"expected an angle in degrees or 'auto', got {text!r}")
    return angle


def _cmd_simulate(args) -> None:
    import json

    from .data.simulate import required_object_shape, simulate_scan
    from .data.specimens import builtin_specimen, load_phase_image
    from .io_utils import save_npz
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
    if args.rotation == "auto":
        raise DeepPhaseError("rotation: 'auto' is for reconstruct (it is found from the data); give an angle in degrees")
    positions, scan_info = _positions_from_args(args, None)
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
    parameters = {"object": source, "dose_electrons_per_pattern": scan.dose, "noise": not args.no_noise,
                  **{k: v for k, v in scan.parameters.items() if k in ("source_size_px", "detector_psf_px", "focal_spread_rad", "coherent_modes")},
                  "seed": args.seed, **scan_info, **probe_info,
                  "command": "deepphase " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    save_npz(out, amplitude=scan.amplitude, positions=scan.positions, truth=scan.truth.astype(np.float32),
             probe=probe, parameters=np.array(json.dumps(parameters, default=str)))
    print(f"wrote {out}: {len(scan.amplitude)} patterns of {probe.shape[0]}×{probe.shape[1]}, "
          f"{scan.dose:.0f} electrons per pattern")


def _cmd_reconstruct(args) -> None:
    from .data.io import AmplitudeView, infer_kind, load_scan, looks_like_amplitudes
    from .evaluation.metrics import correlation
    from .models.modelfile import check_compatible, load_model
    from .physics.scan import check_spacing
    from .physics.scan import raster_positions
    from .reconstruction.pipeline import (check_output_folder, read_checkpoint, reconstruct, with_source_divided_out,
                                          write_outputs)

    check_output_folder(args.out, args.overwrite)
    partial = args.out / PARTIAL_FOLDER
    try:
        record = read_checkpoint(partial)
    except DeepPhaseError:
        if not args.overwrite or not partial.is_dir():
            raise
        shutil.rmtree(partial)  # damaged progress, and a fresh start asked for
        record = None
    if args.resume and record is None:
        raise DeepPhaseError(f"resume: {str(args.out)!r} holds no interrupted reconstruction to continue")
    if record is not None and not args.resume:
        if not args.overwrite:
            raise DeepPhaseError(
                f"out: {str(args.out)!r} holds an interrupted reconstruction ({record['done']:,} of {record['total']:,} "
                "patterns done); pass --resume to continue it or --overwrite to start again")
        shutil.rmtree(partial)
    if args.ensemble and (args.workers is not None or args.scheduler is not None):
        raise DeepPhaseError("ensemble: not available on a cluster (--workers/--scheduler) yet; run in one process")
    if args.resume and (args.workers is not None or args.scheduler is not None):
        raise DeepPhaseError("resume: a cluster reconstruction (--workers/--scheduler) cannot be resumed; run it again")
    figure = args.out / "calibration.png"
    for name in _FIGURES:
        if (args.out / name).exists() and not args.overwrite:
            raise DeepPhaseError(f"out: {str(args.out)!r} already holds {name}; choose another folder or pass --overwrite")
    if args.gain is not None and not args.gain > 0:
        raise DeepPhaseError(f"gain: expected a positive number of detector units per electron, got {args.gain}")
    if not (np.isfinite(args.source_size) and args.source_size >= 0):  # refused before the work, not after it
        raise DeepPhaseError(f"source-size: expected the source's standard deviation ≥ 0 in real-space pixels, "
                             f"got {args.source_size}")
    if args.libertem:
        return _remove_stale_figures(args.out, _reconstruct_with_libertem(args))
    notes = []
    data = load_scan(args.data, args.dataset, scan_shape=args.scan_shape)
    try:
        n_frames = data.frames.shape[0]
        truncated = data.info.get("truncated")
        if truncated:
            if data.scan_shape is not None:
                args.scan_shape = list(data.scan_shape)
            notes.append(f"{args.data} is truncated: {truncated.get('frames_in_file')} frames in the file; "
                         + (f"kept the {data.scan_shape[0]} complete scan rows" if data.scan_shape else "kept them all"))
        model = load_model(args.model)
        n = model.geometry.n_px
        pattern = tuple(data.frames.shape[1:])
        calibrating = args.calibration == "on" or (
            args.calibration == "auto" and pattern != (n, n) and min(pattern) >= n)
        if not calibrating:
            check_compatible(model, pattern)
        if data.scan_shape is not None and args.scan_shape is not None and \
                tuple(args.scan_shape) != tuple(data.scan_shape):
            raise DeepPhaseError(f"scan-shape: {args.scan_shape[0]}×{args.scan_shape[1]} given, but {args.data} holds "
                                 f"a {data.scan_shape[0]}×{data.scan_shape[1]} scan; drop --scan-shape (the data's own "
                                 "shape is used) or reshape the data")
        default_fastest = "col" if data.scan_shape is not None else "row"
        positions, scan_info = _positions_from_args(args, n_frames, data.scan_shape, default_fastest)
        if positions is None and data.positions is not None:
            if args.step is not None or args.rotation not in (0.0, "auto") or args.fastest is not None:
                raise DeepPhaseError(f"positions: {args.data} holds the scan's positions; --step, --rotation DEG and "
                                     "--fastest would be ignored: drop them, or give --scan-shape and --step to use a "
                                     "raster instead")
            positions, scan_info = data.positions, {"positions": "from the data file"}
        kind = data.kind if args.input == "auto" else args.input
        view, calibration = None, None
        shape = args.scan_shape or data.scan_shape
        step_from_file = (calibrating and shape is not None and args.step is None
                          and isinstance(data.info.get("scan_step_angstrom"), float))
        if positions is None and not step_from_file:
            if args.scan_shape is not None:
                raise DeepPhaseError("step: --scan-shape needs the raster's step as well (--step S, in real-space "
                                     "pixels of the model's grid)")
            raise DeepPhaseError(
                "positions: the data holds none; give --positions POS.npy or --scan-shape ROWS COLS --step S"
                + (" (the scan shape is known from the data: --step S is enough)" if data.scan_shape else "")
            )
        if calibrating:
            from .data.calibration import calibrate

            if kind is None:  # detector patterns are intensities, unless they are plainly square roots of counts
                kind = "amplitude" if looks_like_amplitudes(data.frames) else "counts"
            coords = positions if positions is not None else (
                raster_positions(tuple(shape), 1.0, 0.0 if args.rotation == "auto" else args.rotation,
                                 args.fastest or default_fastest)
                if shape is not None and shape[0] * shape[1] == n_frames else None)
            energy = args.energy if args.energy is not None else data.info.get("energy_kev")
            view, calibration = calibrate(
                data.frames, model, coords, kind=kind, gain=args.gain or 1.0, mrad_per_px=args.mrad_per_px,
                model_mrad_per_px=args.model_mrad_per_px, semi_angle=args.semi_angle, energy=energy,
                detector_sampling=data.info.get("detector_sampling"))
            pixel = calibration.get("real_space_sampling_angstrom")
            if positions is None and args.step is None and shape is not None and pixel and \
                    isinstance(data.info.get("scan_step_angstrom"), float):
                args.step = data.info["scan_step_angstrom"] / pixel
                positions, scan_info = _positions_from_args(args, n_frames, data.scan_shape, default_fastest)
                scan_info["step_from"] = (f"the file's scan step {data.info['scan_step_angstrom']:.4g} Å / the "
                                          f"calibrated pixel size {pixel:.4g} Å")
        if positions is None:
            raise DeepPhaseError(
                f"step: the file's scan step ({data.info['scan_step_angstrom']:.4g} Å) cannot be turned into pixels "
                "without the real-space pixel size; give --step S, or --energy KEV with --semi-angle MRAD or "
                "--mrad-per-px X"
            )
        check_spacing(positions, model.geometry)  # before the rotation and probe checks read the patterns
        if args.input == "counts" and looks_like_amplitudes(data.frames):
            notes.append("the patterns look like amplitudes (not whole numbers, their squares are), yet --input counts "
                         "reads them as counts; check it (--input amplitude, or leave --input to find it)")
        if view is not None and coords is not None and coords is not positions:
            view.use_coords(positions)  # the descan plane, fitted in scan indices, in position units
        if kind is None:
            kind = infer_kind(data.frames)
        amplitudes = view if view is not None else AmplitudeView(data.frames, kind)
        if args.flip_patterns:
            view, amplitudes = _flipped(view, amplitudes)
        rotation_figure = None  # what the DPC criterion saw, drawn once the image is written
        if args.rotation == "auto":
            positions, scan_info, rotation_figure = _find_rotation(args, amplitudes, view, scan_info, positions, model)
            if scan_info["rotation_found"]["flip_patterns"]:
                view, amplitudes = _flipped(view, amplitudes)
            # (the cluster's workers and the --resume fingerprint read it there)
            args.flip_patterns = args.flip_patterns or scan_info["rotation_found"]["flip_patterns"]
        elif (raster := _raster_of(scan_info, positions)) is not None:
            scan_info, rotation_figure = _check_rotation(amplitudes, scan_info, raster, model)
        scan_info["patterns_flipped"] = args.flip_patterns
        raster = _raster_of(scan_info, positions)  # (with the rotation found, after --rotation auto)
        if args.probe_check and raster is not None:
            scan_info = _check_probe(args, amplitudes, model, view, scan_info, raster, data.info)
        if model.probe_aware:
            model, scan_info = _tell_probe(model, scan_info)
        sampling = args.pixel_size or (calibration or {}).get("real_space_sampling_angstrom")
        if args.workers is not None or args.scheduler is not None:  # dask.distributed (see _reconstruct_on_cluster)
            rec = _reconstruct_on_cluster(args, positions, kind, view, model.info.get("told_coefficients_rad_per_px2"))
        else:
            if view is not None:
                view.reset_counters()  # (the rotation and probe checks read some frames already)
            try:
                rec = reconstruct(amplitudes, positions, model, stitching=args.stitching,
                                  batch_size=args.batch_size, device=args.device, sampling=args.pixel_size,
                                  precision=args.precision, uncertainty_samples=_dropout_samples(args.uncertainty),
                                  sigma_head=args.uncertainty == "head",
                                  chunk_size=args.chunk_size, checkpoint=partial, resume=args.resume,
                                  fingerprint=_data_fingerprint(args, kind, view), ensemble=_ensemble_members(args.ensemble, scan_info),
                                  sigma_scale=args.sigma_scale, engine=args.engine, deblur=_DEBLUR[args.deblur])
            except BaseException:  # an error, Ctrl-C or SIGTERM: keep the progress only if there is some
                if read_checkpoint(partial) is None:
                    shutil.rmtree(partial, ignore_errors=True)
                raise
        rec = with_source_divided_out(rec, args.source_size)
        if args.source_size and (note := _source_division_note(model)):
            notes.append(note)
        extra = {"command": "deepphase " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                 "data": str(args.data), "input": kind, "n_patterns": n_frames, "stitching": args.stitching,
                 "model_path": str(args.model or "default (packaged)"), **scan_info,
                 "data_info": data.info, "calibration": view.report() if view is not None else None}
        if data.truth is not None:
            r0, c0 = rec.origin_px
            truth = data.truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]]
            if truth.shape == rec.phase.shape:
                extra["correlation_with_truth"] = correlation(rec.phase, truth)
        write_outputs(rec, args.out, extra, sampling=sampling, overwrite=args.overwrite)
        shutil.rmtree(partial, ignore_errors=True)  # complete: the progress is no longer needed
        if rec.processing.get("dose_note"):
            notes.append(rec.processing["dose_note"])
        if view is not None:
            from .data.calibration import plot_calibration

            plot_calibration(view, figure)
            repairs = {k: v for k, v in view.counters.items() if v and k != "most_negative_count"}
            if repairs:
                notes.append("repaired: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in repairs.items()))
        if scan_info.get("probe_check", {}).get("note"):
            notes.append(_write_probe_estimate(args, scan_info["probe_check"], model))
        if scan_info.get("probe_aware", {}).get("note"):
            notes.append(scan_info["probe_aware"]["note"])
        if rotation_figure is not None:
            from .data.calibration import plot_scan_rotation

            plot_scan_rotation(**rotation_figure, path=args.out / "rotation.png")
            notes.append(f"what the DPC curl criterion saw: {args.out / 'rotation.png'}")
    finally:
        data.close()
    _remove_stale_figures(args.out, _figures_written(view is not None, rotation_figure is not None,
                                                     scan_info.get("probe_check", {}).get("note")))
    for note in notes:
        print(f"deepphase reconstruct: note: {note}", file=sys.stderr)
    msg = (f"phase image {rec.phase.shape[0]}×{rec.phase.shape[1]} written to {args.out}/phase.npy "
           f"({n_frames} patterns, {rec.timings['patterns_per_second']:.0f} patterns/s, stitching {rec.timings['stitch_s']:.2f} s)")
    if view is not None:
        msg += (f"; calibrated {pattern[0]}×{pattern[1]} → {n}×{n}: disk r = {calibration['radius_px']:.2f} px, "
                f"zoom {calibration['zoom']:.4f}, {calibration['masked_pixels']['count']} pixels masked "
                f"(see calibration.png)")
    if "correlation_with_truth" in extra:
        msg += f"; correlation with the truth {extra['correlation_with_truth']:.3f}"
    print(msg)


PARTIAL_FOLDER = ".deepphase-partial"
# What reconstruct writes beside the image when there is something to show.
_FIGURES = ("calibration.png", "rotation.png", "probe_estimate.npy", "probe_check.png")


def _figures_written(calibrated: bool, rotation: bool, probe_note) -> set:
    """Which of ``_FIGURES`` a reconstruction wrote: the calibration's, what the DPC criterion saw, the probe's."""
    return ({"calibration.png"} if calibrated else set()) | ({"rotation.png"} if rotation else set()) | (
        {"probe_estimate.npy", "probe_check.png"} if probe_note else set())


def _remove_stale_figures(out: Path, written: set) -> None:
    """After an --overwrite run: an earlier run's figures this one did not remake would contradict its metadata."""
    for name in set(_FIGURES) - written:
        if (out / name).exists():
            (out / name).unlink()


def _flipped(view, amplitudes):
    """--flip-patterns: detector patterns mirrored as they are resampled, model-grid ones about k = 0."""
    from .data.io import FlippedView

    if view is not None:
        view = view.flipped()
        return view, view
    return None, FlippedView(amplitudes)


def _sense(amplitudes, model, raster: dict) -> dict:
    """The scan's sense as the model's probe tells it, at ``raster``'s rotation and half a turn from it
    (:func:`deepphase.data.aberrations.scan_sense`), or why it was not asked."""
    from .data.aberrations import PROBE_CHECK_MIN_PX, scan_sense
    from .errors import ShapeError, ValueRangeError

    if min(raster["scan_shape"]) < PROBE_CHECK_MIN_PX:
        return {"skipped": f"fewer than {PROBE_CHECK_MIN_PX} positions a side"}
    try:
        return scan_sense(amplitudes, tuple(raster["scan_shape"]), model.probe, raster["step_px"],
                          raster["rotation_deg"], raster["fastest"])
    except (ValueRangeError, ShapeError) as exc:  # NaN/Inf (the reconstruction names the frame), a coarse step
        return {"skipped": str(exc)}


def _find_rotation(args, amplitudes, view, scan_info: dict, positions, model):
    """``--rotation auto``: the scan rotation from the patterns (DPC curl criterion), then the positions; and the
    detector's handedness, unless --flip-patterns gave it (``amplitudes`` are then flipped already)."""
    from .data.calibration import centre_of_mass_block, check_scan_rotation, find_scan_rotation, with_sense
    from .physics.scan import raster_positions

    raster = _raster_of(scan_info, positions)
    if raster is None:
        raise DeepPhaseError("rotation: 'auto' needs a raster (--scan-shape and --step, a file that holds the scan "
                             "shape, or positions that form one), not positions off a regular grid")
    scan_info = {**scan_info, **raster}  # (a raster read from positions: they are made again at the angle found)
    shape, fastest = tuple(scan_info["scan_shape"]), scan_info["fastest"]
    com, noise = centre_of_mass_block(amplitudes, shape, fastest)
    found = find_scan_rotation(com, handedness="as recorded" if args.flip_patterns else "auto", noise=noise)
    found = with_sense(found, _sense(_flipped(view, amplitudes)[1] if found["flip_patterns"] else amplitudes,
                                     model, {**scan_info, "rotation_deg": found["rotation_deg"]}))
    check_scan_rotation(found)
    positions = raster_positions(shape, scan_info["step_px"], found["rotation_deg"], fastest)
    if view is not None:
        view.use_coords(positions)  # the descan plane, re-expressed in the rotated positions
    _report_rotation(found, found["flip_patterns"])
    figure = {"com": com, "noise": noise, "found": found}
    return positions, {**scan_info, "rotation_deg": found["rotation_deg"], "rotation_found": found}, figure


def _raster_of(scan_info: dict, positions) -> dict | None:
    """The raster the scan was made on: from --scan-shape/--step (or the file's shape), or found in positions
    read from a file (:func:`deepphase.physics.raster_from_positions`); None for positions that are not one."""
    if "scan_shape" in scan_info:
        return {key: scan_info[key] for key in ("scan_shape", "step_px", "rotation_deg", "fastest")}
    if "raster_from_positions" not in scan_info:
        from .physics.scan import raster_from_positions

        scan_info["raster_from_positions"] = raster_from_positions(positions) if positions is not None else None
    return scan_info["raster_from_positions"]


def _check_rotation(amplitudes, scan_info: dict, raster: dict, model):
    """The raster's rotation (the default 0° included) checked by the DPC curl criterion: a note when the data
    clearly say otherwise (a mirrored detector, an angle more than 20° away, or half a turn, which the model's
    probe is asked to confirm), which would make a poor image; then also what the criterion saw, for
    rotation.png."""
    from .data.calibration import ROTATION_CHECK_BLOCK, ROTATION_CHECK_MIN_PX, centre_of_mass_block, \
        find_scan_rotation, on_the_given_axis, rotation_note, with_sense

    if min(raster["scan_shape"]) < ROTATION_CHECK_MIN_PX:
        return scan_info, None
    com, noise = centre_of_mass_block(amplitudes, tuple(raster["scan_shape"]), raster["fastest"],
                                      ROTATION_CHECK_BLOCK)
    given = raster["rotation_deg"]
    if not (np.all(np.isfinite(com)) and np.all(np.isfinite(noise))):
        return scan_info, None  # NaN/Inf or empty patterns: the reconstruction names the frame
    found = find_scan_rotation(com, given_deg=given, noise=noise)
    if on_the_given_axis(found, given):  # which way round: the probe's say-so, where it has one, not the skew's
        found = with_sense(found, _sense(amplitudes, model, {**raster, "rotation_deg": found["rotation_deg"]}))
    note = rotation_note(found, given)
    if note:
        print(f"deepphase reconstruct: note: {note}", file=sys.stderr)
    figure = {"com": com, "noise": noise, "found": found, "given_deg": given} if note else None
    return {**scan_info, "rotation_check": {**found, "note": note}}, figure


def _check_probe(args, amplitudes, model, view, scan_info: dict, raster: dict, data_info: dict):
    """The data's probe against the model's (defocus and astigmatism, :mod:`deepphase.data.aberrations`), on the
    central positions of a raster: ``probe_check`` in the metadata (with a note when they clearly differ)."""
    from .data.aberrations import PROBE_CHECK_MIN_PX, measure_probe_mismatch, probe_check_report
    from .errors import ShapeError, ValueRangeError

    if min(raster["scan_shape"]) < PROBE_CHECK_MIN_PX:
        return scan_info
    t0 = time.perf_counter()
    try:
        found = measure_probe_mismatch(amplitudes, tuple(raster["scan_shape"]), model.probe, raster["step_px"],
                                       raster["rotation_deg"], raster["fastest"])
    except (ValueRangeError, ShapeError) as exc:  # NaN/Inf (the reconstruction names the frame), too few frequencies
        return {**scan_info, "probe_check": {"skipped": str(exc)}}
    check = probe_check_report(found, model, view.info if view is not None else None, args.semi_angle,
                               args.energy or data_info.get("energy_kev"),
                               (scan_info.get("rotation_check") or {}).get("note"))
    return {**scan_info, "probe_check": {**check, "wall_s": round(time.perf_counter() - t0, 3)}}


def _tell_probe(model, scan_info: dict):
    """A probe-aware model told the difference the probe check measured (:func:`told_to_probe_aware`), and
    ``probe_aware`` for the metadata."""
    from .data.aberrations import told_to_probe_aware

    info = told_to_probe_aware(model, scan_info.get("probe_check"))
    return model.told(info["told_coefficients_rad_per_px2"]), {**scan_info, "probe_aware": info}


def _source_division_note(model) -> str | None:
    """What to say when ``--source-size`` divides the source out of the image of a model trained with one."""
    trained_with = (model.info.get("training") or {}).get("source_size_px")
    if not trained_with:
        return None
    return (f"the model was trained on patterns with a finite source ({trained_with} px); dividing the source out of "
            "its image as well over-sharpens it (RESULTS.md §38): drop --source-size")


def _ensemble_members(paths, scan_info: dict) -> list:
    """The ``--ensemble`` models, each probe-aware one told what the probe check measured, as the main model is."""
    from .models.modelfile import load_model

    members = [load_model(path) for path in paths or ()]
    return [_tell_probe(m, scan_info)[0] if m.probe_aware else m for m in members]


def _write_probe_estimate(args, check: dict, model) -> str:
    """For a probe check with a note: ``probe_estimate.npy`` (the model's probe with the difference found) and
    ``probe_check.png`` in the output folder; returns the note to print, with what to do about it (nothing but
    look, for a probe-aware model that was told it)."""
    from .data.aberrations import add_aberrations, plot_probe_mismatch, probe_difference
    from .io_utils import save_npy
    from .models.modelfile import load_model

    estimate = args.out / "probe_estimate.npy"
    save_npy(estimate, add_aberrations(model.probe, check["coefficients"]))
    plot_probe_mismatch(check, args.out / "probe_check.png")
    if model.probe_aware:
        return (f"{probe_difference(check, check['model_mrad_per_px'], check['energy_kev'])} (see "
                f"{args.out / 'probe_check.png'}); the probe-aware model was told this difference (trained for up to "
                f"±{model.aberration_range:g} rad)")
    like = shlex.quote(args.model) if args.model else "default"
    aware = load_model("probe-aware")
    other = (f"reconstruct with --model probe-aware, which is told the difference (RESULTS §37)"
             if model.probe.shape == aware.probe.shape and np.allclose(model.probe, aware.probe) else
             f"train one that is told the data's probe: 'deepphase train --like {like} --probe-aware 2 --out MODEL'")
    return (f"{check['note']} (see {args.out / 'probe_check.png'}): {estimate} is the model's probe with that "
            f"difference; 'deepphase train --like {like} --probe {estimate} --out MODEL' trains a model for it with "
            f"the model's recipe (the default's: about 7 min on 2 CPU cores); or {other}")


def _report_rotation(found: dict, flipped_by_search: bool) -> None:
    """What --rotation auto found, on stderr; and, when the search flipped the patterns, a note saying why."""
    print(f"deepphase reconstruct: scan rotation {found['rotation_deg']:.2f}° (DPC curl criterion on the central "
          f"{found['block'][0]}×{found['block'][1]} positions; curl ratio {found['curl_ratio']:.3f})", file=sys.stderr)
    if flipped_by_search:
        print("deepphase reconstruct: note: the patterns are mirrored against the scan (a detector whose rows run "
              "the other way, or the scan's rows and columns swapped: check --fastest) (curl ratio "
              f"{found['curl_ratio_other']:.2f} as recorded); patterns flipped (--flip-patterns)", file=sys.stderr)


def _data_fingerprint(args, kind: str, view) -> dict:
    """What must not change between an interrupted reconstruction and its ``--resume``."""
    import hashlib
    import json

    stat = Path(args.data).stat()
    # The calibration as measured and as asked for (gain, angles, energy...): it shapes the network's input.
    calibration = json.dumps(view.info, sort_keys=True, default=str) if view is not None else ""
    return {"data": str(Path(args.data).resolve()), "data_bytes": stat.st_size, "data_mtime_ns": stat.st_mtime_ns,
            "dataset": args.dataset, "input": kind, "calibrated": view is not None,
            "patterns_flipped": args.flip_patterns,
            "calibration_sha256": hashlib.sha256(calibration.encode()).hexdigest(), "batch_size": args.batch_size}


def _reconstruct_on_cluster(args, positions, kind, view, told=None):
    """``reconstruct --workers N`` / ``--scheduler ADDRESS``: the prediction spread over a dask cluster."""
    import functools

    from .reconstruction.distributed import open_client, reconstruct_distributed

    transform = None
    if view is not None:
        from .data.calibration import CalibratedView

        # The calibration measured here (with the flip, if any) travels to the workers; each applies it to the
        # frames it reads.
        transform = functools.partial(CalibratedView, info=view.info, arrays=view.arrays, coords=view.coords,
                                      what=view.what)
    elif args.flip_patterns:
        transform = functools.partial(_flipped_amplitudes, kind=kind)
    with open_client(args.workers, args.scheduler) as client:
        return reconstruct_distributed(args.data, positions, args.model, client, args.tile_size, dataset=args.dataset,
                                       scan_shape=args.scan_shape, kind=kind, transform=transform,
                                       stitching=args.stitching, batch_size=args.batch_size,
                                       device=args.device, sampling=args.pixel_size,
                                       uncertainty_samples=_dropout_samples(args.uncertainty),
                                       sigma_head=args.uncertainty == "head", precision=args.precision,
                                       sigma_scale=args.sigma_scale, deblur=_DEBLUR[args.deblur], told=told)


def _flipped_amplitudes(frames, kind: str):
    """A cluster worker's view of model-grid frames with --flip-patterns (module level: it travels pickled)."""
    from .data.io import AmplitudeView, FlippedView

    return FlippedView(AmplitudeView(frames, kind))


def _reconstruct_with_libertem(args) -> set:
    """``reconstruct --libertem``: the file opened by LiberTEM, predicted and stitched on its executor; returns the
    figures it wrote (:func:`_figures_written`)."""
    try:
        from .reconstruction.libertem_udf import LIBERTEM_EXTRA, reconstruct_file
        import libertem.api  # noqa: F401
    except ImportError as exc:
        raise DeepPhaseError(f"libertem: --libertem needs LiberTEM ({exc}); install it with `{LIBERTEM_EXTRA}`") from exc
    from .reconstruction.pipeline import with_source_divided_out, write_outputs

    refused = [name for name, given in (
        (f"--uncertainty {args.uncertainty}", args.uncertainty not in (0, "head")), ("--ensemble", bool(args.ensemble)),
        ("--resume", args.resume),
        ("--scheduler", args.scheduler is not None), ("--dataset", args.dataset is not None),
        (f"--stitching {args.stitching}", args.stitching != "pairwise"),
        (f"--device {args.device}", args.device != "auto")) if given]
    if refused:
        raise DeepPhaseError(f"libertem: {', '.join(refused)} not available with --libertem (LiberTEM's workers run "
                             "the pairwise stitcher's reductions and choose the device); drop --libertem for them")
    positions = None
    if args.positions is not None:
        positions, _ = _positions_from_args(args, None)
    elif args.step is None:
        raise DeepPhaseError("step: give the raster's --step S in pixels (the scan shape comes from the file, or "
                             "--scan-shape ROWS COLS), or --positions POS.npy")
    options = {k: v for k, v in (("gain", args.gain), ("mrad_per_px", args.mrad_per_px),
                                 ("model_mrad_per_px", args.model_mrad_per_px), ("semi_angle", args.semi_angle),
                                 ("energy", args.energy)) if v is not None}
    args.out.mkdir(parents=True, exist_ok=True)
    rec, read = reconstruct_file(
        args.data, model=args.model, step_px=args.step if positions is None else None, positions=positions,
        nav_shape=args.scan_shape, rotation_deg=args.rotation, fastest=args.fastest or "col",
        kind=None if args.input == "auto" else args.input, calibration=args.calibration, calibration_options=options,
        calibration_png=args.out / "calibration.png", rotation_png=args.out / "rotation.png",
        batch_size=args.batch_size, engine=args.engine,
        precision=args.precision, deblur=_DEBLUR[args.deblur], workers=args.workers, progress=sys.stderr.isatty(),
        uncertainty="head" if args.uncertainty == "head" else None, probe_check=args.probe_check,
        flip_patterns=True if args.flip_patterns else (None if args.rotation == "auto" else False))
    scan = ({"positions_file": str(args.positions)} if positions is not None else
            {"scan_shape": read["navigation_shape"] if (args.fastest or "col") == "col" else read["navigation_shape"][::-1],
             "step_px": args.step, "rotation_deg": read["rotation_deg"], "fastest": args.fastest or "col",
             **{k: read[k] for k in ("rotation_found", "rotation_check", "probe_check", "probe_aware") if k in read}})
    extra = {"command": "deepphase " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "data": str(args.data),
             "input": read["input"], "n_patterns": rec.processing["patterns"], "stitching": "pairwise",
             "model_path": str(args.model or "default (packaged)"), **scan,
             "patterns_flipped": read["patterns_flipped"], "data_info": read, "calibration": read["calibration"]}
    sampling = args.pixel_size or (read["calibration"] or {}).get("real_space_sampling_angstrom")
    rec = with_source_divided_out(rec, args.source_size)
    write_outputs(rec, args.out, extra, sampling=sampling, overwrite=args.overwrite)
    if args.source_size:
        from .models.modelfile import load_model

        if note := _source_division_note(load_model(args.model or "default")):
            print(f"deepphase reconstruct: note: {note}", file=sys.stderr)
    if rec.processing.get("dose_note"):
        print(f"deepphase reconstruct: note: {rec.processing['dose_note']}", file=sys.stderr)
    if "rotation_found" in read:
        _report_rotation(read["rotation_found"], read["patterns_flipped"] and not args.flip_patterns)
    if (read.get("rotation_check") or {}).get("note"):
        print(f"deepphase reconstruct: note: {read['rotation_check']['note']}", file=sys.stderr)
    if read["rotation_png"]:
        print(f"deepphase reconstruct: note: what the DPC curl criterion saw: {read['rotation_png']}", file=sys.stderr)
    if (read.get("probe_check") or {}).get("note"):
        from .models.modelfile import load_model

        print(f"deepphase reconstruct: note: {_write_probe_estimate(args, read['probe_check'], load_model(args.model))}",
              file=sys.stderr)
    if (read.get("probe_aware") or {}).get("note"):
        print(f"deepphase reconstruct: note: {read['probe_aware']['note']}", file=sys.stderr)
    print(f"phase image {rec.phase.shape[0]}×{rec.phase.shape[1]} written to {args.out}/phase.npy "
          f"({rec.processing['patterns']} patterns read by {read['reader']} as {read['libertem_dataset']}, "
          f"{rec.timings['patterns_per_second']:.0f} patterns/s)"
          + (f"; calibrated {read['pattern_shape'][0]}×{read['pattern_shape'][1]} (see calibration.png)"
             if read["calibration"] else ""))
    return _figures_written(read["calibration"] is not None, bool(read["rotation_png"]),
                            (read.get("probe_check") or {}).get("note"))


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


def _dropout_samples(value) -> int:
    return 0 if value == "head" else int(value)


def _cmd_calibrate_uncertainty(args) -> None:
    from .io_utils import check_writable
    from .models.modelfile import load_model
    from .models.registry import has_sigma_head
    from .reconstruction.uncertainty import fit_sigma_scale, save_sigma_scale

    folder = Path(args.model).parent if Path(args.model).name == "model.json" else Path(args.model)
    if not (folder / "model.json").exists():
        from .models.modelfile import packaged_models

        why = (" (the packaged models are calibrated already)" if args.model in packaged_models()
               else " (no such folder)" if not folder.exists() else "")
        raise DeepPhaseError(f"model: expected a model folder with a model.json, got {args.model!r}{why}")
    args.model = str(folder)
    check_writable(folder / "model.json", "model", folder=False)
    model = load_model(args.model)
    method = args.method if args.method != "auto" else ("head" if has_sigma_head(model.network) else "dropout")
    result = fit_sigma_scale(model, n_scans=args.scans, side=args.side, samples=args.samples, seed=args.seed,
                             method=method)
    save_sigma_scale(args.model, result)
    what = "the σ head's σ" if method == "head" else "Monte Carlo dropout σ"
    print(f"{what} × {result['sigma_scale']:.3g} covers 68 % of the error on {args.scans} simulated scans "
          f"(raw σ covered {100 * result['within_1sigma_raw']:.1f} % within ±1σ; scaled, "
          f"{100 * result['within_2sigma_scaled']:.1f} % within ±2σ); stored in {args.model}/model.json")


def _cmd_export_onnx(args) -> None:
    from .models.modelfile import load_model
    from .models.registry import has_sigma_head
    from .reconstruction.engines import export_onnx

    if args.out.exists() and not args.overwrite:
        raise DeepPhaseError(f"out: {str(args.out)!r} exists; choose another name or pass --overwrite")
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:  # onnx for torch's exporter, onnxruntime for the check before writing
        raise DeepPhaseError(f"export-onnx needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                             "not installed: pip install 'deepphase[onnx]'")
    model = load_model(args.model)
    path = export_onnx(model, args.out, overwrite=args.overwrite)
    n, c, out = model.geometry.n_px, model.in_channels, model.geometry.output_px
    sigma = has_sigma_head(model.network)
    inputs = ("diffraction amplitudes (√counts)" if c == 1 else
              "diffraction amplitudes (√counts) of each position's 3×3 neighbourhood, in the order of "
              "deepphase.data.stream.neighbourhood_offsets (channel 4: the position itself)")
    outputs = "phase (rad), then the σ head's log error scale" if sigma else "phase (rad)"
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)\n"
          f"  input 'x': (batch, {c}, {n}, {n}) float32 {inputs}\n"
          f"  output 'y': (batch, {2 if sigma else 1}, {out}, {out}) {outputs}\n"
          "  as reconstruct does, remove each phase patch's mean inside the illuminated mask before stitching")


def _cmd_demo(args) -> None:
    from .evaluation.demo import run_demo

    meta = run_demo(args.out, specimen=args.specimen, stitching=args.stitching)
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
                raise DeepPhaseError(f"{option}: expected NAME=MODEL_FOLDER, got {item!r}")
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
        methods = list(dict.fromkeys(methods))
    rows, table = harness.evaluate(args.preset, args.out, methods=methods, specimens=args.specimens,
                                   doses=args.doses, scan_shape=args.scan_shape, seed=args.seed,
                                   overwrite=args.overwrite, forward=args.forward, cache_dir=args.cache_dir,
                                   repeats=args.repeats, divide_source=args.divide_source,
                                   source_size_px=args.source_size)
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
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
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
    src.add_argument("--object", type=Path, help="phase image: .npy in rad, or an image file scaled to --phase-max")
    from .data.specimens import BUILTIN_SPECIMENS

    src.add_argument("--specimen", default="twisted-hbn", choices=BUILTIN_SPECIMENS, help="built-in specimen")
    p.add_argument("--phase-max", type=_finite,
                   help="phase of the brightest pixel (rad): scales an image file to 0..MAX (default 1), or a .npy "
                        "(default: its radians as they are)")
    _add_probe_arguments(p)
    _add_scan_arguments(p, required=False)
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
    p.add_argument("--out", required=True, type=Path, help="output .npz")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("reconstruct", help="reconstruct a phase image from a 4D-STEM scan",
                       description="Predict a phase patch for every pattern and stitch them into one phase image. "
                                   "Writes OUT/phase.npy (float32, rad), the same as phase.tif (ImageJ) and phase.emd (EMD 1.0), "
                                   "OUT/phase.png and OUT/metadata.json. "
                                   "Detector patterns that are not the model's n×n grid are calibrated first "
                                   "(bright-field disk, descan, angular sampling, hot/dead pixels; "
                                   "OUT/calibration.png shows it).")
    p.add_argument("data", type=Path,
                   help=".npy (N,k,k) or (R,C,k,k), .npz from 'deepphase simulate', HDF5/EMD 1.0 (py4DSTEM), zarr; "
                        "with 'pip install deepphase[files]': Merlin .mib, EMPAD .xml, Gatan .dm4/.dm3, .blo")
    p.add_argument("--dataset", help="dataset (or EMD group) path inside an HDF5 or zarr file")
    p.add_argument("--model", help="a packaged model's name (default, neighbourhood, probe-aware, seed-unet, ...) or a "
                                   "model folder (default: the packaged default)")
    _add_scan_arguments(p, required=True)
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
    p.add_argument("--pixel-size", type=_positive, help="real-space pixel size in Å (for the scale bar and checks)")
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
                        "pip install deepphase[onnx])")
    p.add_argument("--ensemble", nargs="+", metavar="FOLDER",
                   help="further models for the same probe: the image is the mean of all, and uncertainty.npy their "
                        "per-pixel spread (instead of --uncertainty)")
    p.add_argument("--sigma-scale", type=_positive, metavar="K",
                   help="multiply the uncertainty by K (default: the factor fitted for the model by "
                        "'deepphase calibrate-uncertainty', else 1)")
    p.add_argument("--device", default="auto", help="'auto' (a GPU if there is one), 'cpu' or 'cuda'")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--chunk-size", type=_count, default=16384, metavar="P",
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
    g.add_argument("--tile-size", type=_count, default=4096, metavar="P", help="patterns per task (default 4096)")
    g.add_argument("--libertem", action="store_true",
                   help="open DATA with LiberTEM instead (every format it reads: K2IS, Frms6, TVIPS, SEQ, MRC, Merlin, "
                        "raw, ...; --scan-shape where the file does not say) and reconstruct on LiberTEM's workers "
                        "(--workers N: N local processes; default all cores). Frames in LiberTEM's order: --fastest "
                        "defaults to col. Pairwise stitching; --uncertainty head and --rotation auto, but no dropout "
                        "samples, --ensemble or --resume. "
                        "pip install deepphase[libertem]")
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
    p.add_argument("--seed", type=int, default=20261125)
    p.set_defaults(func=_cmd_calibrate_uncertainty)

    p = sub.add_parser("export-onnx", help="write a model's network as an ONNX file, for ONNX Runtime or a pipeline "
                                           "of your own",
                       description="Exports the network (batch norms folded, batch axis dynamic) and checks the export "
                                   "against the weights before writing it. Written into a model folder as model.onnx, "
                                   "it is what reconstruct's onnx engine uses for that model.")
    p.add_argument("--model", default="default", help="packaged model name or model folder (default: default)")
    p.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_cmd_export_onnx)

    p = sub.add_parser("demo", help="the whole pipeline on a built-in specimen with the packaged model",
                       description="Simulate a built-in specimen at the paper's step and dose, reconstruct it with "
                                   "the packaged model and print the correlation with the truth.")
    p.add_argument("--out", type=Path, default=Path("deepphase-demo"), help="output folder (default deepphase-demo)")
    p.add_argument("--specimen", default="twisted-hbn", choices=BUILTIN_SPECIMENS)
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
    p.add_argument("--cache-dir", type=Path, help="folder for simulated multislice data (default: multislice/ in ~/.cache/deepphase, or in "
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
    p.add_argument("--out", type=Path, default=Path("deepphase-evaluation"), help="report folder")
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


def _without(tokens: list[str], options: dict) -> list[str]:
    out, skip = [], 0
    for token in tokens:
        if skip:
            skip -= 1
            continue
        name = token.split("=", 1)[0]
        if name in options:
            skip = options[name] if "=" not in token else 0
            continue
        out.append(token)
    return out


def _like_arguments(parser: argparse.ArgumentParser, args, argv: list[str]):
    """``train --like MODEL``: the model's recorded training options, then the command's own (the last wins)."""
    from .models.modelfile import load_model

    model = load_model(args.like)
    recorded = ((getattr(model, "info", None) or {}).get("training") or {}).get("command")
    if not recorded:
        raise DeepPhaseError(f"like: model {args.like!r} records no training command to take the recipe from")
    tokens = shlex.split(recorded)
    if tokens[:2] != ["deepphase", "train"]:
        raise DeepPhaseError(f"like: model {args.like!r} records {recorded!r}, not a 'deepphase train' command")
    own = argv[argv.index("train") + 1 :]
    expanded = ["train"] + _without(tokens[2:], _NOT_LIKE) + _without(own, {"--like": 1})
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
    except SystemExit as exc:  # --help, --version, or a malformed option (one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        # A batch system's kill is a SIGTERM: handled like Ctrl-C, so a reconstruction saves its progress.
        signal.signal(signal.SIGTERM, _terminate)
    new_folder = None  # an --out folder this run makes: removed again if the run fails and leaves it empty
    try:
        if getattr(args, "like", None):
            args = _like_arguments(parser, args, argv)
        if args.command in _WRITES:  # an unwritable output is found before the work, not after it
            from .io_utils import check_writable

            check_writable(args.out, folder=_WRITES[args.command])
            new_folder = None if args.out.exists() or not _WRITES[args.command] else args.out
        args.func(args)
        new_folder = None
    except DeepPhaseError as exc:
        print(f"deepphase {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not a file the user named or must fix: a defect, shown in full
            raise
        print(f"deepphase {args.command}: error: {str(exc.filename)!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"deepphase {args.command}: {exc or 'interrupted'}; completed outputs are intact", file=sys.stderr)
        return 130
    finally:
        if new_folder is not None and new_folder.is_dir() and not any(new_folder.iterdir()):
            new_folder.rmdir()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum, frame):
    raise KeyboardInterrupt("terminated (SIGTERM)")


if __name__ == "__main__":
    sys.exit(main())
