import os

import pytest
import torch

# Two cores shared by everything: keep each test process on a small, fixed thread budget.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
