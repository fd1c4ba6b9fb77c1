"""Forks that break the algorithm go red: each one-line change below, made to a copy of the code,
must fail that file's tests (TESTS). Slow (about 10 s a mutant): `python -m pytest -m slow test_mutants.py`."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the scripts under test

DICE_BLOCK_START = "            if progress.step == 0:\n"
EPOCH_END = "            sac = progress.sac_means()"


def dice_after_the_updates(source: str) -> str:
    """Algorithm 1's order: DICE trained at the end of the epoch, after the rollout it should have penalised."""
    start = source.index(DICE_BLOCK_START)
    end = source.index("            for step in range(progress.step, args.steps_per_epoch):")
    block = source[start:end].replace("progress.step == 0", "True")
    source = source[:start] + source[end:]
    at = source.index(EPOCH_END)
    return source[:at] + block + source[at:]


# fmt: off
# (file, what it breaks, old text, new text or a function of the whole file)
MUTANTS = [
    ("drop.py", "penalty added instead of subtracted", "reward - args.eta * reward_penalty", "reward + args.eta * reward_penalty"),
    ("drop.py", "eta dropped", "reward - args.eta * reward_penalty", "reward - reward_penalty"),
    ("dynamics.py", "MOPO: mean over the members", ".norm(dim=-1).max(0).values", ".norm(dim=-1).mean(0)"),
    ("penalties.py", "MOPO: the elites by default", 'self.members = dynamics.elites if args.mopo_members == "elites" else None', "self.members = dynamics.elites"),
    ("penalties.py", "MOPO: every member when the elites are asked for", 'self.members = dynamics.elites if args.mopo_members == "elites" else None', "self.members = None"),
    ("drop.py", "old DROP runs resume with the elites, then refused", 'values.get("penalty") == "mopo" else "all")', 'True else "all")'),
    ("drop.py", "--mopo-members accepted with any penalty", 'if args.mopo_members != "all" and args.penalty != "mopo":', "if False:"),
    ("drop.py", "rollout starts: the episode-start share ignored", "rows[:at_rest] = episode_starts[torch.randint(len(episode_starts), (at_rest,))].to(device)", "rows[:at_rest] = rows[:at_rest]"),
    ("drop.py", "rollout starts: the loop draws uniformly whatever the share", "real_obs[rollout_starts(real.size, episode_starts, args, device)]", "real_obs[torch.randint(real.size, (args.rollout_batch_size,), device=device)]"),
    ("drop.py", "rollout starts: any share accepted", "0 <= args.episode_start_share <= 1", "True"),
    ("drop.py", "old MOPO runs switch to every member on resume", '    values.setdefault("mopo_members", "elites" if values.get("penalty") == "mopo" else "all")\n', ""),
    ("dynamics.py", "MOPO: the members asked for ignored", "_, logvar = self(obs, act, members)", "_, logvar = self(obs, act, self.elites)"),
    ("dynamics.py", "MOPO: max std instead of its norm", ".norm(dim=-1).max(0).values", ".amax(dim=-1).max(0).values"),
    ("penalties.py", "penalty from head 0 for every sample", "tau = groups.gather(self.net.ratio(groups.scatter(obs), groups.scatter(act)))", "tau = self.net.ratio(obs, act)[0]"),
    ("penalties.py", "penalty from the mean of the heads", "tau = groups.gather(self.net.ratio(groups.scatter(obs), groups.scatter(act)))", "tau = self.net.ratio(obs, act).mean(0)"),
    ("penalties.py", "clip dropped", "penalty(tau, self.transform, self.clip, self.below_clip)", "penalty(tau, self.transform, None, self.below_clip)"),
    ("drop.py", "real data left out of SAC's batches", "num_real = int(batch_size * real_ratio)", "num_real = 0"),
    ("drop.py", "real count rounded", "num_real = int(batch_size * real_ratio)", "num_real = round(batch_size * real_ratio)"),
    ("drop.py", "terminated samples rolled on", "obs = next_obs[~done]", "obs = next_obs"),
    ("drop.py", "done not stored", "reward - args.eta * reward_penalty, next_obs, done, groups.member)", "reward - args.eta * reward_penalty, next_obs, torch.zeros_like(done), groups.member)"),
    ("drop.py", "producing elite not stored", "next_obs, done, groups.member)", "next_obs, done)"),
    ("drop.py", "horizon one step short", "for _ in range(args.horizon):", "for _ in range(args.horizon - 1):"),
    ("drop.py", "timeouts stored as done", "data.next_observations, data.terminals)", "data.next_observations, data.terminals | data.timeouts)"),
    ("drop.py", "DICE trained after the rollout", DICE_BLOCK_START, dice_after_the_updates),
    ("drop.py", "DICE on a stale copy of the policy", "sample_action = lambda obs: agent.actor(obs)[0]",
     "sample_action = (lambda actor: lambda obs: actor(obs)[0])(__import__('copy').deepcopy(agent.actor))"),
    ("drop.py", "DICE pretraining dropped", "penalty.train(args.dice.pretrain_steps)", "penalty.train(0)"),
    ("drop.py", "NaN model states not reported", "torch.maximum(state_abs_max, next_obs.abs().amax())", "torch.maximum(state_abs_max, next_obs.abs().nan_to_num().amax())"),
    ("sac.py", "done ignored in the target", "(1.0 - batch.done) * next_q", "next_q"),
    ("sac.py", "max of the target critics", "self.critic_target(batch.next_obs, next_act).min(0).values", "self.critic_target(batch.next_obs, next_act).max(0).values"),
    ("sac.py", "online critic as the target", "self.critic_target(batch.next_obs, next_act)", "self.critic(batch.next_obs, next_act)"),
    ("sac.py", "entropy bonus sign", "- alpha * next_log_prob", "+ alpha * next_log_prob"),
    ("sac.py", "actor loss sign", "(alpha * log_prob - self.critic(batch.obs, act)", "(alpha * log_prob + self.critic(batch.obs, act)"),
    ("sac.py", "polyak the wrong way", "torch._foreach_lerp_(target_params, params, self.config.polyak)", "torch._foreach_lerp_(target_params, params, 1 - self.config.polyak)"),
    ("sac.py", "temperature loss sign", "alpha_loss = -(self.log_alpha", "alpha_loss = (self.log_alpha"),
    ("sac.py", "log-std floor ignored", "self.log_std(h).clamp(self.log_std_min, LOG_STD_MAX)", "self.log_std(h).clamp(-20.0, LOG_STD_MAX)"),
    ("sac.py", "alpha cap ignored", "self.log_alpha.clamp_(max=math.log(self.config.alpha_max))", "self.log_alpha.clamp_(max=math.inf)"),
    ("sac.py", "q_mean of the target, not the critic", '"q_mean": q.detach().mean()', '"q_mean": target_q.mean()'),
    ("health.py", "Q bound without the discount", "abs(eta) * largest_penalty) / (1 - gamma)", "abs(eta) * largest_penalty)"),
    ("health.py", "Q bound without eta", "(data_rewards.abs().max().item() + abs(eta) * largest_penalty)", "(data_rewards.abs().max().item() + largest_penalty)"),
    ("penalties.py", "largest penalty at the lower clip alone", "transformed(ends, self.transform)", "transformed(ends[:1], self.transform)"),
    ("penalties.py", "largest penalty at the upper clip alone", "transformed(ends, self.transform)", "transformed(ends[1:], self.transform)"),
    ("health.py", "far states judged without the data's scale", "state_abs_max <= FAR_STATE_FACTOR * data_state_abs_max", "state_abs_max <= FAR_STATE_FACTOR"),
    ("drop.py", "halt margin of |hi|, not of the range", "low - halt_margin * (high - low), high + halt_margin * (high - low)", "low - halt_margin * high.abs(), high + halt_margin * high.abs()"),
    ("drop.py", "halt only when every dimension is outside", "~((next_obs >= low) & (next_obs <= high)).all(-1)", "((next_obs < low) | (next_obs > high)).all(-1)"),
    ("drop.py", "halting drops the env's terminations", "env_terminated(next_obs) | ~(", "~("),
    ("drop.py", "halting off by default", "halt_margin: float | None = 0.1", "halt_margin: float | None = None"),
    ("drop.py", "old runs start to halt on resume", '    values.setdefault("halt_margin", None)  # runs saved before the flag existed never halted\n', ""),
    ("health.py", "critic health never reset", "            setattr(self, current, None)\n            return False", "            return False"),
    ("health.py", "over-estimation judged at the divergence's factor", "abs(q) > q_bound, \"above_bound_since\"", "abs(q) > Q_BOUND_FACTOR * q_bound, \"above_bound_since\""),
    ("penalties.py", "GradientDICE refuses its own flags", '"dice_lr", "dice_lambda", "dice.*")', '"dice_lr", "dice_lambda")'),
    ("drop.py", "ratio flags with MOPO pass silently", "    if reason := ignored_flags(args):\n        raise SystemExit", "    if reason := None:\n        raise SystemExit"),
    ("classifier.py", "classifier: labels swapped", "F.softplus(-positive).mean(1) + F.softplus(negative).mean(1)", "F.softplus(positive).mean(1) + F.softplus(-negative).mean(1)"),
    ("classifier.py", "classifier: every head on every elite's samples", "torch.nonzero(model_member == g)", "torch.nonzero(model_member >= 0)"),
    ("classifier.py", "classifier: the logit taken as the ratio", "return self.logit(obs, act, heads).clamp(max=LOGIT_MAX).exp()", "return self.logit(obs, act, heads).clamp(max=LOGIT_MAX)"),
    ("classifier.py", "classifier: the ratio overflows far off the data", "self.logit(obs, act, heads).clamp(max=LOGIT_MAX).exp()", "self.logit(obs, act, heads).exp()"),
    ("classifier.py", "classifier: heads start away from ratio 1", "nn.init.zeros_(self.net.output.bias)", "nn.init.constant_(self.net.output.bias, 1.0)"),
    ("classifier.py", "separation: the state never hidden", "(obs if keep_state else input_mean[:obs_dim].expand_as(obs))", "obs"),
    ("classifier.py", "separation: the clip share on the logit scale", "(model_logit >= math.log(upper_clip))", "(model_logit >= upper_clip)"),
    ("dice.py", "DICE: (1 - gamma) dropped from the start term", "(1 - gamma) * f_init.mean(1)", "f_init.mean(1)"),
    ("dice.py", "DICE: gamma dropped from the flow term", "+ gamma * (tau * f_next).mean(1)", "+ (tau * f_next).mean(1)"),
    ("dice.py", "DICE: f^2 not halved", "- (tau * f + 0.5 * f**2).mean(1)", "- (tau * f + f**2).mean(1)"),
    ("dice.py", "DICE: sign of nu^2", "- 0.5 * nu[:, 0] ** 2)", "+ 0.5 * nu[:, 0] ** 2)"),
    ("dice.py", "DICE: lambda dropped", "+ lam * ((nu * tau - nu)", "+ ((nu * tau - nu)"),
    ("dice.py", "DICE: nu descends", "for p in [*dice.f.parameters(), dice.nu]:", "for p in [*dice.f.parameters()]:"),
    ("dice.py", "DICE: f descends", "for p in [*dice.f.parameters(), dice.nu]:", "for p in [dice.nu]:"),
    ("dice.py", "DICE: nu learning rate ignored", '{"params": [dice.nu], "lr": config.nu_lr or lr}', '{"params": [dice.nu], "lr": lr}'),
    ("dice.py", "DICE: f learning rate ignored", '{"params": list(dice.f.parameters()), "lr": config.f_lr or lr}', '{"params": list(dice.f.parameters()), "lr": lr}'),
    ("dice.py", "DICE: s' not the successor of s", "s_next = next_obs[:, idx]", "s_next = next_obs[:, torch.randint(len(obs), (config.batch_size,), device=obs.device)]"),
    ("dice.py", "DICE: a0 from the data, not the policy", "objective = dice.objective(obs[idx], act[idx], s_next, a_next, s0, a0,", "objective = dice.objective(obs[idx], act[idx], s_next, a_next, s0, act[idx],"),
    ("dice.py", "DICE: s0 from the batch, not the start states", "objective = dice.objective(obs[idx], act[idx], s_next, a_next, s0, a0,", "objective = dice.objective(obs[idx], act[idx], s_next, a_next, obs[idx], a0,"),
    ("dice.py", "DICE: inputs multiplied by the std", "x = (torch.cat([obs, act], -1) - self.input_mean) / self.input_std", "x = (torch.cat([obs, act], -1) - self.input_mean) * self.input_std"),
    ("dice.py", "DICE: heads start at tau = 0", '{"linear": 1.0,', '{"linear": 0.0,'),
    ("dice.py", "DICE: reported objective a sum, not a mean", "return total / max(steps, 1)", "return total"),
    ("dynamics.py", "dynamics: precision not exponentiated", "* (-logvar).exp() + logvar)", "* (-logvar) + logvar)"),
    ("dynamics.py", "dynamics: log-variance term dropped", "* (-logvar).exp() + logvar)", "* (-logvar).exp())"),
    ("dynamics.py", "dynamics: logvar bound penalty sign", "(self.max_logvar.sum() - self.min_logvar.sum())", "(self.min_logvar.sum() - self.max_logvar.sum())"),
    ("dynamics.py", "dynamics: variance used as std", "(0.5 * logvar).exp())", "logvar.exp())"),
    ("dynamics.py", "dynamics: mean instead of a sample", "mean + torch.randn_like(mean) * (0.5 * logvar).exp()", "mean"),
    ("dynamics.py", "dynamics: delta taken as the state", "return obs + sample[:, :-1], sample[:, -1]", "return sample[:, :-1], sample[:, -1]"),
    ("dynamics.py", "dynamics: elites the worst members", "model.elites.copy_(holdout_mse().argsort()[: config.num_elites])", "model.elites.copy_(holdout_mse().argsort(descending=True)[: config.num_elites])"),
    ("dynamics.py", "dynamics: elite next state without s", "[..., :-1] + obs[i : i + chunk]", "[..., :-1]"),
    ("dynamics.py", "dynamics: lower logvar bound flipped", "logvar = min_logvar + F.softplus(logvar - min_logvar)", "logvar = min_logvar - F.softplus(min_logvar - logvar)"),
    ("dynamics.py", "dynamics: log-variance bounds per member by default", 'logvar_bounds: Literal["shared", "per-member"] = "shared"', 'logvar_bounds: Literal["shared", "per-member"] = "per-member"'),
    ("dynamics.py", "dynamics: shared bounds restored to the first epoch's", "best_state[name] = param.detach().clone()", "pass"),
    ("dynamics.py", "MOPO: ceiling of the variance, not the std", "return (0.5 * self.max_logvar).exp().norm(dim=-1).max().item()", "return self.max_logvar.exp().norm(dim=-1).max().item()"),
    ("dynamics.py", "dynamics: holdout also trained on", "holdout, train = perm[:num_holdout], perm[num_holdout:]", "holdout, train = perm[:num_holdout], perm"),
    # Session 14: forks that passed the suite until the tests named in docs/tests.md were added.
    ("drop.py", "penalty read at the next state", "reward_penalty, tau = penalty(obs, act, groups)", "reward_penalty, tau = penalty(next_obs, act, groups)"),
    ("drop.py", "rollouts start from the first rows of the data", "start_obs = real_obs[torch.randint(real.size, (args.rollout_batch_size,), device=device)]", "start_obs = real_obs[: args.rollout_batch_size]"),
    ("penalties.py", "DICE start states s0 from the model successors", "obs, act, self.next_obs, obs, self.policy", "obs, act, self.next_obs, self.next_obs[0], self.policy"),
    ("drop.py", "halting box from part of the data", "low, high = real_obs.min(0).values, real_obs.max(0).values", "low, high = real_obs[:100].min(0).values, real_obs[:100].max(0).values"),
    ("drop.py", "evaluation not seeded from the run seed", "evaluate(actor, make_eval_env(data), args.eval_episodes, seed=args.seed * 1000)", "evaluate(actor, make_eval_env(data), args.eval_episodes, seed=0)"),
    ("drop.py", "real_ratio default 0.5", "real_ratio: float = 0.05", "real_ratio: float = 0.5"),
    ("drop.py", "rollout batch default 5,000", "rollout_batch_size: int = 50_000", "rollout_batch_size: int = 5_000"),
    ("drop.py", "model_retain_epochs default 1", "model_retain_epochs: int = 5", "model_retain_epochs: int = 1"),
    ("penalties.py", "classifier loop: positives from the data", "positives = buffer.obs[:size], buffer.act[:size], buffer.member[:size]", "positives = self.data_obs[:size], self.data_act[:size], buffer.member[:size]"),
    ("penalties.py", "classifier loop: negatives from the model buffer", "negatives = self.net, (self.data_obs, self.data_act)", "negatives = self.net, (buffer.obs[:size], buffer.act[:size])"),
    ("penalties.py", "classifier loop: positives capped at the buffer's first 1,000 rows", "buffer, size = self.model_buffer, self.model_buffer.size", "buffer, size = self.model_buffer, min(self.model_buffer.size, 1000)"),
    ("penalties.py", "classifier loop: one step an epoch", "*negatives, steps, self.batch_size)", "*negatives, 1, self.batch_size)"),
    ("penalties.py", "classifier loop: --classifier.lr ignored", "adam(self.net.parameters(), args.classifier.lr, data_obs.device)", "adam(self.net.parameters(), 1e-4, data_obs.device)"),
    ("penalties.py", "classifier loop: --classifier.batch-size ignored", "*negatives, steps, self.batch_size)", "*negatives, steps, 256)"),
    ("penalties.py", "classifier loop: --classifier.hidden ignored", "hidden, mean, std = args.classifier.hidden,", "hidden, mean, std = 64,"),
    ("penalties.py", "classifier loop: raw inputs, not the ensemble's statistics", "hidden, mean, std = args.classifier.hidden, dynamics.input_mean, dynamics.input_std", "hidden, mean, std = args.classifier.hidden, torch.zeros_like(dynamics.input_mean), torch.ones_like(dynamics.input_std)"),
    ("sac.py", "SAC: target entropy -|A| / 2", "self.target_entropy = -float(act_dim)", "self.target_entropy = -float(act_dim) / 2"),
    ("sac.py", "SAC: gamma default 0.9", "gamma: float = 0.99", "gamma: float = 0.9"),
    ("sac.py", "SAC: alpha starts at e", "self.log_alpha = torch.zeros((), device=device, requires_grad=True)", "self.log_alpha = torch.ones((), device=device, requires_grad=True)"),
    ("sac.py", "evaluation: action not scaled to the env", "env.step(actor.act(obs) * action_scale)", "env.step(actor.act(obs))"),
    ("sac.py", "buffer: samples the empty rows", "idx = torch.randint(self.size, (n,), device=self.obs.device)", "idx = torch.randint(self.capacity, (n,), device=self.obs.device)"),
    ("sac.py", "SAC: polyak default 0.05", "polyak: float = 5e-3", "polyak: float = 5e-2"),
    ("sac.py", "SAC: targets not started equal to the critics", "        self.critic_target.load_state_dict(self.critic.state_dict())\n", ""),
    ("sac.py", "SAC: temperature loss on alpha, not log alpha", "alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()", "alpha_loss = -(self.log_alpha.exp() * (log_prob.detach() + self.target_entropy)).mean()"),
    ("dynamics.py", "dynamics: no bootstrap", "bootstrap = train[torch.randint(len(train), (config.num_members, len(train)), generator=generator, device=device)]", "bootstrap = train.expand(config.num_members, -1)"),
    ("dynamics.py", "dynamics: 3 elites by default", "num_elites: int = 5", "num_elites: int = 3"),
    ("dynamics.py", "dynamics: any gain resets the patience", "improved = (best - mse) / best > 0.01", "improved = (best - mse) / best > 0.0"),
    ("dynamics.py", "dynamics: members keep their last weights", "best_state[name][improved] = param.detach()[improved]", "best_state[name] = param.detach().clone()"),
    ("dice.py", "DICE: checked preset nu lr", "\"checked\": dict(optimizer=\"adam\", nu_lr=1e-2,", "\"checked\": dict(optimizer=\"adam\", nu_lr=1e-3,"),
    ("dice.py", "DICE: checked preset lam", "nu_lr=1e-2, f_lr=None, lam=1.0,", "nu_lr=1e-2, f_lr=None, lam=0.5,"),
    ("dice.py", "DICE: authors preset standardises", "lam=None, output=\"linear\", normalize_inputs=False, below_clip=\"clip\"),", "lam=None, output=\"linear\", normalize_inputs=True, below_clip=\"clip\"),"),
    ("dice.py", "DICE: gamma default 0.95", "    gamma: float = 0.99\n", "    gamma: float = 0.95\n"),
    ("dice.py", "DICE: 10 pretraining steps", "pretrain_steps: int = 100", "pretrain_steps: int = 10"),
    ("dice.py", "DICE: heads 32 wide", "    hidden: int = 64\n", "    hidden: int = 32\n"),
    ("classifier.py", "classifier: raw inputs", "x = (torch.cat([obs, act], -1) - self.input_mean) / self.input_std", "x = torch.cat([obs, act], -1)"),
    ("classifier.py", "classifier: unbalanced batches", "data_idx = torch.randint(len(data_obs), (heads, batch_size), device=device)", "data_idx = torch.randint(len(data_obs), (heads, batch_size // 4), device=device)"),
    ("classifier.py", "classifier: last step loss reported", "return total / max(steps, 1)", "return loss.detach()"),
    ("classifier.py", "classifier: heads 32 wide", "    hidden: int = 64\n", "    hidden: int = 32\n"),
    ("classifier.py", "classifier: lr 1e-4", "    lr: float = 1e-3\n", "    lr: float = 1e-4\n"),
]
# fmt: on


# The tests each file's mutants must fail.
TESTS = {
    "drop.py": ["test_loop.py", "test_sac.py"],
    "sac.py": ["test_loop.py", "test_sac.py"],
    "dice.py": ["test_dice.py", "test_known_answer.py"],
    "dynamics.py": ["test_dynamics.py", "test_loop.py"],
    "classifier.py": ["test_classifier.py"],
    "penalties.py": ["test_loop.py"],
    "health.py": ["test_loop.py"],
}


def watching_tests(file: str, breaks: str) -> list[str]:
    """TESTS[file]; the classifier's part of the loop ("classifier loop: ...") is watched by test_classifier.py's tiny run too."""
    return TESTS[file] + (["test_classifier.py"] if breaks.startswith("classifier loop:") else [])


def run_tests_on_a_copy(tmp_path, file: str, change, tests: list[str] | None = None) -> subprocess.CompletedProcess:
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "pyproject.toml":
            shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "tests"), tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    os.symlink(os.path.join(ROOT, "policies"), tmp_path / "policies")  # the built-in behaviour policies
    (tmp_path / file).write_text(change((tmp_path / file).read_text()))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            *(f"tests/{name}" for name in tests or TESTS[file]),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("file", ["drop.py", "dice.py", "dynamics.py", "classifier.py", "penalties.py", "health.py"])
def test_the_unchanged_copy_passes(file, tmp_path):
    """The control: a copy without a change passes, so a failing mutant failed for its change."""
    result = run_tests_on_a_copy(tmp_path, file, lambda source: source)
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("file, breaks, old, new", MUTANTS, ids=[m[1] for m in MUTANTS])
def test_mutant_is_caught(file, breaks, old, new, tmp_path):
    def mutate(source: str) -> str:
        assert source.count(old) == 1, f"the mutant's text is no longer in {file}: update MUTANTS"
        return new(source) if callable(new) else source.replace(old, new)

    result = run_tests_on_a_copy(tmp_path, file, mutate, watching_tests(file, breaks))
    assert result.returncode == 1, f"{breaks}: no test failed\n{result.stdout[-2000:]}"
