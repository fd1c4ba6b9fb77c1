"""bench.py keeps running (tiny mode), and the fast paths it measures compute what the plain
formulas compute: speed must not change results."""

import json
import os
import subprocess
import sys

import torch

from dice import GradientDICE
from dynamics import DynamicsConfig, ProbabilisticEnsemble

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the scripts under test
TOLERANCE = 1e-5  # float32 round-off between differently ordered matmuls


def test_tiny_bench_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench.py"), "--tiny", "--families", "hopper", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "drop/none" in result.stdout
    report = json.loads(out.read_text())["hopper"]
    for penalty in ("drop", "mopo", "none"):
        for key in (
            "epoch_seconds",
            "sac_updates_per_s",
            "rollout_seconds",
            "dice_seconds",
            "dynamics_train_seconds_per_epoch",
        ):
            assert report[penalty][key] >= 0, (penalty, key)
        assert report[penalty]["epoch_seconds"] > 0
    assert report["drop"]["dice_seconds"] > 0 and report["none"]["dice_seconds"] == 0
    assert report["drop"]["dice_policy_seconds"] > 0 and report["mopo"]["dice_policy_seconds"] == 0
    assert report["peak_rss_mb"] > 0 and set(report["ratios"]) == {"drop_over_none", "drop_over_mopo"}


def small_ensemble() -> tuple[ProbabilisticEnsemble, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = ProbabilisticEnsemble(5, 2, DynamicsConfig(num_members=4, num_elites=3, hidden=16))
    model.elites.copy_(torch.tensor([3, 0, 2]))
    return model, torch.randn(300, 5), torch.randn(300, 2)


def test_cached_dice_next_states_equal_direct_prediction():
    """drop.py caches each elite's mean next state once; it must equal predicting at DICE time."""
    model, obs, act = small_ensemble()
    cache = model.elite_mean_next_obs(obs, act, chunk=64)
    for position, member in enumerate(model.elites.tolist()):
        mean, _ = model(obs, act)  # every member, plain
        assert torch.allclose(cache[position], obs + mean[member, :, :-1], atol=TOLERANCE)


def test_batched_dice_objective_equals_plain_formula():
    """The batched heads with one shared f pass equal the paper's objective computed head by head."""
    torch.manual_seed(0)
    heads, n, obs_dim, act_dim, gamma, lam = 3, 50, 4, 2, 0.99, 0.5
    dice = GradientDICE(obs_dim, act_dim, heads, 8, torch.zeros(obs_dim + act_dim), torch.ones(obs_dim + act_dim))
    with torch.no_grad():
        dice.nu.copy_(torch.randn(heads, 1))
    s, a, s0, a0 = torch.randn(n, obs_dim), torch.randn(n, act_dim), torch.randn(n, obs_dim), torch.randn(n, act_dim)
    s_next, a_next = torch.randn(heads, n, obs_dim), torch.randn(heads, n, act_dim)
    batched = dice.objective(s, a, s_next, a_next, s0, a0, gamma, lam)
    for h in range(heads):

        def net(module, x):  # head h alone, as plain matmuls
            for layer in module.hidden:
                x = torch.relu(x @ layer.weight[h] + layer.bias[h])
            return (x @ module.output.weight[h] + module.output.bias[h]).squeeze(-1)

        tau, f = net(dice.tau, torch.cat([s, a], -1)), net(dice.f, torch.cat([s, a], -1))
        f_next, f_init, nu = (
            net(dice.f, torch.cat([s_next[h], a_next[h]], -1)),
            net(dice.f, torch.cat([s0, a0], -1)),
            dice.nu[h, 0],
        )
        plain = (
            (1 - gamma) * f_init.mean()
            + gamma * (tau * f_next).mean()
            - (tau * f + f**2 / 2).mean()
            + lam * ((nu * tau - nu).mean() - nu**2 / 2)
        )
        assert torch.allclose(batched[h], plain, atol=TOLERANCE)
