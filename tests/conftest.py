import os
from pathlib import Path

import pytest
import torch

import pyro

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests running in parallel processes (pytest -n N): one core's worth of threads
    # each, here and in the processes they start, so that they do not stall each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def compiler_cache(tmp_path_factory):
    """torch.compile's caches in a temporary folder of the test session, not in the
    system's."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    if before is None:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def pyro_state():
    pyro.enable_validation(True)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def shared_data_root():
    """$PYRO_VAE_DATA, else ../shared/data beside the repository, else None."""
    for candidate in (os.environ.get("PYRO_VAE_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "mnist").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_root():
    root = shared_data_root()
    if root is None:
        pytest.skip("real data not found: set PYRO_VAE_DATA to a folder holding mnist/")
    return root


@pytest.fixture(scope="session")
def mnist(data_root):
    from pyro_vae import datasets

    return datasets.load("mnist", data_root)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
