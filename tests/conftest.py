import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_PROBE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "probe.npy"


@pytest.fixture(scope="session")
def probe():
    from deepphase.physics import reference_probe

    return reference_probe()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
