"""Distributed training entry point: ``torchrun --nproc-per-node N -m deepphase.train ARGS``.

``ARGS`` are those of ``deepphase train`` (the same parser). torchrun starts one process per GPU (or
N CPU processes) with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set; :func:`deepphase.training.loop.train`
reads them, joins the process group and trains with DistributedDataParallel; rank 0 writes the model
folder. ``deepphase train --nproc N`` does the same on one machine by calling torchrun's own entry
point (:func:`launch`); several machines: ``torchrun --nnodes M --rdzv-backend c10d --rdzv-endpoint
HOST:PORT ...`` (see README, "Scaling up").
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

from .errors import DeepPhaseError
from .io_utils import LOCK_HELD_FOR_US, folder_lock
from .wording import speaking_to_the_command_line

# Set by `deepphase train --nproc N` for its processes: the command recorded in model.json.
COMMAND_ENV = "DEEPPHASE_TRAIN_COMMAND"


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train`` sub-parser of the ``deepphase`` parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["train"]
    raise RuntimeError("the deepphase parser has no 'train' command")


def train_argv(args: argparse.Namespace, skip: tuple[str, ...] = ("nproc",)) -> list[str]:
    """Command-line arguments that make ``deepphase train`` parse to ``args`` again (minus ``skip``)."""
    from .cli import build_parser

    argv: list[str] = []
    for action in _train_parser(build_parser())._actions:
        if not action.option_strings or action.dest in ("help", *skip) or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value is None or value == action.default:
            continue
        option = max(action.option_strings, key=len)
        if action.nargs == 0:  # a flag
            if value:
                argv.append(option)
        elif isinstance(value, (list, tuple)):
            argv += [option, *map(str, value)]
        else:
            argv += [option, str(value)]
    return argv


def launch(args: argparse.Namespace, command: str) -> None:
    """Run ``deepphase train`` with ``args.nproc`` processes on this machine through torchrun.

    torchrun's Python entry point (``torch.distributed.run``) starts the processes, each of them
    ``python -m deepphase.train`` with the same arguments, on a free local port (``--standalone``). A
    configuration the processes would refuse is refused here first, with one message.
    """
    from .training.loop import check_batch_split, check_out_dir

    nproc = int(args.nproc)
    if nproc < 1:
        raise DeepPhaseError(f"nproc: expected a positive number of processes, got {nproc}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DeepPhaseError("nproc: this process was itself started by torchrun; leave --nproc out "
                             "(torchrun's --nproc-per-node sets the number of processes)")
    check_batch_split(args.batch_size, nproc)
    import torch

    if args.device != "cpu" and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise DeepPhaseError(f"nproc: {nproc} processes need {nproc} GPUs (one each), but {torch.cuda.device_count()} "
                             "are visible; use fewer processes, or --device cpu")
    check_out_dir(args.out, args.resume, args.overwrite)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    torchrun_args = ["--standalone", "--nproc-per-node", str(nproc), "-m", "deepphase.train", *train_argv(args)]
    previous = {name: os.environ.get(name) for name in (COMMAND_ENV, LOCK_HELD_FOR_US, "OMP_NUM_THREADS")}
    with folder_lock(args.out), _torchrun_warnings_quiet():  # (this process holds the folder for its ranks: a Ctrl-C stops them before it lets go)
        os.environ[LOCK_HELD_FOR_US] = str(Path(args.out).resolve())
        os.environ[COMMAND_ENV] = command
        # torchrun gives every process one thread when this is unset (and warns so): the machine's cores
        # shared out instead, so that --nproc 2 on a 16-core machine does not idle 14 of them.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        try:
            run(parse_args(torchrun_args))
        except SignalException as exc:
            # torchrun's own handlers take Ctrl-C and SIGTERM while it runs (and stop the processes): said as the
            # command says an interrupt, with the --resume its checkpoint allows, not as torchrun's traceback.
            raise KeyboardInterrupt("interrupted" if exc.sigval == signal.SIGINT else
                                    f"terminated ({exc.sigval.name})") from None
        except ChildFailedError as exc:
            codes = sorted({f.exitcode for f in exc.failures.values()})
            raise DeepPhaseError(
                f"nproc: {len(exc.failures)} of the {nproc} training processes failed (exit status "
                f"{', '.join(map(str, codes))}); their messages are above"
            ) from None
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@contextlib.contextmanager
def _torchrun_warnings_quiet():
    """torchrun's agent logs its own handling of a Ctrl-C (a death signal, closing signals to each process) as
    warnings above deepphase's one line that says what happened and how to resume; quiet at WARNING level
    unless the user asked torchrun for its logs (its LOGLEVEL)."""
    if "LOGLEVEL" in os.environ:
        yield
        return
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch.distributed")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.ERROR))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Parse ``deepphase train`` arguments and train (in each process that torchrun started)."""
    from .cli import build_parser

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(["train", *argv])
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    args.command_line = os.environ.get(COMMAND_ENV) or (
        (f"torchrun (world size {world}) " if world > 1 else "python ") + "-m deepphase.train "
        + " ".join(shlex.quote(a) for a in argv))
    try:
        with speaking_to_the_command_line():
            args.func(args)
    except DeepPhaseError as exc:
        if rank == 0 or not getattr(exc, "reported_by_rank0", False):
            where = f" [rank {rank}/{world}]" if world > 1 and rank != 0 else ""
            print(f"deepphase train{where}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if rank == 0 and COMMAND_ENV not in os.environ:  # (under `deepphase train --nproc`, the launcher says it)
            print("deepphase train: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
