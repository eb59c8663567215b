"""A training process for tests/test_distributed.py, started by torchrun (or run directly as one process).

Usage: ``python -m torch.distributed.run --standalone --nproc-per-node N tests/ddp_worker.py SPEC.json``.
SPEC holds ``out``, the TrainConfig fields (``corpus`` as {"mix", "phase_range"}), ``resume`` and
``calls`` (a folder where every call of save_checkpoint / save_model leaves a file named after the
rank that made it). ``arch`` may be "test-plain", registered here: convolutions without batch
normalisation or dropout, so that one process and N processes must train the same weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def register_plain_arch() -> None:
    from deepphase.models.registry import list_models, register_model

    if "test-plain" in list_models():
        return

    @register_model("test-plain")
    def test_plain(n_px: int = 32, out_px: int = 32):
        if out_px != n_px:
            raise ValueError("test-plain maps n×n to n×n only")
        return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Tanh(),
                                   torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Tanh(),
                                   torch.nn.Conv2d(8, 1, 3, padding=1))


def run(spec: dict):
    import deepphase.training.loop as loop
    from deepphase.data.phase_objects import CorpusConfig
    from deepphase.physics import reference_probe

    register_plain_arch()
    rank = int(os.environ.get("RANK", "0"))
    calls = spec.get("calls")
    if calls:
        Path(calls).mkdir(parents=True, exist_ok=True)
        for name in ("save_checkpoint", "save_model"):
            original = getattr(loop, name)

            def recorded(*args, _original=original, _name=name, **kw):
                (Path(calls) / f"{_name}.rank{rank}.{os.getpid()}.{len(os.listdir(calls))}").touch()
                return _original(*args, **kw)

            setattr(loop, name, recorded)
    fields = {k: v for k, v in spec.items() if k in loop.TrainConfig.__dataclass_fields__}
    corpus = fields.pop("corpus", None)
    if corpus is not None:
        fields["corpus"] = CorpusConfig.from_dict(corpus)
    config = loop.TrainConfig(**fields)
    return loop.train(reference_probe(), spec["out"], config, resume=spec.get("resume", False),
                      overwrite=spec.get("overwrite", False), progress=False,
                      rank_data=spec.get("rank_data", "shared"), log=print if rank == 0 else (lambda *_: None))


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    run(json.loads(Path(sys.argv[1]).read_text()))
