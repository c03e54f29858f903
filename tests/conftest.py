import pytest
import torch

# Tests use tiny tensors: one thread avoids oversubscription (several test processes, gloo ranks and
# data-loader workers share two cores), which otherwise makes small ops orders of magnitude slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
