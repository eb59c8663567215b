"""Messages in the caller's words: ``--step auto`` on the command line, ``step_px='auto'`` from Python.

Every error and note is written once, in ``deepphase``'s options, since most reach users through the command.
A call from Python into one of the package's entry points (:func:`in_callers_words`) gets them in that
function's keywords instead: the command sets :func:`speaking_to_the_command_line` first, so only the outermost
call from Python rewords, with its own keywords (``overwrite=True`` for ``--overwrite``; ``config.lr`` for
:func:`~deepphase.training.loop.train`'s ``--lr``). Options a function has no keyword for, and command lines
quoted whole (```deepphase train --dose MIN MAX```, one to type), are left as they are.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
from pathlib import Path

from .errors import DeepPhaseError

#: The command's options as keywords (a pair: a switch's keyword and the value it sets). An entry point adds or
#: replaces its own (:func:`in_callers_words`); an option in neither is left as an option.
KEYWORD_OF_OPTION = {
    "dataset": "dataset", "model": "model", "input": "kind", "stitching": "stitching",
    "source-size": "source_size_px", "deblur": "deblur", "pixel-size": "sampling", "batch-size": "batch_size",
    "precision": "precision", "uncertainty": "uncertainty", "engine": "engine", "ensemble": "ensemble",
    "sigma-scale": "sigma_scale", "device": "device", "out": "out", "overwrite": ("overwrite", True),
    "chunk-size": "chunk_size", "resume": ("resume", True), "positions": "positions", "scan-shape": "scan_shape",
    "step": "step_px", "rotation": "rotation_deg", "fastest": "fastest", "no-calibration": ("calibration", "off"),
    "calibrate": ("calibration", "on"), "semi-angle": "semi_angle", "energy": "energy",
    "mrad-per-px": "mrad_per_px", "model-mrad-per-px": "model_mrad_per_px", "gain": "gain",
    "no-probe-check": ("probe_check", False), "flip-patterns": ("flip_patterns", True), "workers": "workers",
    "scheduler": "scheduler", "tile-size": "tile_size", "libertem": ("libertem", True),
}

#: The values of the command's choices, which a message may give after an option (``--input counts``).
_CHOICES = ("auto", "counts", "amplitude", "row", "col", "head", "pairwise", "least-squares", "seed", "on", "off",
            "float32", "bfloat16", "float16", "eager", "channels-last", "compile", "cuda-graphs", "onnx", "cpu", "cuda",
            "mps", "xpu", "compact", "compact-rep", "unet-small", "seed-unet")

#: Who the messages are for: None until an entry point or the command says; "command line", or the keywords of the
#: entry point called from Python.
_AUDIENCE: contextvars.ContextVar[str | dict | None] = contextvars.ContextVar("deepphase_audience", default=None)


@contextlib.contextmanager
def speaking_to_the_command_line():
    """Within it, messages keep the command's options (the entry points called from the command leave them)."""
    token = _AUDIENCE.set("command line")
    try:
        yield
    finally:
        _AUDIENCE.reset(token)


def in_callers_terms(message: str) -> str:
    """``message`` as the caller reads it: as written on the command line, else in the keywords of the entry point
    called from Python (:func:`in_api_words`)."""
    audience = _AUDIENCE.get()
    return message if audience == "command line" else in_api_words(message, audience)


def in_fields_of(message: str, fields: dict) -> str:
    """A settings object's refusal (written in the command's options) as its maker reads it: as written when the
    command or an entry point made it (an entry point rewords on the way out, in its own keywords), else in
    ``fields`` (option → field: ``TrainConfig(batch_size=1)`` reads ``batch_size:``, ``deepphase train
    --batch-size 1`` reads ``batch-size:``)."""
    return message if _AUDIENCE.get() is not None else in_api_words(message, fields)


def note_to_caller(message: str) -> None:
    """Warn of ``message`` (a :class:`~deepphase.errors.DeepPhaseNote`) in the caller's terms, pointed at the
    first frame outside the package: the user's call."""
    import sys
    import warnings

    from .errors import DeepPhaseNote

    package = str(Path(__file__).resolve().parent) + os.sep  # (not a user's deepphase_runs/ beside it)
    frame, level = sys._getframe(1), 2  # (level 2: this function's caller)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(in_callers_terms(message), DeepPhaseNote, stacklevel=level)


def in_api_words(message: str, keywords: dict | None = None) -> str:
    """A message written for the command in a Python call's terms: ``--step auto`` → ``step_px='auto'``,
    ``--step S`` → ``step_px=S``, ``--scan-shape ROWS COLS`` → ``scan_shape=(ROWS, COLS)``, ``--overwrite`` →
    ``overwrite=True``, "the same command" → "the same call", a leading ``input:`` → ``kind:``. ``keywords``:
    option → keyword (default :data:`KEYWORD_OF_OPTION`); other options, and command lines quoted whole, are
    left as they are."""
    keywords = KEYWORD_OF_OPTION if keywords is None else keywords

    def keyword(match) -> str:
        option, value = match.group(1), match.group(2)
        if option not in keywords:
            return match.group(0)
        name = keywords[option]
        if isinstance(name, tuple):  # a switch: what follows is the sentence's, not the option's
            return f"{name[0]}={name[1]!r}" + (f" {value}" if value else "")
        if not value:
            return name
        if option == "scan-shape":
            return f"{name}=({', '.join(value.split())})" if " " in value else f"{name} {value}"
        if value.isupper() or re.fullmatch(r"-?[0-9][0-9.]*", value):  # a placeholder (S, DEG) or a number
            return f"{name}={value}"
        return f"{name}={value!r}"

    def reworded(text: str) -> str:
        text = text.replace("the same command", "the same call")
        return _option_pattern().sub(keyword, text)

    # Left whole: a command line quoted whole (one to type, in another command's options; in backticks, whose
    # paths may hold quotes) and a quoted path (a folder may be named "--out").
    kept = r"`[^`]*`|(['\"])deepphase [^'\"]*\1|'[^'\s]*[/\\][^']*'|\"[^\"\s]*[/\\][^\"]*\""
    pieces, done = [], 0
    for quoted in re.finditer(kept, message):
        pieces += [reworded(message[done : quoted.start()]), quoted.group(0)]
        done = quoted.end()
    message = "".join(pieces + [reworded(message[done:])])
    lead = re.match(r"([a-z][a-z-]*): ", message)
    if lead and isinstance(keywords.get(lead.group(1)), str):
        message = keywords[lead.group(1)] + message[lead.end(1):]
    return message


@functools.lru_cache(maxsize=1)
def _option_pattern() -> re.Pattern:
    """An option and the value after it, if it is one (a placeholder, a number, a choice, a packaged model)."""
    from . import _resources

    models = sorted((p.name for p in (Path(_resources.__file__).parent / "models").iterdir() if p.is_dir()),
                    key=len, reverse=True)
    words = "|".join(sorted(_CHOICES, key=len, reverse=True) + models)  # (cuda-graphs before cuda)
    value = rf"ROWS COLS|[0-9]+ [0-9]+|[A-Z][A-Z._]*|-?[0-9][0-9.]*|(?:cuda|xpu):[0-9]+|{words}"
    return re.compile(rf"(?<![\w-])--([a-z][a-z-]*)(?: ({value})(?![\w-]))?")


def in_callers_words(**own):
    """Decorate an entry point: called from Python (not from the command, not from another entry point), its
    errors (and an interrupt's message) name its keywords (:func:`in_api_words` with :data:`KEYWORD_OF_OPTION`
    and ``own``: option → keyword, or None for an option it has no keyword for)."""
    keywords = {k: v for k, v in {**KEYWORD_OF_OPTION, **own}.items() if v is not None}

    def decorate(function):
        @functools.wraps(function)
        def entry(*args, **kwargs):
            if _AUDIENCE.get() is not None:  # the command, or an outer entry point, words the messages
                return function(*args, **kwargs)
            token = _AUDIENCE.set(keywords)
            try:
                return function(*args, **kwargs)
            except (DeepPhaseError, KeyboardInterrupt) as exc:
                if exc.args and isinstance(exc.args[0], str):
                    exc.args = (in_api_words(exc.args[0], keywords), *exc.args[1:])
                raise
            finally:
                _AUDIENCE.reset(token)

        return entry

    return decorate
