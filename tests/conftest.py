import pytest
import torch

import geosample as gs


def pytest_report_header(config):
    """Which geosample the tests import: the installed copy in CI (.ci/run), with or without _C."""
    return f"geosample {gs.__version__} from {gs.__file__}, C++ extension: {'yes' if gs.has_cpp() else 'no'}"


@pytest.fixture(scope="session")
def gmm():
    """A 4-component isotropic mixture in 6 dimensions (float64 maths)."""
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return gs.GaussianMixtureDenoiser(means, [0.3, 0.5, 0.2, 0.4], weights=[0.1, 0.2, 0.3, 0.4])


@pytest.fixture(scope="session")
def noise():
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 6, generator=g, dtype=torch.float64)
