import pytest
import torch

# Tests use tiny tensors: one thread avoids oversubscription (several test processes, gloo ranks and
# data-loader workers share two cores), which otherwise makes small ops orders of magnitude slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Keep OpenMP/BLAS pools (scikit-learn, numpy) at one thread too, like torch above."""
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    with threadpool_limits(1):
        yield

