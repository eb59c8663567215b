import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Two threads at most; fewer if OMP_NUM_THREADS says so: on a CPU shared with another job, two
# threads that spin-wait for each other make a small network's step ~100× slower (measured: 2 s
# against 0.02 s for a compact σ-head step with a training job on the other core).
torch.set_num_threads(min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2)))

SHARED_PROBE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "probe.npy"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The package's cache (ONNX exports) in a folder of the test session's own, never the user's; the
    CLI's subprocesses inherit it."""
    from deepphase.runtime import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("deepphase-cache"))
    yield Path(os.environ[CACHE_ENV])
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def probe():
    from deepphase.physics import reference_probe

    return reference_probe()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def unchecked_reconstruct(*args, **kwargs):
    """``reconstruct`` without the scan checks, for tests of the network, the stitching and the streaming: the
    checks have tests of their own (test_api, test_aberrations, test_calibration) and add 1–3 s to every call on a
    raster of 16² or more (47 s over the suites that use this)."""
    from deepphase.reconstruction.pipeline import reconstruct

    return reconstruct(*args, **{"checks": False, **kwargs})
