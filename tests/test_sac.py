"""SAC: the tanh-Gaussian log-density is right, exported actors act the same in numpy, and
online sac.py learns a cheap task (slow; `python -m pytest -m slow test_sac.py`)."""

import copy
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform

import datasets
from datasets import TanhGaussianPolicy
from sac import SAC, Actor, Batch, ReplayBuffer, SACConfig, evaluate, write_replay

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the scripts under test
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


def small_agent(**config) -> SAC:
    torch.manual_seed(0)
    agent = SAC(4, 2, SACConfig(hidden=16, **config), torch.device("cpu"))
    with torch.no_grad():  # targets that differ from the critics, so using one for the other shows
        for param in agent.critic_target.parameters():
            param.add_(0.3 * torch.randn_like(param))
        agent.log_alpha.fill_(-0.5)
    return agent


def batch_of(n: int, done: list[float]) -> Batch:
    generator = torch.Generator().manual_seed(1)
    return Batch(
        torch.randn(n, 4, generator=generator),
        torch.rand(n, 2, generator=generator) * 2 - 1,
        torch.randn(n, generator=generator),
        torch.randn(n, 4, generator=generator),
        torch.tensor(done),
    )


def test_td_target_bootstraps_from_the_target_critics_min_and_stops_only_at_done():
    """y = r + gamma * (1 - done) * (min_i Q'_i(s', a') - alpha * log pi(a'|s')), a' ~ pi(s').

    Catches: done ignored, (1 - done) inverted, max instead of min, the online critic instead of
    the target, the entropy term dropped or added, gamma dropped.
    """
    agent, batch = small_agent(gamma=0.9), batch_of(6, [1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    alpha = agent.log_alpha.exp().detach()
    torch.manual_seed(2)
    target = agent.td_target(batch, alpha)
    torch.manual_seed(2)
    next_act, next_log_prob = agent.actor(batch.next_obs)
    with torch.no_grad():
        bootstrap = agent.critic_target(batch.next_obs, next_act).min(0).values - alpha * next_log_prob
    done = batch.done.bool()
    assert torch.equal(target[done], batch.rew[done])
    assert torch.allclose(target[~done], batch.rew[~done] + 0.9 * bootstrap[~done], atol=1e-6)


def test_update_regresses_on_the_td_target_steps_the_actor_uphill_and_moves_the_target_by_polyak():
    """The critic loss uses td_target; the actor loss is alpha log pi - min Q; target <- (1 - polyak) target + polyak critic.

    Catches: another target in update, the actor loss's sign or max instead of min, polyak's direction.
    """
    agent, batch = small_agent(polyak=0.1), batch_of(32, [0.0] * 16 + [1.0] * 16)
    before = copy.deepcopy(agent)
    alpha = agent.log_alpha.exp().detach()
    torch.manual_seed(3)
    losses = agent.update(batch)
    torch.manual_seed(3)
    target = before.td_target(batch, alpha)
    act, log_prob = before.actor(batch.obs)
    with torch.no_grad():
        assert torch.allclose(
            losses["critic_loss"], ((before.critic(batch.obs, batch.act) - target) ** 2).mean(1).sum(), rtol=1e-5
        )
        # The actor step sees the critic after its own step (which the actor step does not change).
        assert torch.allclose(
            losses["actor_loss"], (alpha * log_prob - agent.critic(batch.obs, act).min(0).values).mean(), rtol=1e-5
        )
        for old, new, critic in zip(
            before.critic_target.parameters(), agent.critic_target.parameters(), agent.critic.parameters()
        ):
            assert torch.allclose(new, 0.9 * old + 0.1 * critic, atol=1e-6)


@pytest.mark.parametrize("target_entropy, direction", [(100.0, 1), (-100.0, -1)])
def test_temperature_rises_when_entropy_is_below_target(target_entropy, direction):
    """Catches: the sign of the temperature loss (alpha must grow when the policy is less random than the target)."""
    agent = small_agent()
    agent.target_entropy = target_entropy
    before = agent.log_alpha.item()
    agent.update(batch_of(32, [0.0] * 32))
    assert direction * (agent.log_alpha.item() - before) > 0


@pytest.mark.parametrize("floor", [-5.0, -2.0])
def test_log_std_is_clamped_at_the_configured_floor(floor):
    """A log-std head far below the floor samples with std exp(floor), and log pi is that distribution's."""
    torch.manual_seed(0)
    actor = Actor(5, 3, hidden=16, log_std_min=floor)
    with torch.no_grad():
        actor.log_std.weight.zero_()
        actor.log_std.bias.fill_(-40.0)
    obs = torch.randn(64, 5)
    torch.manual_seed(1)
    action, log_prob = actor(obs)
    mean = actor.mean(actor.trunk(obs))
    torch.manual_seed(1)
    u = mean + np.exp(floor) * torch.randn_like(mean)
    torch.testing.assert_close(action, torch.tanh(u))
    reference = (
        TransformedDistribution(Normal(mean, torch.full_like(mean, np.exp(floor))), TanhTransform())
        .log_prob(torch.tanh(u).clamp(-1 + 1e-6, 1 - 1e-6))
        .sum(-1)
    )
    assert torch.allclose(log_prob, reference, atol=1e-2, rtol=1e-4)


def test_sac_builds_its_actor_with_the_configured_floor():
    assert small_agent(log_std_min=-5.0).actor.log_std_min == -5.0


def test_alpha_is_capped_at_alpha_max_and_does_not_wind_up():
    """With entropy far below target, alpha rises to alpha_max and stays there; log alpha itself stops at the cap."""
    agent = small_agent(alpha_max=0.7, alpha_lr=0.1)
    agent.target_entropy = 100.0
    for _ in range(20):
        agent.update(batch_of(32, [0.0] * 32))
    assert agent.log_alpha.item() == pytest.approx(np.log(0.7))
    uncapped = small_agent(alpha_lr=0.1)
    uncapped.target_entropy = 100.0
    for _ in range(20):
        uncapped.update(batch_of(32, [0.0] * 32))
    assert uncapped.log_alpha.exp().item() > 1.0


def test_q_mean_is_the_critics_mean_on_the_batch_before_the_step():
    agent, batch = small_agent(), batch_of(32, [0.0] * 32)
    with torch.no_grad():
        expected = agent.critic(batch.obs, batch.act).mean()
    assert torch.allclose(agent.update(batch)["q_mean"], expected)


def test_sac_starts_as_the_authors_softlearning_sac():
    """softlearning's SAC, the DROP/MOPO code's: 256-256 nets, lr 3e-4 for actor, critics and alpha, gamma 0.99,
    polyak 5e-3, batch 256, alpha starting at 1 with target entropy -|A|, targets starting equal to the critics.

    Catches: any of these defaults changed, a target entropy of another size, log alpha not starting at 0, targets left at their own init."""
    assert SACConfig() == SACConfig(
        hidden=256,
        actor_lr=3e-4,
        critic_lr=3e-4,
        alpha_lr=3e-4,
        gamma=0.99,
        polyak=5e-3,
        batch_size=256,
        log_std_min=-20.0,
        alpha_max=None,
    )
    torch.manual_seed(0)
    agent = SAC(4, 3, SACConfig(hidden=16), torch.device("cpu"))
    assert agent.target_entropy == -3.0 and agent.log_alpha.item() == 0.0
    for name, value in agent.critic.state_dict().items():
        assert torch.equal(agent.critic_target.state_dict()[name], value), name


def test_the_temperature_gradient_is_the_entropy_gap_whatever_alpha_is():
    """alpha's loss is -log alpha * (log pi + target entropy), so d/d log alpha = -(E[log pi] + target) at every alpha.

    Catches: the loss on alpha itself (its gradient scales with alpha) and log pi's gradient not stopped."""
    grads = []
    for log_alpha in (0.0, 2.0):
        agent = small_agent()
        with torch.no_grad():
            agent.log_alpha.fill_(log_alpha)
        batch, before = batch_of(32, [0.0] * 32), copy.deepcopy(agent)
        torch.manual_seed(3)
        agent.update(batch)
        torch.manual_seed(3)
        before.td_target(
            batch, torch.tensor(1.0)
        )  # the same draws as update's target, so the actor's sample below is update's
        _, log_prob = before.actor(batch.obs)
        grads.append(agent.log_alpha.grad.item())
        assert grads[-1] == pytest.approx(-(log_prob.mean().item() + agent.target_entropy), rel=1e-5)
    assert grads[0] == pytest.approx(grads[1], rel=1e-6)


def test_the_buffer_samples_only_what_was_stored_and_wraps_around():
    """Catches: sampling the empty rows beyond size, and a wrap that overwrites anything but the oldest rows."""
    buffer = ReplayBuffer(capacity=10, obs_dim=1, act_dim=1, device=torch.device("cpu"))
    rows = lambda values: [
        torch.tensor(values, dtype=torch.float32).view(-1, 1),
        torch.zeros(len(values), 1),
        torch.tensor(values, dtype=torch.float32),
        torch.zeros(len(values), 1),
        torch.zeros(len(values)),
    ]
    buffer.add(*rows([1.0, 2.0, 3.0]))
    torch.manual_seed(0)
    assert set(buffer.sample(1000).rew.tolist()) == {1.0, 2.0, 3.0}
    buffer.add(*rows([float(v) for v in range(4, 13)]))  # 12 rows in 10: 1 and 2 are overwritten by 11 and 12
    assert buffer.size == 10 and sorted(buffer.rew.tolist()) == [float(v) for v in range(3, 13)]
    assert set(buffer.sample(1000).rew.tolist()) == set(float(v) for v in range(3, 13))


def test_evaluation_scales_the_deterministic_action_to_the_env_and_seeds_each_episode():
    """The tanh policy acts in [-1, 1]; the env gets it times its action bound, each episode reset with seed + episode.

    Catches: the action left unscaled (every MuJoCo env here has bound 1, so only another env shows it),
    a stochastic evaluation, unseeded or equally seeded episodes, a return that misses a step."""
    torch.manual_seed(0)
    actor = Actor(3, 2, hidden=8)

    class RecordingEnv:
        action_space = types.SimpleNamespace(high=np.array([2.0, 0.5], dtype=np.float32))

        def __init__(self):
            self.resets, self.actions, self.obs = [], [], []

        def reset(self, seed):
            self.resets.append(seed)
            self.steps = 0
            self.obs.append(np.full(3, seed, dtype=np.float32))
            return self.obs[-1], {}

        def step(self, action):
            self.actions.append(action)
            self.steps += 1
            self.obs.append(np.full(3, 0.1 * self.steps, dtype=np.float32))
            return self.obs[-1], 1.0, False, self.steps == 4, {}

    env = RecordingEnv()
    returns = evaluate(actor, env, episodes=2, seed=7)
    assert env.resets == [7, 8] and returns.tolist() == [4.0, 4.0]
    seen = np.array(
        [o for i, o in enumerate(env.obs) if i % 5 != 4]
    )  # the states acted in: all but each episode's last
    np.testing.assert_allclose(np.array(env.actions), actor.act(seen) * np.array([2.0, 0.5]), rtol=1e-6)


@pytest.mark.slow
def test_online_sac_learns_pendulum(tmp_path):
    argv = [
        "--env",
        "Pendulum-v1",
        "--total-steps",
        str(PENDULUM_STEPS),
        "--learning-starts",
        "1000",
        "--eval-every",
        str(PENDULUM_STEPS),
        "--eval-episodes",
        "5",
        "--seed",
        "1",
        "--run-name",
        "pendulum",
    ]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sac.py"), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    final = float(re.search(r"final eval return: (-?[\d.]+)", result.stdout).group(1))
    assert final > PENDULUM_MIN_RETURN, result.stdout


def test_the_replay_buffer_is_written_as_a_d4rl_file_in_step_order(tmp_path):
    """sac.py keeps what it trained on (a medium-replay dataset is made of it): the rows in step order after the
    buffer wrapped, terminations as terminals, time limits as timeouts, and the last row, cut by the stop, a timeout."""
    buffer, truncations = ReplayBuffer(5, 11, 3, torch.device("cpu")), np.zeros(5, dtype=bool)
    for t in range(7):  # two more steps than the buffer holds
        truncations[buffer.ptr] = t == 2
        row = lambda value, width: torch.full((1, width), float(value))
        buffer.add(row(t, 11), row(t / 10, 3), torch.tensor([float(t)]), row(t + 1, 11), torch.tensor([float(t == 4)]))
    write_replay(
        str(tmp_path / "replay.hdf5"), buffer, truncations, types.SimpleNamespace(env="Hopper-v4", seed=1), step=7
    )
    data = datasets.load_dataset("hopper-medium-v2", str(tmp_path / "replay.hdf5"))
    assert data.rewards.tolist() == [2, 3, 4, 5, 6] and data.observations[:, 0].tolist() == [2, 3, 4, 5, 6]
    assert data.next_observations[:, 0].tolist() == [3, 4, 5, 6, 7]
    assert data.terminals.tolist() == [False, False, True, False, False]
    assert data.timeouts.tolist() == [True, False, False, False, True]
