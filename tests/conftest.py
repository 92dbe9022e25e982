import pytest

from tests.training_helpers import make_workdir


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """Synthetic data, configs/base.py and a briefly trained tiny_t teacher (model + classifier),
    shared by every training test of the session."""
    return make_workdir(tmp_path_factory.mktemp("train"))
