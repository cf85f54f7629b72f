import pytest
import torch

from tests.checkpoints import make_checkpoint


@pytest.fixture(autouse=True)
def _deterministic():
    torch.set_num_threads(2)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> path of a tiny random checkpoint, built once per session on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in paths:
            paths[family] = make_checkpoint(root, family)
        return paths[family]

    return get
