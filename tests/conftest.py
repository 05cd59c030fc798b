"""Shared test setup: hypothesis profiles, seeded RNG, an isolated npgpt home, the xp fixture."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# CI: fixed examples (derandomize) so a run is reproducible; locally: random exploration.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep caches (built-in datasets, downloads) out of the user's real data dir."""
    home = os.environ.get("NPGPT_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "npgpt-home")
    monkeypatch.setenv("NPGPT_HOME", home)
    monkeypatch.delenv("NPGPT_DEVICE", raising=False)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _xp_params():
    params = [pytest.param("numpy", id="numpy")]
    from npgpt.backend import gpu_available
    params.append(pytest.param("cupy", id="cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not gpu_available(), reason="needs CuPy and a CUDA GPU")]))
    return params


@pytest.fixture(params=_xp_params())
def xp(request):
    """The array module under test: numpy always, cupy when a GPU is usable."""
    if request.param == "numpy":
        return np
    import cupy
    return cupy
