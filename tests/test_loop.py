"""The DROP loop means what the paper says: each line that carries the algorithm is pinned by an exact value.

Stand-ins make the expected values exact. `StepEnsemble` is a dynamics ensemble whose member m
moves every state by a known offset, predicts a known reward and a known, state-dependent std;
a real GradientDICE whose tau heads have zero weights returns a fixed tau_g per head. Every test
says which one-line changes to drop.py it catches; each of those changes was made and seen to fail.
"""

import math
import types
from dataclasses import asdict, replace

import pytest
import torch
import tyro
from test_drop import hopper_file  # noqa: F401 (fixture)

import datasets
import drop
import penalties
from dice import DiceConfig, GradientDICE
from dynamics import DynamicsConfig, ProbabilisticEnsemble
from health import CriticHealth, return_bound
from sac import ReplayBuffer

torch.set_num_threads(1)
OBS_DIM, ACT_DIM = 3, 2
ELITES = [3, 0, 2]  # member ids of the elites, in elite order; member 1 is not an elite
OFFSETS = torch.tensor([[1.0, 0, 0], [50.0, 0, 0], [3.0, 0, 0], [4.0, 0, 0]])  # member m moves s by OFFSETS[m]
REWARDS = torch.tensor([0.5, 9.0, 2.5, -1.0])  # member m predicts reward REWARDS[m]
TAU = torch.tensor([0.001, 0.5, 100.0])  # DICE head g (of elite g): below, inside and above the clip [0.01, 10]


class StepEnsemble(ProbabilisticEnsemble):
    """An ensemble with known outputs: mean (OFFSETS[m], REWARDS[m]); std STDS[m] * (1 + |s_0|) on each state dim, 0 on the reward."""

    def __init__(self, stds: list[float], offsets: torch.Tensor = OFFSETS):
        super().__init__(OBS_DIM, ACT_DIM, DynamicsConfig(num_members=4, num_elites=3, hidden=8))
        self.elites.copy_(torch.tensor(ELITES))
        self.stds, self.offsets = torch.tensor(stds), offsets

    def forward(self, obs, act, members=None):
        members = torch.arange(4) if members is None else members
        if obs.dim() == 2:
            obs = obs.expand(len(members), -1, -1)
        shape = (*obs.shape[:2], 1)
        mean = torch.cat(
            [
                self.offsets[members][:, None, :].expand(*obs.shape[:2], -1),
                REWARDS[members][:, None, None].expand(shape),
            ],
            -1,
        )
        std = self.stds[members][:, None, None] * (1 + obs[..., :1].abs())
        logvar = torch.cat([(2 * std.log()).expand(*obs.shape[:2], OBS_DIM), torch.full(shape, -math.inf)], -1)
        return mean, logvar


def fixed_tau_dice(tau: torch.Tensor) -> GradientDICE:
    dice = GradientDICE(OBS_DIM, ACT_DIM, len(tau), 8, torch.zeros(OBS_DIM + ACT_DIM), torch.ones(OBS_DIM + ACT_DIM))
    with torch.no_grad():
        dice.tau.output.weight.zero_()
        dice.tau.output.bias.copy_(tau.view(-1, 1, 1))
    return dice


ZERO_POLICY = lambda obs: (torch.zeros(len(obs), ACT_DIM), None)
NEVER_TERMINATED = lambda next_obs: torch.zeros(len(next_obs), dtype=torch.bool)


def run_settings(
    penalty="drop", horizon=1, eta=1.0, clip=None, transform="log", dice_config=None, mopo_members="all"
) -> drop.Args:
    """A run's settings with the given rollout and penalty values (the DICE ones do not matter here)."""
    args = drop.Args(penalty=penalty, dice=dice_config or DiceConfig(), mopo_members=mopo_members)
    return replace(
        args,
        horizon=horizon,
        eta=eta,
        clip=clip,
        transform=transform,
        dice_steps=1,
        dice_lr=1e-4,
        dice_lambda=0.1,
        epochs=1,
    )


def penalty_of(args: drop.Args, dynamics, ratio=None) -> penalties.NoPenalty:
    """The run's penalty object; DROP's with `ratio` (anything with .ratio(obs, act) -> [heads, B]) as its heads."""
    penalty = penalties.build_penalty(
        args,
        dynamics,
        torch.zeros(4, OBS_DIM),
        torch.zeros(4, ACT_DIM),
        ReplayBuffer(1, OBS_DIM, ACT_DIM, torch.device("cpu")),
        None,
    )
    if ratio is not None:
        penalty.net = ratio
    return penalty


def run_rollout(
    penalty: str,
    dynamics,
    dice=None,
    horizon=1,
    eta=2.5,
    transform="log",
    clip=(0.01, 10.0),
    terminated_fn=NEVER_TERMINATED,
    num_starts=600,
    dice_config=None,
    mopo_members="all",
):
    torch.manual_seed(0)
    buffer = ReplayBuffer(num_starts * horizon, OBS_DIM, ACT_DIM, torch.device("cpu"))
    start_obs = torch.randn(num_starts, OBS_DIM)
    args = run_settings(penalty, horizon, eta, clip, transform, dice_config, mopo_members)
    summary = drop.rollout(
        dynamics, ZERO_POLICY, penalty_of(args, dynamics, dice), start_obs, args, terminated_fn, buffer
    )
    rows = {name: getattr(buffer, name)[: buffer.size] for name in ("obs", "act", "rew", "next_obs", "done", "member")}
    return rows, summary, start_obs


def member_of(rows) -> torch.Tensor:
    """Which member produced each stored transition: its offset is unique."""
    return ((rows["next_obs"] - rows["obs"])[:, None, :] - OFFSETS).abs().sum(-1).argmin(1)


@pytest.mark.parametrize(
    "transform, clip, expected_penalty",
    [
        ("log", (0.01, 10.0), lambda tau: tau.clamp(0.01, 10.0).log()),
        ("tanh-shift", None, lambda tau: torch.tanh(tau - 1)),
        ("tanh-offset", (0.01, 10.0), lambda tau: torch.tanh(tau.clamp(0.01, 10.0)) - math.tanh(1.0)),
    ],
)
def test_drop_stores_reward_minus_eta_times_the_penalty_of_the_producing_members_head(
    transform, clip, expected_penalty
):
    """Stored r = r_m - eta * u(tau_g) with g the elite that stepped the sample.

    Catches: + instead of -, eta dropped or squared, the clip dropped or moved after the
    transform, another transform, the penalty of head 0 (or the mean of all heads) for every
    sample, and the reward or step of one member paired with the head of another.
    """
    dynamics = StepEnsemble(stds=[0.0] * 4)
    rows, _, _ = run_rollout("drop", dynamics, fixed_tau_dice(TAU), transform=transform, clip=clip)
    member = member_of(rows)
    elite = torch.tensor([ELITES.index(m) for m in member.tolist()])
    assert set(elite.tolist()) == {0, 1, 2}, "every elite must have stepped some samples"
    expected = REWARDS[member] - 2.5 * expected_penalty(TAU[elite])
    assert torch.allclose(rows["rew"], expected, atol=1e-6)
    assert torch.equal(rows["next_obs"], rows["obs"] + OFFSETS[member])


class StateRatio:
    """A ratio stand-in that depends on the state and the head: tau_g(s, a) = (g + 1) exp(s_0 / 8), inside the clip [0.01, 10] here."""

    def ratio(self, obs, act):
        return (obs[..., 0] / 8).exp() * torch.arange(1.0, 4.0)[:, None]


def test_drop_reads_tau_at_the_state_the_action_was_taken_in():
    """The penalty of a transition (s, a, s') is u(tau(s, a)): the occupancy ratio of the state-action the reward is for.

    Catches: tau read at the next state s' (each member moves s_0 by 1 to 4), or with another elite's head."""
    rows, _, _ = run_rollout("drop", StepEnsemble(stds=[0.0] * 4), StateRatio(), horizon=2)
    elite = torch.tensor([ELITES.index(m) for m in member_of(rows).tolist()])
    tau = (elite + 1) * (rows["obs"][:, 0] / 8).exp()
    assert 0.01 < tau.min() and tau.max() < 10.0
    assert torch.allclose(rows["rew"], REWARDS[member_of(rows)] - 2.5 * tau.log(), atol=1e-5)


@pytest.mark.parametrize(
    "below_clip, penalty_below", [("clip", math.log(0.01)), ("zero", 0.0), ("max", math.log(10.0))]
)
def test_untrusted_tau_gets_the_chosen_penalty_and_the_health_is_counted_per_sample(below_clip, penalty_below):
    """Head 0's tau (0.001) is below the clip: its samples get log(s1), 0 or log(s2); the others keep log(clip(tau)).
    The rollout's health: the share of samples at or below s1 (elite 0's), at or above s2 (elite 2's),
    and of samples whose penalty raised the reward.

    Catches: ignoring --dice.below-clip, applying it to the samples inside the clip, counting tau
    below the clip by head instead of by sample, and a bonus fraction of the wrong sign."""
    rows, summary, _ = run_rollout(
        "drop", StepEnsemble(stds=[0.0] * 4), fixed_tau_dice(TAU), dice_config=DiceConfig(below_clip=below_clip)
    )
    elite = torch.tensor([ELITES.index(m) for m in member_of(rows).tolist()])
    penalty = torch.tensor([penalty_below, math.log(0.5), math.log(10.0)])[elite]
    assert torch.allclose(rows["rew"], REWARDS[member_of(rows)] - 2.5 * penalty, atol=1e-6)
    share = lambda mask: mask.float().mean().item()
    assert summary["tau_below_clip"] == pytest.approx(share(elite == 0))
    assert summary["tau_above_clip"] == pytest.approx(share(elite == 2))
    assert summary["bonus_fraction"] == pytest.approx(share(penalty < 0))
    assert summary["tau_median"] == TAU[elite].median().item()
    assert summary["penalty_mean"] == pytest.approx(penalty.mean().item(), abs=1e-5)


@pytest.mark.parametrize("penalty", ["drop", "mopo", "none"])
def test_the_model_buffer_records_the_elite_that_produced_each_sample(penalty):
    """The classifier ratio trains head g on elite g's samples. Catches: no member stored, or the member id instead of the elite's position."""
    rows, _, _ = run_rollout(
        penalty, StepEnsemble(stds=[0.0] * 4), fixed_tau_dice(TAU) if penalty == "drop" else None, horizon=2
    )
    elite = torch.tensor([ELITES.index(m) for m in member_of(rows).tolist()])
    assert torch.equal(rows["member"].long(), elite)


def test_samples_step_only_with_elites():
    """Catches: sampling the member among all members instead of the elites (member 1 is not an elite)."""
    rows, _, _ = run_rollout("none", StepEnsemble(stds=[0.0] * 4))
    assert 1 not in member_of(rows).tolist()


@pytest.mark.parametrize("members", ["all", "elites"])
def test_mopo_penalty_is_the_largest_std_norm_over_the_members(members):
    """u(s, a) = max over the members of ||std_m(s, a)||: every member, as MOPO's fake_env.py (the default), or
    the elites (--mopo-members elites). Member 1, not an elite, has the largest std.

    Catches: the mean over members, the elites by default or every member when the elites are asked for,
    the max of the std instead of its norm, the variance instead of the std, + instead of -.
    """
    stds = [0.1, 5.0, 0.3, 0.2]
    rows, _, _ = run_rollout("mopo", StepEnsemble(stds=stds), eta=0.7, mopo_members=members)
    largest_std = max(stds[m] for m in (ELITES if members == "elites" else range(len(stds))))
    u = largest_std * (1 + rows["obs"][:, 0].abs()) * math.sqrt(OBS_DIM)
    # The states are noisy here, so the producing member shows in the reward: r + eta * u must be an elite's reward.
    model_reward = rows["rew"] + 0.7 * u
    assert ((model_reward[:, None] - REWARDS[ELITES]).abs().min(1).values < 1e-5).all()


def test_none_stores_the_model_reward_unchanged():
    """Catches: any penalty in MBPO mode."""
    rows, _, _ = run_rollout("none", StepEnsemble(stds=[0.0] * 4))
    assert torch.equal(rows["rew"], REWARDS[member_of(rows)])


def test_terminated_samples_stop_and_only_terminations_are_done():
    """Step t+1 starts from exactly the non-terminated next states of step t; done = terminated_fn(s').

    Catches: rolling terminated samples on, stopping the survivors instead, done left at 0,
    done set at the end of the horizon (a truncation), a horizon off by one.
    """
    terminated = lambda next_obs: next_obs[:, 1] > 0.5
    rows, summary, start_obs = run_rollout("none", StepEnsemble(stds=[0.0] * 4), horizon=3, terminated_fn=terminated)
    # Offsets move only dim 0, so a sample terminates at its first step or never.
    assert torch.equal(rows["done"], terminated(rows["next_obs"]).float())
    first = len(start_obs)
    alive = rows["next_obs"][:first][rows["done"][:first] == 0]
    assert 0 < len(alive) < first
    assert len(rows["obs"]) == first + 2 * len(alive)
    assert torch.equal(rows["obs"][first : first + len(alive)], alive)
    assert summary["length_mean"] == pytest.approx(len(rows["obs"]) / first)


def test_without_terminations_every_start_runs_the_whole_horizon():
    rows, summary, start_obs = run_rollout("none", StepEnsemble(stds=[0.0] * 4), horizon=4)
    assert len(rows["obs"]) == 4 * len(start_obs) and summary["length_mean"] == 4
    assert rows["done"].sum() == 0


def test_a_non_finite_model_state_shows_in_the_summary():
    """drop.py stops on a non-finite rollout summary; a NaN state must reach it even when its sample terminates."""
    offsets = OFFSETS.clone()
    offsets[ELITES[0], 2] = math.nan
    _, summary, _ = run_rollout(
        "none", StepEnsemble([0.0] * 4, offsets), terminated_fn=lambda s: ~torch.isfinite(s).all(-1)
    )
    assert math.isnan(summary["state_abs_max"])


def marked_buffer(rows: int, reward: float) -> ReplayBuffer:
    buffer = ReplayBuffer(rows, OBS_DIM, ACT_DIM, torch.device("cpu"))
    buffer.add(
        torch.randn(rows, OBS_DIM),
        torch.randn(rows, ACT_DIM),
        torch.full((rows,), reward),
        torch.randn(rows, OBS_DIM),
        torch.zeros(rows),
    )
    return buffer


@pytest.mark.parametrize("batch_size, real_ratio", [(256, 0.05), (100, 0.5), (64, 0.0), (10, 1.0)])
def test_each_sac_batch_has_exactly_int_batch_times_ratio_real_rows(batch_size, real_ratio):
    """Catches: real data left out, round() instead of int() (256 * 0.05 = 12.8), the ratio inverted, a short batch."""
    real, model = marked_buffer(500, 1.0), marked_buffer(500, -1.0)
    batch = drop.mixed_batch(real, model, batch_size, real_ratio)
    assert len(batch.rew) == batch_size
    assert int((batch.rew == 1.0).sum()) == int(batch_size * real_ratio)


def test_real_data_is_done_only_at_terminals_not_timeouts():
    """Catches: timeouts (time-limit truncations) stored as done, which would stop bootstrapping there."""
    data = types.SimpleNamespace(
        observations=torch.randn(4, OBS_DIM).numpy(),
        actions=torch.randn(4, ACT_DIM).numpy(),
        rewards=torch.arange(4.0).numpy(),
        next_observations=torch.randn(4, OBS_DIM).numpy(),
        terminals=torch.tensor([0, 1, 0, 0]).bool().numpy(),
        timeouts=torch.tensor([0, 0, 1, 0]).bool().numpy(),
        obs_dim=OBS_DIM,
        act_dim=ACT_DIM,
    )
    buffer = drop.real_buffer(data, torch.device("cpu"))
    assert buffer.done.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert torch.equal(buffer.next_obs, torch.as_tensor(data.next_observations))


def test_the_loop_and_the_ensemble_default_to_the_mopo_code_the_authors_build_on():
    """docs/defaults.md: 1000 SAC updates an epoch, a rollout of 50,000 dataset states every 1000, model data kept
    5 epochs, 5% real data per batch; MBPO's ensemble (7 members of 4 x 200, 5 elites, its weight decays,
    holdout and patience). Catches a changed default of any of them."""
    args = drop.Args()
    assert (
        args.steps_per_epoch,
        args.rollout_freq,
        args.rollout_batch_size,
        args.model_retain_epochs,
        args.real_ratio,
    ) == (1000, 1000, 50_000, 5, 0.05)
    assert (args.penalty, args.ratio, args.halt_margin, args.eval_episodes) == ("drop", "dice", 0.1, 10)
    assert DynamicsConfig() == DynamicsConfig(
        num_members=7,
        num_elites=5,
        hidden=200,
        lr=1e-3,
        batch_size=256,
        weight_decays=(2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4),
        logvar_bound_coef=0.01,
        logvar_bounds="shared",
        holdout_ratio=0.2,
        holdout_max=1000,
        patience=5,
        max_epochs=None,
    )


def test_model_buffer_keeps_retain_epochs_of_rollouts():
    args = drop.Args(rollout_batch_size=100, model_retain_epochs=5, steps_per_epoch=1000, rollout_freq=250)
    assert drop.model_buffer_capacity(args, horizon=5) == 100 * 5 * 5 * 4


# ---------------------------------------------------------------------------------------------
# The order of one epoch, watched on a tiny real run.


@pytest.mark.parametrize("episode_start_share", [0.0, 0.5])
def test_epoch_order_dice_then_rollout_then_updates_under_the_current_policy(
    hopper_file, tmp_path, monkeypatch, episode_start_share
):
    """Per epoch: DICE trained (dice_steps, under the current policy), then rollouts every rollout_freq updates, each
    update on a batch with int(batch * real_ratio) rows of real data; DICE pretrained once, before epoch 1.

    Catches: DICE after the rollout it penalises (or after the updates, Algorithm 1's order), DICE on a stale
    copy of the policy, DICE skipped or trained only once, the pretraining dropped, rollouts at another rate,
    real data left out of the batches in the loop itself, DICE's start states s0 other than the data's,
    rollouts that start at fixed or non-data states, evaluation resets not seeded from the run's seed;
    with --episode-start-share, that share of each rollout's starts not at the data's episode starts.
    """
    monkeypatch.chdir(tmp_path)
    events, agents = [], []
    data = datasets.load_dataset("hopper-medium-v2", hopper_file)
    real_obs, real_actions = torch.as_tensor(data.observations), torch.as_tensor(data.actions)
    dice_data, rollout_starts = [], []

    class WatchedSAC(drop.SAC):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            agents.append(self)

        def update(self, batch):
            is_real = (batch.act[:, None, :] == real_actions[None]).all(-1).any(-1)
            events.append(("update", int(is_real.sum())))
            return super().update(batch)

    def watched_train_dice(dice, optimizer, obs, act, next_obs, init_obs, policy, steps, *rest):
        probe = obs[:8]
        with torch.random.fork_rng():
            torch.manual_seed(1)
            given = policy(probe)
            torch.manual_seed(1)
            current = agents[0].actor(probe)[0]
        events.append(("dice", steps, torch.equal(given, current)))
        dice_data.append(torch.equal(init_obs, real_obs) and torch.equal(obs, real_obs))
        return train_dice(dice, optimizer, obs, act, next_obs, init_obs, policy, steps, *rest)

    def watched_rollout(dynamics, actor, penalty, start_obs, *a, **k):
        events.append(("rollout",))
        rollout_starts.append(start_obs)
        return rollout(dynamics, actor, penalty, start_obs, *a, **k)

    def watched_evaluate(actor, env, episodes, seed):
        events.append(("evaluate", episodes, seed))
        return evaluate(actor, env, episodes, seed)

    train_dice, rollout, evaluate = penalties.train_dice, drop.rollout, drop.evaluate
    monkeypatch.setattr(drop, "SAC", WatchedSAC)
    monkeypatch.setattr(penalties, "train_dice", watched_train_dice)
    monkeypatch.setattr(drop, "rollout", watched_rollout)
    monkeypatch.setattr(drop, "evaluate", watched_evaluate)
    argv = ["--env", "hopper-medium-v2", "--dataset", hopper_file, "--epochs", "2", "--steps-per-epoch", "6", "--rollout-freq", "3",
            "--dice-steps", "4", "--dice.pretrain-steps", "7", "--real-ratio", "0.25", "--sac.batch-size", "16", "--eval-every", "2",
            "--eval-episodes", "1", "--rollout-batch-size", "50", "--sac.hidden", "16", "--dice.hidden", "8", "--dynamics.num-members", "3",
            "--dynamics.num-elites", "2", "--dynamics.hidden", "16", "--dynamics.max-epochs", "1", "--run-name", "order", "--seed", "3",
            "--episode-start-share", str(episode_start_share)]  # fmt: skip
    drop.main(tyro.cli(drop.Args, args=argv))
    update = ("update", 4)  # int(16 * 0.25) real rows
    epoch = [("dice", 4, True), ("rollout",), update, update, update, ("rollout",), update, update, update]
    assert events == [("dice", 7, True), *epoch, *epoch, ("evaluate", 1, 3000)]
    # DICE's data and its start states s0 are the dataset's states; each rollout starts at 50 dataset states drawn anew.
    assert dice_data == [True] * 3 and len(rollout_starts) == 4
    episode_starts = [episode.start for episode in data.episode_slices()]
    at_rest = int(50 * episode_start_share)
    for start_obs in rollout_starts:
        rows = (start_obs[:, None, :] == real_obs[None]).all(-1).float().argmax(1)
        assert torch.equal(start_obs, real_obs[rows]) and rows[at_rest:].max() > len(real_obs) // 2
        assert all(row in episode_starts for row in rows[:at_rest].tolist())
        assert not all(row in episode_starts for row in rows[at_rest:].tolist())
    assert not torch.equal(rollout_starts[0], rollout_starts[1])


def test_rollout_starts_take_their_share_of_episode_starts_and_none_draws_as_before():
    """At 0 the rows are torch.randint's alone, so runs before the flag are repeated bit for bit."""
    episode_starts = torch.tensor([0, 40, 95])
    starts = lambda share, size=1000: drop.rollout_starts(
        100, episode_starts, drop.Args(episode_start_share=share, rollout_batch_size=size), torch.device("cpu")
    )
    torch.manual_seed(0)
    uniform = torch.randint(100, (1000,))
    torch.manual_seed(0)
    assert torch.equal(starts(0.0), uniform)
    torch.manual_seed(0)
    mixed = starts(0.25)
    assert torch.equal(mixed[250:], uniform[250:]) and torch.isin(mixed[:250], episode_starts).all()
    assert set(mixed[:250].tolist()) == {0, 40, 95}
    assert torch.isin(starts(1.0), episode_starts).all() and torch.isin(starts(0.3, size=10)[:3], episode_starts).all()


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_an_impossible_episode_start_share_is_refused_in_one_line(share):
    with pytest.raises(SystemExit, match=f"impossible --episode-start-share {share} \\(from 0 to 1\\)"):
        drop.settings(tyro.cli(drop.Args, args=["--episode-start-share", str(share)]), "hopper-medium")


def test_return_bound_is_the_data_reward_plus_eta_times_the_largest_penalty_over_one_minus_gamma():
    """Catches: the model's rewards in the bound, eta or the penalty left out, 1 / gamma for 1 / (1 - gamma)."""
    rewards = torch.tensor([1.0, -2.0, 0.5])
    assert return_bound(rewards, largest_penalty=3.0, eta=0.5, gamma=0.9) == pytest.approx(35.0)  # (2 + 0.5 x 3) / 0.1
    assert return_bound(rewards, largest_penalty=0.0, eta=7.0, gamma=0.99) == pytest.approx(200.0)


@pytest.mark.parametrize(
    "penalty, transform, clip, below_clip, expected",
    [
        ("drop", "log", (0.1, 10.0), "clip", math.log(10.0)),
        ("drop", "log", (0.5, 4.0), "clip", math.log(4.0)),  # |log 0.5| < log 4
        ("drop", "log", (0.01, 4.0), "zero", math.log(100.0)),  # tau just above 0.01 still gets log 0.01
        ("drop", "log", (0.01, 4.0), "max", math.log(100.0)),
        ("drop", "tanh-shift", None, "clip", 1.0),  # tanh(tau - 1) on tau >= 0 lies in [-0.76, 1)
        ("drop", "tanh-offset", None, "clip", math.tanh(1.0)),  # tanh(tau) - tanh(1) lies in [-0.76, 0.24)
        ("none", "log", (0.1, 10.0), "clip", 0.0),
    ],
)
def test_largest_penalty_is_the_transform_at_the_clip_ends(penalty, transform, clip, below_clip, expected):
    args = run_settings(penalty, clip=clip, transform=transform, dice_config=DiceConfig(below_clip=below_clip))
    assert penalty_of(args, StepEnsemble(stds=[0.0] * 4)).largest() == pytest.approx(expected, rel=1e-6)


def test_largest_mopo_penalty_is_the_std_ceiling_of_the_learned_bounds():
    """MOPO's penalty is a norm of stds that each stay below exp(max_logvar / 2): the largest such norm over the rows."""
    dynamics = ProbabilisticEnsemble(
        OBS_DIM, ACT_DIM, DynamicsConfig(num_members=3, num_elites=2, hidden=8, logvar_bounds="per-member")
    )
    with torch.no_grad():
        dynamics.max_logvar.copy_(
            torch.tensor([0.0, 2 * math.log(3.0), -1.0]).view(3, 1, 1).expand_as(dynamics.max_logvar)
        )
    assert penalty_of(run_settings("mopo"), dynamics).largest() == pytest.approx(3.0 * math.sqrt(OBS_DIM + 1))


def test_critic_health_warns_once_after_three_epochs_beyond_the_bound():
    """|mean Q| above 3 x max|r| / (1 - gamma) for three epochs in a row is diverging; a dip below resets the count."""
    health = CriticHealth()
    sac = lambda q, loss=1.0, alpha=0.1: {"q_mean": q, "critic_loss": loss, "alpha": alpha}
    bound = 100.0
    assert health.update(0, sac(299.0), bound) is None and health.over_bound_since is None
    assert (
        health.update(1, sac(-301.0), bound) is None and health.over_bound_since == 1
    )  # |Q|: a very negative critic diverges too
    assert health.update(2, sac(400.0), bound).startswith(
        "warning: the critic over-estimates"
    )  # three epochs above 1 x the bound
    assert (
        health.update(3, sac(100.0), bound) is None and health.over_bound_since is None
    )  # back within: the count starts again
    assert health.update(4, sac(500.0), bound) is None
    assert health.update(5, sac(900.0, loss=50.0), bound) is None
    warning = health.update(6, sac(5000.0, alpha=7.0), bound)
    assert warning.startswith("warning: the critic is diverging") and "since epoch 5" in warning and "300" in warning
    assert health.update(7, sac(1e5), bound) is None  # said once
    assert (health.max_critic_loss, health.max_alpha, health.diverging_since) == (50.0, 7.0, 4)
    assert (
        health.summary()
        == "largest critic loss 50, largest alpha 7, largest rollout |s| 0; critic over-estimating since epoch 1; critic diverging since epoch 5"
    )


def test_critic_health_warns_once_after_three_epochs_above_the_bound_itself():
    """Mean Q above (max|r| + eta x max penalty) / (1 - gamma) is a value no return reaches: three epochs of it is over-estimation."""
    health = CriticHealth()
    sac = lambda q: {"q_mean": q, "critic_loss": 1.0, "alpha": 0.1}
    assert [health.update(epoch, sac(q), 100.0) for epoch, q in enumerate([101.0, 150.0, 90.0, 101.0, 120.0])] == [
        None
    ] * 5
    assert (
        health.above_bound_since == 3 and health.overestimating_since is None
    )  # the dip at epoch 2 restarted the count
    warning = health.update(5, sac(-250.0), 100.0)
    assert (
        warning.startswith("warning: the critic over-estimates: mean Q -250")
        and "since epoch 4" in warning
        and "100" in warning
    )
    assert [health.update(epoch, sac(250.0), 100.0) for epoch in (6, 7, 8)] == [
        None
    ] * 3  # said once; never 3 x: not diverging
    assert (health.overestimating_since, health.diverging_since) == (3, None)
    assert health.summary().endswith("; critic over-estimating since epoch 4")


def test_critic_health_warns_once_when_rollout_states_go_far_beyond_the_data():
    """Beyond 5 x the data's largest |s| (or NaN) is far; said once, with the epoch, and kept in the summary."""
    health = CriticHealth()
    assert health.update_states(0, 49.0, data_state_abs_max=10.0) is None
    assert health.update_states(1, 50.0, data_state_abs_max=10.0) is None  # exactly 5 x is not beyond
    warning = health.update_states(2, 51.0, data_state_abs_max=10.0)
    assert warning.startswith("warning: model rollouts reach |s| = 51 in epoch 3") and "--halt-margin" in warning
    assert health.update_states(3, 900.0, data_state_abs_max=10.0) is None  # said once
    assert (health.max_state_abs, health.far_states_since) == (900.0, 2)
    assert health.summary().endswith("largest rollout |s| 900; rollout states beyond 5 x the data's since epoch 3")
    assert CriticHealth().update_states(0, math.nan, data_state_abs_max=10.0) is not None


def test_rollouts_halt_as_terminations_where_a_state_leaves_the_widened_data_range():
    """Each dimension's range [lo, hi] of the data widens by margin x (hi - lo); outside it (or NaN) terminates, as the env's own terminations do.

    Catches: the margin ignored or taken of |hi| instead of the width, any() for all() (one
    dimension outside is enough), the env's own terminations dropped, halting with no margin given,
    a range taken from part of the data.
    """
    # Ranges [0, 2], [10, 20], [-1, 1], whose ends are the last two of 202 rows.
    real_obs = torch.cat(
        [torch.tensor([[1.0, 15.0, 0.0]]).expand(200, -1), torch.tensor([[0.0, 10.0, -1.0], [2.0, 20.0, 1.0]])]
    )
    env_terminated = lambda s: s[:, 2] > 0.5
    drop.TERMINATION_FNS["test-robot"] = env_terminated
    try:
        halt = drop.rollout_termination("test-robot", real_obs, halt_margin=0.5)  # widened: [-1, 3], [5, 25], [-2, 2]
        never = drop.rollout_termination("test-robot", real_obs, halt_margin=None)
    finally:
        del drop.TERMINATION_FNS["test-robot"]
    states = torch.tensor([
        [-0.9, 24.9, 0.0],  # inside the widened ranges, outside the data's own
        [3.1, 15.0, 0.0],  # dim 0 beyond hi + 0.5 x 2
        [1.0, 4.9, 0.0],  # dim 1 below lo - 0.5 x 10 (a margin of |hi| would be 10)
        [1.0, 15.0, 1.0],  # inside, but the env terminates it
        [math.nan, 15.0, 0.0],
    ])  # fmt: skip
    assert halt(states).tolist() == [False, True, True, True, True]
    assert never(states).tolist() == [False, False, False, True, False]
    rows, summary, start_obs = run_rollout(
        "none",
        StepEnsemble(stds=[0.0] * 4),
        horizon=2,
        terminated_fn=drop.rollout_termination("halfcheetah", torch.tensor([[-3.0] * 3, [3.5] * 3]), 0.0),
    )
    # Offsets move dim 0 by 1, 3 or 4: the samples that end outside [-3, 3.5] are stored as terminal and roll no further.
    first = len(start_obs)
    assert (
        torch.equal(
            rows["done"][:first], ((rows["next_obs"][:first] < -3.0) | (rows["next_obs"][:first] > 3.5)).any(-1).float()
        )
        and 0 < rows["done"][:first].sum() < first
    )
    alive = rows["next_obs"][:first][rows["done"][:first] == 0]
    assert torch.equal(rows["obs"][first:], alive)
    assert summary["terminated_mean"] == pytest.approx(rows["done"].mean().item())


def test_halting_is_on_by_default_and_runs_saved_before_it_never_halted():
    """A checkpoint without halt_margin comes from a run that never halted: resuming it must not start to."""
    assert tyro.cli(drop.Args, args=[]).halt_margin == 0.1
    assert tyro.cli(drop.Args, args=["--halt-margin", "None"]).halt_margin is None
    saved = asdict(drop.Args())
    del saved["halt_margin"]
    assert drop.args_from_dict(saved).halt_margin is None


def test_mopo_takes_every_member_by_default_and_runs_saved_before_the_flag_kept_the_elites():
    """A checkpoint without mopo_members comes from a MOPO run whose penalty took the elites: resuming it must too."""
    assert tyro.cli(drop.Args, args=[]).mopo_members == "all"
    saved = asdict(drop.Args(penalty="mopo"))
    del saved["mopo_members"]
    assert drop.args_from_dict(saved).mopo_members == "elites"
    # a DROP or MBPO run had no member set: it resumes with the default, which settings() accepts
    for penalty in ("drop", "none"):
        saved = asdict(drop.Args(penalty=penalty))
        del saved["mopo_members"]
        resumed = drop.args_from_dict(saved)
        assert resumed.mopo_members == "all"
        drop.settings(resumed, "hopper-medium")


@pytest.mark.parametrize("penalty", ["drop", "none"])
def test_mopo_members_without_mopo_is_refused_in_one_line(penalty):
    """--mopo-members chooses MOPO's member set; with another penalty it would be silently ignored."""
    with pytest.raises(SystemExit, match=f"--mopo-members is MOPO's; --penalty {penalty} takes no member set"):
        drop.settings(tyro.cli(drop.Args, args=["--penalty", penalty, "--mopo-members", "elites"]), "hopper-medium")
    drop.settings(tyro.cli(drop.Args, args=["--penalty", "mopo", "--mopo-members", "elites"]), "hopper-medium")


# ---------------------------------------------------------------------------------------------
# One penalty interface: the loop never asks which penalty it holds.


def test_the_loop_never_names_a_penalty():
    """Adding a penalty is one class in penalties.py and one line in its registry: drop.py's rollout and loop never
    compare against a penalty or ratio name, read --penalty or --ratio to branch, or ask for a penalty class."""
    import ast
    import inspect

    names = {"drop", "mopo", "none", "dice", "classifier"}
    classes = {cls.__name__ for cls in penalties.PENALTIES.values() if cls is not penalties.NoPenalty} | {
        "RatioPenalty"
    }  # NoPenalty is the interface's type
    for function in (drop.rollout, drop.main, drop.log_epoch, drop.evaluation):
        tree = ast.parse(inspect.getsource(function))
        for compare in (
            node for node in ast.walk(tree) if isinstance(node, (ast.Compare, ast.If, ast.IfExp, ast.Match))
        ):
            inside = list(ast.walk(compare.test if isinstance(compare, (ast.If, ast.IfExp)) else compare))
            assert not {n.value for n in inside if isinstance(n, ast.Constant)} & names, (
                function.__name__,
                ast.unparse(compare)[:80],
            )
            assert not {n.attr for n in inside if isinstance(n, ast.Attribute)} & {"penalty", "ratio"}, (
                function.__name__,
                ast.unparse(compare)[:80],
            )
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not used & classes, function.__name__
    assert set(penalties.PENALTIES) == {"drop", "drop-classifier", "mopo", "none"}


class ConstantPenalty(penalties.NoPenalty):
    """A penalty a fork might add: the same amount on every sample, and a count of its training calls (--dice-steps of them)."""

    reads = ("dice_steps",)

    trained = []

    def train(self, steps):
        self.trained.append(steps)
        return {"steps": float(steps)}

    def __call__(self, obs, act, groups):
        return torch.full((len(obs),), 0.25, device=obs.device), None

    def largest(self):
        return 0.25


def test_a_new_penalty_is_one_class_and_one_registry_line(hopper_file, tmp_path, monkeypatch):
    """The loop trains it at each epoch's start, stores r - eta x its value, and logs what it returns."""
    from test_drop import logged_scalars

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(penalties.PENALTIES, "mopo", ConstantPenalty)
    stored = []
    rollout = drop.rollout
    monkeypatch.setattr(drop, "rollout", lambda *a: (rollout(*a), stored.append(a[-1].rew[: a[-1].size].clone()))[0])
    dynamics_rewards = []
    step = ProbabilisticEnsemble.sample_step
    monkeypatch.setattr(
        ProbabilisticEnsemble,
        "sample_step",
        lambda self, *a: (lambda out: (dynamics_rewards.append(out[1]), out)[1])(step(self, *a)),
    )
    argv = ["--env", "hopper-medium-v2", "--dataset", hopper_file, "--penalty", "mopo", "--eta", "2", "--horizon", "1", "--epochs", "2",
            "--steps-per-epoch", "4", "--rollout-freq", "4", "--rollout-batch-size", "30", "--dice-steps", "3", "--eval-every", "2", "--eval-episodes", "1",
            "--sac.hidden", "16", "--sac.batch-size", "16", "--dynamics.num-members", "3", "--dynamics.num-elites", "2", "--dynamics.hidden", "16",
            "--dynamics.max-epochs", "1", "--run-name", "constant"]  # fmt: skip
    drop.main(tyro.cli(drop.Args, args=argv))
    assert ConstantPenalty.trained == [
        100,
        3,
        3,
    ]  # the pretraining (--dice.pretrain-steps), then each epoch's --dice-steps
    assert torch.allclose(stored[0], dynamics_rewards[0] - 2 * 0.25)
    assert logged_scalars(str(tmp_path / "runs" / "constant"))["penalty/steps"] == [3.0, 3.0]


@pytest.mark.parametrize("argv, words", [
    (["--penalty", "mopo", "--dice.preset", "checked"], "--dice.preset is not read by --penalty mopo (drop it)"),
    (["--penalty", "none", "--dice-lr", "1e-3", "--clip", "0.1", "2"], "--dice-lr, --clip are not read by --penalty none (drop them)"),
    (["--penalty", "mopo", "--dice-steps", "5"], "--dice-steps is not read by --penalty mopo"),
    (["--penalty", "mopo", "--transform", "log"], "--transform is not read by --penalty mopo"),
    (["--penalty", "none", "--no-clip"], "--no-clip is not read by --penalty none"),
    (["--penalty", "mopo", "--dice-lambda", "1"], "--dice-lambda is not read by --penalty mopo"),
    (["--penalty", "mopo", "--classifier.lr", "0.1"], "--classifier.lr is not read by --penalty mopo"),
    (["--classifier.hidden", "32"], "--classifier.hidden is not read by --penalty drop --ratio dice"),
    (["--ratio", "classifier", "--dice.nu-lr", "0.1", "--dice-lr", "1e-3"], "--dice-lr, --dice.nu-lr are not read by --penalty drop --ratio classifier"),
])  # fmt: skip
def test_flags_the_run_would_ignore_are_refused_in_one_line(argv, words):
    """A flag that changes nothing in the run it is given to must not pass silently: a sweep would mislabel its column."""
    with pytest.raises(SystemExit, match="error: ") as error:
        drop.settings(tyro.cli(drop.Args, args=argv), "hopper-medium")
    assert words in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("argv", [
    ["--penalty", "mopo"], ["--penalty", "none", "--eta", "0", "--horizon", "3"], ["--dice.preset", "checked", "--clip", "0.1", "5"],
    ["--dice.nu-lr", "0.01", "--dice-lr", "1e-3", "--dice-lambda", "0.5", "--dice-steps", "3", "--no-clip", "--transform", "tanh-shift"],
    ["--ratio", "classifier", "--dice.preset", "checked", "--dice.below-clip", "zero", "--classifier.lr", "0.01", "--clip", "0.1", "5"],
])  # fmt: skip
def test_flags_the_run_uses_are_taken(argv):
    drop.settings(tyro.cli(drop.Args, args=argv), "hopper-medium")
