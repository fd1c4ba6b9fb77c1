"""SAC: the tanh-Gaussian log-density is right, exported actors act the same in numpy, and
online sac.py learns a cheap task (slow; `python -m pytest -m slow test_sac.py`)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform

from datasets import TanhGaussianPolicy
from sac import Actor

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
# Pendulum-v1: a random policy scores about -1200 to -1500, a solved one about -150.
PENDULUM_STEPS, PENDULUM_MIN_RETURN = 6000, -400.0


def test_log_prob_matches_torch_tanh_normal():
    torch.manual_seed(0)
    actor = Actor(5, 3, hidden=16)
    obs = torch.randn(64, 5)
    torch.manual_seed(1)
    action, log_prob = actor(obs)
    h = actor.trunk(obs)
    dist = TransformedDistribution(Normal(actor.mean(h), actor.log_std(h).clamp(-20, 2).exp()), TanhTransform())
    reference = dist.log_prob(action.clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1)
    assert torch.allclose(log_prob, reference, atol=1e-3, rtol=1e-4)


def test_exported_actor_acts_the_same_in_numpy(tmp_path):
    torch.manual_seed(0)
    actor = Actor(11, 3)
    path = tmp_path / "actor.npz"
    np.savez(path, **actor.to_npz_arrays())
    obs = np.random.default_rng(0).normal(size=11).astype(np.float32)
    assert np.allclose(TanhGaussianPolicy.load(path).act(obs), actor.act(obs), atol=1e-5)


@pytest.mark.slow
def test_online_sac_learns_pendulum(tmp_path):
    argv = ["--env", "Pendulum-v1", "--total-steps", str(PENDULUM_STEPS), "--learning-starts", "1000", "--eval-every", str(PENDULUM_STEPS), "--eval-episodes", "5", "--seed", "1", "--run-name", "pendulum"]
    result = subprocess.run([sys.executable, os.path.join(HERE, "sac.py"), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr
    final = float(re.search(r"final eval return: (-?[\d.]+)", result.stdout).group(1))
    assert final > PENDULUM_MIN_RETURN, result.stdout
