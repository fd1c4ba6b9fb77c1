"""Shared by the tests: a private dynamics cache for the whole session, and a small file of real Hopper steps."""

import os

import pytest

import datasets


@pytest.fixture(scope="session", autouse=True)
def private_dynamics_cache(tmp_path_factory):
    """Keep the tests off the user's ~/.cache/drop/dynamics."""
    previous = os.environ.get("DROP_CACHE_DIR")
    os.environ["DROP_CACHE_DIR"] = str(tmp_path_factory.mktemp("dynamics-cache"))
    yield
    if previous is None:
        del os.environ["DROP_CACHE_DIR"]
    else:
        os.environ["DROP_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def hopper_file(tmp_path_factory) -> str:
    """2000 uniform-random Hopper-v4 steps as a D4RL-format file (under a second to collect)."""
    path = tmp_path_factory.mktemp("data") / "hopper-small.hdf5"
    datasets.collect("Hopper-v4", "random", 2000, seed=0, out=path)
    return str(path)
