"""Architectures by name, so that ``--arch NAME`` and model files can build any of them.

An architecture is a function ``(**config) -> torch.nn.Module`` that maps diffraction amplitudes
(B, C, n, n) to phase patches (B, 1, out, out). ``C`` is the config's ``in_channels`` (default 1: one
pattern per position; 9: the 3×3 neighbourhood of adjacent positions); the module records it as its
``in_channels`` attribute. An architecture that takes ``sigma_head=True`` outputs a second channel,
the log of each pixel's error scale (channel 0 stays the phase), and records it as its
``sigma_head`` attribute. Register one with :func:`register_model`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import DeepPhaseError

_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {}

#: Every architecture halves its input three times (the U-Nets' poolings, the compact network's strides), so its
#: n×n pattern grid is a multiple of this.
GRID_MULTIPLE = 8


def register_model(name: str):
    """Decorator: make an architecture constructor available as ``name``."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of every registered architecture."""
    return sorted(_REGISTRY)


def create_model(name: str, **config) -> torch.nn.Module:
    """Build the architecture ``name`` with ``config``."""
    if name not in _REGISTRY:
        raise DeepPhaseError(f"arch: unknown architecture {name!r}; expected one of {', '.join(list_models())}")
    try:
        return _REGISTRY[name](**config)
    except TypeError as exc:  # a config key the architecture does not take (e.g. in_channels)
        raise DeepPhaseError(f"arch: architecture {name!r} does not take the configuration {config} ({exc})") from exc
    except ValueError as exc:  # a value it does not take (its message names the argument)
        raise DeepPhaseError(f"arch: architecture {name!r}: {exc}") from exc


def deployed(network: torch.nn.Module, arch: str) -> tuple[torch.nn.Module, str]:
    """The network and architecture name a model file stores for a trained ``network`` of ``arch``.

    A training form (e.g. ``compact-rep``'s reparameterisable convolutions) gives its plain equivalent
    (``reparameterised()``, under its ``deploy_arch``); any other network is stored as it is.
    """
    if hasattr(network, "reparameterised"):
        return network.reparameterised(), network.deploy_arch
    return network, arch


def input_channels(model: torch.nn.Module) -> int:
    """Patterns per position that ``model`` takes (its ``in_channels``; 1 for a module without one)."""
    return int(getattr(model, "in_channels", 1))


# How ``sigma_head=`` values of earlier versions and plain booleans read.
SIGMA_HEADS = {False: None, None: None, True: "shared"}


def has_sigma_head(model: torch.nn.Module) -> bool:
    """Whether ``model`` also outputs a log error scale (channel 1; see :mod:`deepphase.training.loss`)."""
    return bool(getattr(model, "sigma_head", False))


# Range of a σ head's log Laplace scale log b: b from 1e-4 rad (far below any network's error) to
# e² ≈ 7.4 rad (more than the whole phase range). Training clamps to it (outside it the likelihood's
# gradient 1 − |r|/b can be huge: b → 0 with |r| > 0) and reconstruction reads σ through the same clamp.
LOG_SCALE_RANGE = (-9.2, 2.0)


def sigma_from_log_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """The standard deviation √2·b of a Laplace of log scale ``log_scale`` (clamped to ``LOG_SCALE_RANGE``)."""
    return 2 ** 0.5 * torch.exp(log_scale.clamp(*LOG_SCALE_RANGE))


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_pattern(model: torch.nn.Module, n_px: int = 32) -> float:
    """Floating-point operations (multiply and add counted separately) of one forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.ones(1, input_channels(model), n_px, n_px, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return float(counter.get_total_flops())
