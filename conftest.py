"""Keep the tests off the user's dynamics cache: every test session gets its own $DROP_CACHE_DIR."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_dynamics_cache(tmp_path_factory):
    previous = os.environ.get("DROP_CACHE_DIR")
    os.environ["DROP_CACHE_DIR"] = str(tmp_path_factory.mktemp("dynamics-cache"))
    yield
    if previous is None:
        del os.environ["DROP_CACHE_DIR"]
    else:
        os.environ["DROP_CACHE_DIR"] = previous
