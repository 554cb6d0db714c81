import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data():
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip("../shared/data is not present")
    return path
