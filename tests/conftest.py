import os

# One intra-op thread per test process (and the subprocesses and spawned ranks it starts): on a
# small shared CPU, OpenMP threads that wait for a busy core make small steps many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tests.training_helpers import make_workdir  # noqa: E402


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """Synthetic data, configs/base.py and a briefly trained tiny_t teacher (model + classifier),
    shared by every training test of the session."""
    return make_workdir(tmp_path_factory.mktemp("train"))
