"""Forks that break the algorithm go red: each one-line change below, made to a copy of the code,
must fail test_loop.py or test_sac.py. Slow (about 10 s a mutant): `python -m pytest -m slow test_mutants.py`."""

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

DICE_BLOCK_START = "            if dice is not None and progress.step == 0:\n"
EPOCH_END = "            # The epoch's means"


def dice_after_the_updates(source: str) -> str:
    """Algorithm 1's order: DICE trained at the end of the epoch, after the rollout it should have penalised."""
    start = source.index(DICE_BLOCK_START)
    end = source.index("            for step in range(progress.step, args.steps_per_epoch):")
    block = source[start:end].replace("progress.step == 0", "True")
    source = source[:start] + source[end:]
    at = source.index(EPOCH_END)
    return source[:at] + block + source[at:]


# (file, what it breaks, old text, new text or a function of the whole file)
MUTANTS = [
    ("drop.py", "penalty added instead of subtracted", "reward - hp.eta * reward_penalty", "reward + hp.eta * reward_penalty"),
    ("drop.py", "eta dropped", "reward - hp.eta * reward_penalty", "reward - reward_penalty"),
    ("drop.py", "MOPO: mean over elites", ".norm(dim=-1).max(0).values", ".norm(dim=-1).mean(0)"),
    ("drop.py", "MOPO: all members", "_, logvar = dynamics(obs, act, dynamics.elites)", "_, logvar = dynamics(obs, act)"),
    ("drop.py", "MOPO: max std instead of its norm", ".norm(dim=-1).max(0).values", ".amax(dim=-1).max(0).values"),
    ("drop.py", "penalty from head 0 for every sample", "tau = groups.gather(dice.ratio(groups.scatter(obs), groups.scatter(act)))", "tau = dice.ratio(obs, act)[0]"),
    ("drop.py", "penalty from the mean of the heads", "tau = groups.gather(dice.ratio(groups.scatter(obs), groups.scatter(act)))", "tau = dice.ratio(obs, act).mean(0)"),
    ("drop.py", "clip dropped", "penalty(tau, hp.transform, hp.clip, dice_config.below_clip)", "penalty(tau, hp.transform, None, dice_config.below_clip)"),
    ("drop.py", "real data left out of SAC's batches", "num_real = int(batch_size * real_ratio)", "num_real = 0"),
    ("drop.py", "real count rounded", "num_real = int(batch_size * real_ratio)", "num_real = round(batch_size * real_ratio)"),
    ("drop.py", "terminated samples rolled on", "obs = next_obs[~done]", "obs = next_obs"),
    ("drop.py", "done not stored", "reward - hp.eta * reward_penalty, next_obs, done)", "reward - hp.eta * reward_penalty, next_obs, torch.zeros_like(done))"),
    ("drop.py", "horizon one step short", "for _ in range(hp.horizon):", "for _ in range(hp.horizon - 1):"),
    ("drop.py", "timeouts stored as done", "data.next_observations, data.terminals)", "data.next_observations, data.terminals | data.timeouts)"),
    ("drop.py", "DICE trained after the rollout", DICE_BLOCK_START, dice_after_the_updates),
    ("drop.py", "DICE on a stale copy of the policy", "sample_action = lambda obs: agent.actor(obs)[0]",
     "sample_action = (lambda actor: lambda obs: actor(obs)[0])(__import__('copy').deepcopy(agent.actor))"),
    ("drop.py", "DICE pretraining dropped", "args.dice.pretrain_steps, dice_config", "0, dice_config"),
    ("drop.py", "NaN model states not reported", "torch.maximum(state_abs_max, next_obs.abs().amax())", "torch.maximum(state_abs_max, next_obs.abs().nan_to_num().amax())"),
    ("sac.py", "done ignored in the target", "(1.0 - batch.done) * next_q", "next_q"),
    ("sac.py", "max of the target critics", "self.critic_target(batch.next_obs, next_act).min(0).values", "self.critic_target(batch.next_obs, next_act).max(0).values"),
    ("sac.py", "online critic as the target", "self.critic_target(batch.next_obs, next_act)", "self.critic(batch.next_obs, next_act)"),
    ("sac.py", "entropy bonus sign", "- alpha * next_log_prob", "+ alpha * next_log_prob"),
    ("sac.py", "actor loss sign", "(alpha * log_prob - self.critic(batch.obs, act)", "(alpha * log_prob + self.critic(batch.obs, act)"),
    ("sac.py", "polyak the wrong way", "torch._foreach_lerp_(target_params, params, self.config.polyak)", "torch._foreach_lerp_(target_params, params, 1 - self.config.polyak)"),
    ("sac.py", "temperature loss sign", "alpha_loss = -(self.log_alpha", "alpha_loss = (self.log_alpha"),
]


def run_tests_on_a_copy(tmp_path, file: str, change) -> subprocess.CompletedProcess:
    for name in os.listdir(HERE):
        if name.endswith((".py", ".ini")):
            shutil.copy(os.path.join(HERE, name), tmp_path / name)
    (tmp_path / file).write_text(change((tmp_path / file).read_text()))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_loop.py", "test_sac.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_unchanged_copy_passes(tmp_path):
    """The control: a copy without a change passes, so a failing mutant failed for its change."""
    result = run_tests_on_a_copy(tmp_path, "drop.py", lambda source: source)
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("file, breaks, old, new", MUTANTS, ids=[m[1] for m in MUTANTS])
def test_mutant_is_caught(file, breaks, old, new, tmp_path):
    def mutate(source: str) -> str:
        assert source.count(old) == 1, f"the mutant's text is no longer in {file}: update MUTANTS"
        return new(source) if callable(new) else source.replace(old, new)

    result = run_tests_on_a_copy(tmp_path, file, mutate)
    assert result.returncode == 1, f"{breaks}: no test failed\n{result.stdout[-2000:]}"
