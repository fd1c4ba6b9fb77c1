"""The first thing to run after a fork or an install (about 20 s): `python -m pytest -q test_smoke.py`.

A tiny drop, mopo and none run each train from the command line, as a user starts them, write a
finished checkpoint and a score, and eval.py scores the checkpoint again.
"""

import csv
import math
import os
import re

import pytest
import torch
from test_drop import ROOT, hopper_file, run_script, tiny  # noqa: F401 (fixture)

SCORE = re.compile(r"normalized score: (-?[\d.]+)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


@pytest.mark.parametrize("penalty", ["drop", "mopo", "none"])
def test_tiny_run_trains_checkpoints_and_scores(penalty, hopper_file, workdir):
    result = run_script(
        os.path.join(ROOT, "drop.py"),
        "--env",
        "hopper-medium-v2",
        "--dataset",
        hopper_file,
        *tiny(penalty),
        "--penalty",
        penalty,
        "--run-name",
        penalty,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    assert math.isfinite(float(SCORE.search(result.stdout).group(1))), result.stdout

    run_dir = workdir / "runs" / penalty
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["finished"] and checkpoint["epoch"] + 1 == checkpoint["epochs"] == 2
    assert all(torch.isfinite(weights).all() for weights in checkpoint["actor"].values())
    assert bool(checkpoint["penalty"]) == (penalty == "drop")  # only a ratio has weights of its own
    with open(run_dir / "progress.csv") as file:
        assert [int(row["epoch"]) for row in csv.DictReader(file)] == [0, 1]

    scored = run_script(os.path.join(ROOT, "eval.py"), f"runs/{penalty}", "--episodes", "1", cwd=workdir)
    assert scored.returncode == 0, scored.stderr
    assert math.isfinite(float(SCORE.search(scored.stdout).group(1))), scored.stdout
