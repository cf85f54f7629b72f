import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    # The thread count is fixed for the whole run by tests/conftest.py.
    torch.manual_seed(0)
