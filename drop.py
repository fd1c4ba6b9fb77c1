"""DROP: Density Ratio regularized Offline Policy learning (model-based offline RL).

    python drop.py --env hopper-medium-v2 --eta 1.0
    python drop.py --resume runs/RUN          # continue a stopped run exactly where it stopped
    python drop.py --resume runs/RUN --epochs 500   # train a run on: the same as a 500-epoch run

1. Fit a bootstrapped ensemble of probabilistic dynamics models to the offline data.
2. Every epoch, train one GradientDICE head per elite member to estimate
   tau(s, a) = rho_pi^model(s, a) / d_data(s, a) under the current policy
   (`--ratio classifier`: a classifier of model-buffer against dataset samples, classifier.py).
3. Roll the policy out in the model from dataset states, ending where a state leaves the data's
   range (--halt-margin); penalise each model reward with r - eta * log(clip(tau, s1, s2)), using
   the head of the member that produced the transition.
4. Train SAC on batches of 5% real and 95% model transitions.

`--penalty mopo` swaps step 3's penalty for MOPO's (the largest std norm over the elites) and
`--penalty none` removes it (MBPO); both skip step 2 and take MOPO's per-dataset h (tasks.py).
Every epoch logs SAC's mean Q beside the return bound (max|r| + eta x max penalty) / (1 - gamma)
and says in one line when the critic diverges or the rollouts go far off the data; the last line
of a run states its largest critic loss and alpha.
"""

import csv
import glob
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

import numpy as np
import torch

from checkpoint import atomic_save, atomic_write, buffer_state, check_writable, exclusive_lock, load_buffer_state, load_checkpoint, load_optimizer_state, rng_state, set_rng_state
from classifier import ClassifierConfig, RatioClassifier, train_classifier
from datasets import DEFAULT_ENV, DatasetError, OfflineDataset, load_dataset, make_eval_env, normalized_score
from dice import DiceConfig, GradientDICE, build_dice, dice_optimizer, penalty, resolve, train_dice, transformed
from dynamics import TERMINATION_FNS, TRAINING_STATE_SUFFIX, DynamicsConfig, MemberGroups, ProbabilisticEnsemble, load_ensemble, save_ensemble, train_ensemble
from sac import SAC, Batch, ReplayBuffer, SACConfig, adam, evaluate, pick_device, seed_everything, start_run
from tasks import TaskDefaults, Transform, task_defaults


@dataclass
class Args:
    env: str = DEFAULT_ENV
    """dataset: D4RL name (hopper-medium-v2), built-in (builtin-hopper-medium) or Minari id (mujoco/hopper/medium-v0)"""
    dataset: str | None = None
    """a D4RL-format HDF5 file to train on; --env then fixes the eval env, the score and the defaults"""
    penalty: Literal["drop", "mopo", "none"] = "drop"
    """reward penalty: drop (density ratio), mopo (max std norm over elites) or none (MBPO)"""
    ratio: Literal["dice", "classifier"] = "dice"
    """DROP's ratio estimator: dice (GradientDICE, the paper's) or classifier (rollout vs data samples, defined where the rollouts go)"""
    eta: float | None = None
    """penalty coefficient (default: the per-dataset table)"""
    horizon: int | None = None
    """model rollout length h (default: the per-dataset table)"""
    epochs: int | None = None
    """training epochs (default: the per-dataset table)"""
    dice_steps: int | None = None
    """GradientDICE steps per epoch (default: the per-dataset table)"""
    dice_lr: float | None = None
    """GradientDICE Adam learning rate (default: the per-dataset table)"""
    dice_lambda: float | None = None
    """weight lam of GradientDICE's normalisation constraint (default: --dice.lam, else the per-dataset table)"""
    transform: Transform | None = None
    """penalty transform of tau: log, tanh-shift = tanh(tau-1), tanh-offset = tanh(tau)-tanh(1) (default: table)"""
    clip: tuple[float, float] | None = None
    """clip tau into [s1, s2] before the transform (default: the per-dataset table)"""
    no_clip: bool = False
    """do not clip tau (overrides the table's clip)"""
    steps_per_epoch: int = 1000
    """SAC updates per epoch"""
    rollout_freq: int = 1000
    """SAC updates between model rollouts"""
    rollout_batch_size: int = 50_000
    """dataset start states per model rollout"""
    halt_margin: float | None = 0.1
    """end a model rollout, as a termination, where its state leaves the data's range of each dimension widened by this fraction of it (None: never, as the authors and MBPO)"""
    model_retain_epochs: int = 5
    """epochs a model transition stays in the model buffer"""
    real_ratio: float = 0.05
    """fraction of real transitions in each SAC batch"""
    eval_every: int = 10
    """evaluate every this many epochs (and after the last)"""
    save_every: int | None = None
    """write runs/RUN/checkpoint.pt, everything needed to continue, every this many epochs (default: --eval-every)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes"""
    dynamics_path: str | None = None
    """reuse an ensemble saved by dynamics.py or an earlier drop.py run instead of training one (wins over the cache)"""
    no_dynamics_cache: bool = False
    """train the ensemble into runs/RUN/dynamics.pt instead of reusing or filling $DROP_CACHE_DIR (default ~/.cache/drop/dynamics)"""
    resume: str | None = None
    """continue the stopped run in this folder (runs/RUN) from its checkpoint, with its own arguments; only --seed, the learning rates, --epochs (to extend it), --device and --track may change"""
    seed: int = 0
    """seed of everything: dynamics, DICE, SAC, rollouts and evaluation resets"""
    device: str = "auto"
    """torch device: auto, cpu or cuda"""
    run_name: str | None = None
    """name of runs/{run_name}; default: drop__{dataset}__{penalty}__{seed}__{time}"""
    track: bool = False
    """mirror the TensorBoard logs to Weights & Biases"""
    sac: SACConfig = field(default_factory=SACConfig)
    """SAC hyperparameters"""
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    """dynamics ensemble architecture and training"""
    dice: DiceConfig = field(default_factory=DiceConfig)
    """GradientDICE settings shared by all datasets (--dice.preset checked: the variant that passes the known-answer checks)"""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    """settings of the classifier ratio (--ratio classifier)"""


def args_from_dict(values: dict) -> Args:
    """The Args of a saved run (`asdict(args)` in its checkpoint), nested configs included."""
    nested = {"sac": SACConfig, "dynamics": DynamicsConfig, "dice": DiceConfig, "classifier": ClassifierConfig}
    values = {name: nested[name](**value) if name in nested else value for name, value in values.items()}
    values["dynamics"].weight_decays = tuple(values["dynamics"].weight_decays)
    values["clip"] = tuple(values["clip"]) if values.get("clip") is not None else None
    values.setdefault("halt_margin", None)  # runs saved before the flag existed never halted
    known = {f.name for f in fields(Args)}
    return Args(**{name: value for name, value in values.items() if name in known})


def task_hyperparameters(args: Args, task: str) -> TaskDefaults:
    """The table's entry for `task` and `--penalty` (tasks.py), with every flag the user gave on top."""
    try:
        defaults = task_defaults(task, args.penalty)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    overrides = {name: getattr(args, name) for name in ("horizon", "eta", "dice_steps", "dice_lr", "dice_lambda", "clip", "transform", "epochs")}
    given = {name: value for name, value in overrides.items() if value is not None}
    flags = ", ".join("--" + name.replace("_", "-") for name in given)
    hp = replace(defaults, **given, source=defaults.source + (f"; {flags} from the command line" if given else ""))
    dice_lambda = resolve(args.dice).lam
    if args.dice_lambda is None and dice_lambda is not None:
        hp = replace(hp, dice_lambda=dice_lambda)
    if args.no_clip:
        hp = replace(hp, clip=None)
    rules = [("--horizon", hp.horizon, hp.horizon >= 1, "at least 1"), ("--epochs", hp.epochs, hp.epochs >= 1, "at least 1"),
             ("--eta", hp.eta, hp.eta >= 0, "at least 0"), ("--dice-steps", hp.dice_steps, hp.dice_steps >= 0, "at least 0"),
             ("--dice-lr", hp.dice_lr, hp.dice_lr > 0, "above 0")]
    impossible = [f"{flag} {value} ({rule})" for flag, value, holds, rule in rules if not holds]
    if args.halt_margin is not None and args.halt_margin < 0:
        impossible.append(f"--halt-margin {args.halt_margin} (at least 0, or None never to halt)")
    if hp.clip is not None and hp.clip[0] >= hp.clip[1]:
        impossible.append(f"--clip {hp.clip[0]} {hp.clip[1]} (the lower bound below the upper)")
    if impossible:
        raise SystemExit(f"error: impossible {', '.join(impossible)}")
    if args.ratio == "classifier" and args.penalty != "drop":
        raise SystemExit(f"error: --ratio classifier is DROP's ratio estimator; --penalty {args.penalty} has no ratio (drop --ratio, or use --penalty drop)")
    if args.ratio == "classifier" and (hp.dice_steps < 1 or args.classifier.batch_size < 1):
        raise SystemExit(f"error: --ratio classifier needs --dice-steps and --classifier.batch-size of at least 1 (got {hp.dice_steps}, {args.classifier.batch_size})")
    if args.penalty == "drop" and hp.transform == "log" and (hp.clip is None or hp.clip[0] <= 0):
        raise SystemExit("error: the log transform needs a clip with a positive lower bound: pass --clip 0.01 10 or another --transform")
    return hp


def real_buffer(data: OfflineDataset, device: torch.device) -> ReplayBuffer:
    buffer = ReplayBuffer(len(data.observations), data.obs_dim, data.act_dim, device)
    as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)
    # Only true terminations stop bootstrapping; time-limit truncations (timeouts) do not.
    buffer.add(*(as_tensor(x) for x in (data.observations, data.actions, data.rewards, data.next_observations, data.terminals)))
    return buffer


def rollout_termination(family: str, real_obs: torch.Tensor, halt_margin: float | None):
    """When a model rollout ends: where the env itself terminates, and with a margin, where it leaves the data's range.

    A learned model extrapolates far off the data within a few steps (on the halfcheetah ensemble
    trained to early stopping, 5-step rollouts reach |s| = 970 where the data's largest is 28), and
    a critic that bootstraps from those invented states diverged there with DROP's penalty and with
    none (docs/stable-loop.md). Ending there as a termination gives them no value to bootstrap from.
    NaN counts as outside.
    """
    env_terminated = TERMINATION_FNS[family]
    if halt_margin is None:
        return env_terminated
    low, high = real_obs.min(0).values, real_obs.max(0).values
    low, high = low - halt_margin * (high - low), high + halt_margin * (high - low)
    return lambda next_obs: env_terminated(next_obs) | ~((next_obs >= low) & (next_obs <= high)).all(-1)


def build_ratio(args: Args, obs_dim: int, act_dim: int, dynamics: ProbabilisticEnsemble) -> GradientDICE | RatioClassifier:
    """DROP's ratio heads, one per elite: GradientDICE (the paper's), or with --ratio classifier the classifier."""
    if args.ratio == "classifier":
        return RatioClassifier(obs_dim, act_dim, len(dynamics.elites), args.classifier.hidden, dynamics.input_mean, dynamics.input_std)
    return build_dice(resolve(args.dice), obs_dim, act_dim, len(dynamics.elites), dynamics.input_mean, dynamics.input_std)


def drop_penalty(dice: GradientDICE | RatioClassifier, obs, act, groups: MemberGroups, hp: TaskDefaults, dice_config: DiceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """tau of each sample under its own elite's head, and the penalty eta multiplies."""
    # Head g belongs to elite g, so the grouped layout pairs each sample with its member's head.
    tau = groups.gather(dice.ratio(groups.scatter(obs), groups.scatter(act)))
    return tau, penalty(tau, hp.transform, hp.clip, dice_config.below_clip)


@torch.no_grad()
def rollout(dynamics, agent, dice, start_obs, hp: TaskDefaults, args: Args, terminated_fn, buffer: ReplayBuffer) -> dict[str, float]:
    """h-step rollouts from `start_obs`; each sample steps with a random elite and is penalised, then stored.

    Returns means over the stored samples, including the penalty's health: how often tau fell
    outside the clip and how often the "penalty" raised the reward instead of lowering it.
    """
    num_elites, dice_config = len(dynamics.elites), resolve(args.dice)
    obs, stats = start_obs, {"reward": [], "penalty": [], "terminated": [], "tau": []}
    state_abs_max = torch.zeros((), device=obs.device)
    for _ in range(hp.horizon):
        act, _ = agent.actor(obs)
        groups = MemberGroups(torch.randint(num_elites, (len(obs),), device=obs.device), num_elites)
        next_obs, reward = dynamics.sample_step(obs, act, groups)
        state_abs_max = torch.maximum(state_abs_max, next_obs.abs().amax())  # NaN-propagating: a broken model state shows here
        if args.penalty == "drop":
            tau, reward_penalty = drop_penalty(dice, obs, act, groups, hp, dice_config)
            stats["tau"].append(tau)
        elif args.penalty == "mopo":
            reward_penalty = dynamics.mopo_penalty(obs, act)
        else:
            reward_penalty = torch.zeros_like(reward)
        stats["reward"].append(reward)
        stats["penalty"].append(reward_penalty)
        done = terminated_fn(next_obs)
        stats["terminated"].append(done.float())
        buffer.add(obs, act, reward - hp.eta * reward_penalty, next_obs, done, groups.member)
        obs = next_obs[~done]
        if len(obs) == 0:
            break
    stats = {name: torch.cat(values) for name, values in stats.items() if values}
    summary = {f"{name}_mean": values.mean().item() for name, values in stats.items()}
    summary["length_mean"] = len(stats["reward"]) / len(start_obs)
    summary["state_abs_max"] = state_abs_max.item()
    summary["bonus_fraction"] = (hp.eta * stats["penalty"] < 0).float().mean().item()
    if "tau" in stats:  # the classifier's tau is exp(logit): heavy-tailed, so its mean says little and its median much
        summary["tau_median"] = stats["tau"].median().item()
    if "tau" in stats and hp.clip is not None:
        summary["tau_below_clip"] = (stats["tau"] <= hp.clip[0]).float().mean().item()
        summary["tau_above_clip"] = (stats["tau"] >= hp.clip[1]).float().mean().item()
    return summary


PROGRESS_COLUMNS = ["epoch", "normalized_score", "normalized_score_std", "return", "wall_seconds", "penalty_mean", "rollout_tau_mean", "rollout_tau_median"]


def write_progress(path: str, rows: list[dict]):
    """One evaluation per row of runs/RUN/progress.csv, so sweeps need not parse TensorBoard.

    Rewritten whole from the run's evaluation history, so a resumed run never repeats a row.
    """

    def write(file):
        writer = csv.DictWriter(file, PROGRESS_COLUMNS, restval="nan")  # evaluations saved before a column existed lack it
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write, binary=False)


def model_buffer_capacity(args: Args, horizon: int) -> int:
    """Room for `model_retain_epochs` epochs of rollouts, each at most rollout_batch_size * horizon."""
    rollouts_per_epoch = max(args.steps_per_epoch // args.rollout_freq, 1)
    return args.rollout_batch_size * horizon * args.model_retain_epochs * rollouts_per_epoch


def mixed_batch(real: ReplayBuffer, model: ReplayBuffer, batch_size: int, real_ratio: float) -> Batch:
    num_real = int(batch_size * real_ratio)
    real_part, model_part = real.sample(num_real), model.sample(batch_size - num_real)
    return Batch(*(torch.cat(pair) for pair in zip(real_part, model_part)))


@dataclass
class EpochProgress:
    """What the current epoch has done so far: enough to stop after any SAC update and continue exactly."""

    step: int = 0
    """SAC updates done (the epoch's DICE training comes before the first)"""
    dice: dict[str, float] = field(default_factory=dict)
    """the epoch's DICE statistics"""
    rollouts: list[dict[str, float]] = field(default_factory=list)
    """each rollout's summary"""
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    """SAC's losses summed over the updates (tensors: no host sync per update)"""


def largest_penalty(args: Args, hp: TaskDefaults, dynamics: ProbabilisticEnsemble) -> float:
    """The largest |penalty| the run's estimator can give: its transform at the clip's ends, or MOPO's std ceiling."""
    if args.penalty == "mopo":
        return dynamics.mopo_penalty_ceiling()
    if args.penalty == "drop":  # each transform is monotone, so the clip's ends (or 0 and infinity) bound it; below_clip's fills lie within
        ends = torch.tensor(hp.clip if hp.clip is not None else (0.0, math.inf))
        return transformed(ends, hp.transform).abs().max().item()
    return 0.0


def return_bound(data_rewards: torch.Tensor, largest_penalty: float, eta: float, gamma: float) -> float:
    """(max|r| of the data + |eta| x the largest penalty) / (1 - gamma): the largest |return| penalised rewards allow.

    It is taken from the data, not the model buffer: a model that invents rewards far beyond the
    data's would otherwise raise the bound that should catch it.
    """
    return (data_rewards.abs().max().item() + abs(eta) * largest_penalty) / (1 - gamma)


# The critic counts as diverging when |mean Q| stays above this many times the return bound for this many epochs.
Q_BOUND_FACTOR, DIVERGING_EPOCHS = 3.0, 3
# Model rollouts count as far off the data when their largest |s| exceeds this many times the data's.
FAR_STATE_FACTOR = 5.0


@dataclass
class CriticHealth:
    """What every report of a run states: SAC's largest epoch-mean critic loss and alpha, whether Q diverged, and how far the rollouts went."""

    max_critic_loss: float = 0.0
    max_alpha: float = 0.0
    over_bound_since: int | None = None
    """first epoch (0-based) of the current stretch with |mean Q| above Q_BOUND_FACTOR x the reward bound"""
    diverging_since: int | None = None
    """over_bound_since of the first stretch that lasted DIVERGING_EPOCHS epochs"""
    max_state_abs: float = 0.0
    """the largest |s| of any model rollout state"""
    far_states_since: int | None = None
    """the first epoch whose rollout states went beyond FAR_STATE_FACTOR x the data's largest |s|"""

    def update(self, epoch: int, sac: dict[str, float], q_bound: float) -> str | None:
        """Take one epoch's SAC means; returns the one-line warning when the critic has just been found diverging."""
        self.max_critic_loss, self.max_alpha = max(self.max_critic_loss, sac["critic_loss"]), max(self.max_alpha, sac["alpha"])
        if abs(sac["q_mean"]) <= Q_BOUND_FACTOR * q_bound:
            self.over_bound_since = None
            return None
        if self.over_bound_since is None:
            self.over_bound_since = epoch
        if self.diverging_since is None and epoch + 1 - self.over_bound_since >= DIVERGING_EPOCHS:
            self.diverging_since = self.over_bound_since
            return (f"warning: the critic is diverging: mean Q {sac['q_mean']:.3g} has been beyond {Q_BOUND_FACTOR:g} x (max|r| + eta x max penalty) / (1 - gamma) = "
                    f"{Q_BOUND_FACTOR * q_bound:.3g} since epoch {self.over_bound_since + 1} (critic loss {sac['critic_loss']:.3g}, alpha {sac['alpha']:.3g}); "
                    "its scores mean nothing (see sac/q_mean, sac/q_bound)")
        return None

    def update_states(self, epoch: int, state_abs_max: float, data_state_abs_max: float) -> str | None:
        """Take one epoch's largest rollout |s|; returns the one-line warning the first time it is far beyond the data's."""
        self.max_state_abs = max(self.max_state_abs, state_abs_max)
        if self.far_states_since is not None or state_abs_max <= FAR_STATE_FACTOR * data_state_abs_max:  # NaN is far too
            return None
        self.far_states_since = epoch
        return (f"warning: model rollouts reach |s| = {state_abs_max:.3g} in epoch {epoch + 1}, beyond {FAR_STATE_FACTOR:g} x the data's largest |s| "
                f"({data_state_abs_max:.3g}): the model invents states the critic then bootstraps from (see rollout/state_abs_max; --halt-margin ends rollouts there)")

    def summary(self) -> str:
        diverged = f"; critic diverging since epoch {self.diverging_since + 1}" if self.diverging_since is not None else ""
        far = f"; rollout states beyond {FAR_STATE_FACTOR:g} x the data's since epoch {self.far_states_since + 1}" if self.far_states_since is not None else ""
        return f"largest critic loss {self.max_critic_loss:.3g}, largest alpha {self.max_alpha:.3g}, largest rollout |s| {self.max_state_abs:.3g}{diverged}{far}"


def save_checkpoint(path: str, agent: SAC, dice: GradientDICE | None, dice_opt, model_buffer: ReplayBuffer, args: Args, data: OfflineDataset, hp: TaskDefaults,
                    epoch: int, progress: EpochProgress, eval_history: list[dict], dynamics_path: str, data_sha256: str, wall_seconds: float,
                    critic_health: CriticHealth):
    """Everything needed to continue the run exactly, and what eval.py needs, loadable with weights_only=True.

    `epoch` is the last completed epoch; `progress` says how far the next one got. The eval env
    needs no RNG state: it is built anew and reset with fixed seeds at every evaluation.
    """
    payload = {
        "actor": agent.actor.state_dict(),
        "critic": agent.critic.state_dict(),
        "critic_target": agent.critic_target.state_dict(),
        "log_alpha": agent.log_alpha.detach(),
        "actor_opt": agent.actor_opt.state_dict(),
        "critic_opt": agent.critic_opt.state_dict(),
        "alpha_opt": agent.alpha_opt.state_dict(),
        "dice": dice.state_dict() if dice is not None else None,
        "dice_opt": dice_opt.state_dict() if dice is not None else None,
        "model_buffer": buffer_state(model_buffer),
        "rng": rng_state(),
        "args": asdict(args),
        "dataset": data.name,
        "data_sha256": data_sha256,
        "family": data.family,
        "eval_env_id": data.eval_env_id,
        "obs_dim": data.obs_dim,
        "act_dim": data.act_dim,
        "epoch": epoch,
        "epoch_progress": asdict(progress),
        "critic_health": asdict(critic_health),
        "epochs": hp.epochs,
        "finished": epoch + 1 == hp.epochs,
        "eval_history": eval_history,
        "normalized_score": eval_history[-1]["normalized_score"] if eval_history else float("nan"),
        "dynamics_path": dynamics_path,
        "wall_seconds": wall_seconds,
    }
    atomic_save(payload, path)


def restore_checkpoint(checkpoint: dict, agent: SAC, dice: GradientDICE | None, dice_opt, model_buffer: ReplayBuffer):
    """Load a checkpoint's weights, optimiser states and model buffer into a freshly built run."""
    for module, key in ((agent.actor, "actor"), (agent.critic, "critic"), (agent.critic_target, "critic_target")):
        module.load_state_dict(checkpoint[key])
    with torch.no_grad():
        agent.log_alpha.copy_(checkpoint["log_alpha"])
    for optimizer, key in ((agent.actor_opt, "actor_opt"), (agent.critic_opt, "critic_opt"), (agent.alpha_opt, "alpha_opt")):
        load_optimizer_state(optimizer, checkpoint[key])
    if dice is not None:
        dice.load_state_dict(checkpoint["dice"])
        load_optimizer_state(dice_opt, checkpoint["dice_opt"])
    load_buffer_state(model_buffer, checkpoint["model_buffer"])


# Keys a checkpoint needs for --resume (eval.py needs fewer).
RESUME_KEYS = ("args", "epoch", "epochs", "finished", "epoch_progress", "model_buffer", "rng", "actor_opt", "dynamics_path", "eval_history")
# What a resumed run may change: the way out of a NaN (another seed, smaller steps), where it runs,
# and its length (more epochs extend a run; nothing in an epoch depends on the total).
RESUME_MAY_CHANGE = {"resume", "seed", "sac.actor_lr", "sac.critic_lr", "sac.alpha_lr", "dice_lr", "dice.f_lr", "dice.nu_lr", "classifier.lr", "device", "track", "epochs"}


def checkpoint_file(run: str) -> str:
    return run if run.endswith(".pt") else os.path.join(run, "checkpoint.pt")


def flat_fields(values: dict, prefix: str = "") -> dict:
    """asdict(args) with nested configs as dotted names, {"sac": {"actor_lr": 3e-4}} -> {"sac.actor_lr": 3e-4},
    and tuples as lists, so that arguments read back from a checkpoint compare equal to the same ones given anew."""
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat |= flat_fields(value, f"{prefix}{name}.")
        else:
            flat[prefix + name] = list(value) if isinstance(value, tuple) else value
    return flat


def parse_args(argv: list[str]) -> Args:
    """The command line; with --resume, the flags given on top of the stopped run's own arguments."""
    import tyro

    args = tyro.cli(Args, args=argv)
    if args.resume is None:
        return args
    saved = args_from_dict(load_checkpoint(checkpoint_file(args.resume), RESUME_KEYS, mmap=True)["args"])
    return tyro.cli(Args, args=argv, default=replace(saved, resume=args.resume))


def refuse_changes(saved: Args, args: Args):
    """One line naming every argument of a resumed run that differs from the run's own, unless it may change."""
    before, after = flat_fields(asdict(saved)), flat_fields(asdict(args))
    changed = [name for name, value in after.items() if name not in RESUME_MAY_CHANGE and value != before.get(name)]
    if changed:
        flags = ", ".join(f"--{name.replace('_', '-')} {after[name]}" for name in changed)
        raise SystemExit(f"error: {flags} would change the run that --resume continues; only --seed, the learning rates, --epochs, --device and --track may change (start a new run for the rest)")


def dynamics_cache_file(data: OfflineDataset, data_sha256: str, config: DynamicsConfig, seed: int) -> str:
    """Where the ensemble for this data, dynamics configuration and seed lives in $DROP_CACHE_DIR."""
    cache_dir = os.environ.get("DROP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "drop", "dynamics")
    key = hashlib.sha256(json.dumps([data_sha256, asdict(config), seed], sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(cache_dir, f"{data.family}-{key}.pt")


def trained_dynamics(args: Args, data: OfflineDataset, real: ReplayBuffer, data_sha256: str, run_dir: str, device: torch.device) -> tuple[ProbabilisticEnsemble, str]:
    """The frozen ensemble and its file: --dynamics-path, else the cache (trained into it on a miss), else trained into the run."""
    if args.dynamics_path:
        return load_ensemble(args.dynamics_path, data.family, data.obs_dim, data.act_dim, device, data_sha256), os.path.abspath(args.dynamics_path)

    def train(path: str) -> ProbabilisticEnsemble:
        from torch.utils.tensorboard import SummaryWriter

        dynamics = ProbabilisticEnsemble(data.obs_dim, data.act_dim, args.dynamics).to(device)
        history = train_ensemble(dynamics, real.obs[: real.size], real.act[: real.size], real.next_obs[: real.size], real.rew[: real.size], args.seed,
                                 resume_path=path + TRAINING_STATE_SUFFIX)
        with SummaryWriter(os.path.join(run_dir, "dynamics")) as writer:  # its own folder, so a resume's purge cannot touch it
            for epoch, mse in enumerate(history):
                writer.add_scalar("dynamics/holdout_mse", mse, epoch)
        save_ensemble(dynamics, path, data.family, data_sha256)
        return dynamics

    if args.no_dynamics_cache:
        path = os.path.abspath(os.path.join(run_dir, "dynamics.pt"))
        return train(path), path
    path = dynamics_cache_file(data, data_sha256, args.dynamics, args.seed)
    check_writable(os.path.dirname(path), "dynamics cache folder", "set DROP_CACHE_DIR to a writable folder or pass --no-dynamics-cache")
    # A second run on the same key (a sweep) waits here for the first to finish training, then reuses its file.
    with exclusive_lock(path + ".lock", f"waiting for another run that is training the same ensemble into {path}"):
        if os.path.isfile(path):
            print(f"reusing the trained ensemble {path} (same data, dynamics config and seed; --no-dynamics-cache to retrain)")
            return load_ensemble(path, data.family, data.obs_dim, data.act_dim, device, data_sha256), path
        return train(path), path


class StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current update; a second Ctrl-C stops at once."""

    def __enter__(self):
        self.requested, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread handle signals
            self.previous = {signum: signal.signal(signum, self.request) for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def request(self, signum, frame):
        self.requested = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n{signal.Signals(signum).name}: stopping after this update", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def check_finite(values: dict[str, float], what: str, epoch: int, run_dir: str):
    """Stop at the first NaN or infinity, naming it: training on would only spread it into the weights."""
    for name, value in values.items():
        if not math.isfinite(value):
            path = os.path.join(run_dir, "checkpoint.pt")
            if os.path.isfile(path):
                last = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"] + 1
                fix = f"the last good checkpoint (epoch {last}) stays: python drop.py --resume {run_dir} [--seed N | --sac.actor-lr LR ...]"
            else:
                fix = "no checkpoint was written before it; try another --seed or smaller learning rates"
            raise SystemExit(f"error: {what}{name} is {value} in epoch {epoch + 1}; {fix}")


def main(args: Args):
    from tqdm import tqdm

    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(checkpoint_file(args.resume), RESUME_KEYS, mmap=True)
        refuse_changes(args_from_dict(checkpoint["args"]), args)
        epochs, done = args.epochs or checkpoint["epochs"], checkpoint["epoch"] + 1
        if checkpoint["finished"] and epochs == done:
            print(f"{args.resume} is finished ({done} of {done} epochs); nothing to resume (a larger --epochs extends it)")
            return
        if epochs <= done:
            raise SystemExit(f"error: --epochs {epochs}, but {args.resume} has done {done} epochs already; give more than {done} to extend it")
    try:
        data = load_dataset(args.env, args.dataset)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    data_sha256 = data.transitions_sha256()
    if checkpoint is not None and checkpoint.get("data_sha256", data_sha256) != data_sha256:
        raise SystemExit(f"error: the dataset {data.path} changed since {args.resume} started; resume needs the same data")
    hp = task_hyperparameters(args, data.task)
    seed_everything(args.seed)
    device = pick_device(args.device)
    if args.resume:
        run_dir = os.path.dirname(checkpoint_file(args.resume)) or "."
    else:
        run_dir = os.path.join("runs", args.run_name or f"drop__{data.name.replace('/', '_')}__{args.penalty}__{args.seed}__{int(time.time())}")
    if not args.resume and os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        raise SystemExit(f"error: {run_dir} already holds a run; continue it with `python drop.py --resume {run_dir}`, or pick another --run-name (or delete the folder)")
    check_writable(run_dir, "runs folder", "run from a folder you can write to, or free some space")
    print(f"{data.name} ({data.source}, {len(data.observations)} transitions) -> {run_dir}\n{hp}")
    real = real_buffer(data, device)
    real_obs, real_act = real.obs[: real.size], real.act[: real.size]

    # 1. Dynamics: train once per data, config and seed (cached), or reuse a saved ensemble. Frozen from here on.
    if checkpoint:
        dynamics_path = checkpoint["dynamics_path"]
        if not os.path.isfile(dynamics_path):
            raise SystemExit(f"error: {dynamics_path}, the ensemble this run trained with, is gone; put it back to resume (a new run trains or reuses one)")
        dynamics = load_ensemble(dynamics_path, data.family, data.obs_dim, data.act_dim, device, data_sha256)
    else:
        dynamics, dynamics_path = trained_dynamics(args, data, real, data_sha256, run_dir, device)
    dynamics.requires_grad_(False)
    terminated_fn = rollout_termination(data.family, real_obs, args.halt_margin)
    start_epoch = checkpoint["epoch"] + 1 if checkpoint else 0
    writer = start_run(run_dir, args, args.track, "drop", purge_step=start_epoch if checkpoint else None)
    if checkpoint is None:
        writer.add_text("task_hyperparameters", str(hp))

    agent = SAC(data.obs_dim, data.act_dim, args.sac, device)
    model_buffer = ReplayBuffer(model_buffer_capacity(args, hp.horizon), data.obs_dim, data.act_dim, device)
    sample_action = lambda obs: agent.actor(obs)[0]

    # 2. The density-ratio heads, one per elite, and `train_ratio(steps)`, which returns each head's training objective.
    # GradientDICE: the dynamics are frozen, so each elite's mean next state for every dataset (s, a)
    # is computed once here instead of at every DICE step.
    dice, dice_opt, dice_config = None, None, resolve(args.dice)
    if args.penalty == "drop":
        dice = build_ratio(args, data.obs_dim, data.act_dim, dynamics).to(device)
        if args.ratio == "dice":
            dice_opt = dice_optimizer(dice, hp.dice_lr, dice_config)
            dice_next_obs = dynamics.elite_mean_next_obs(real_obs, real_act)
            train_ratio = lambda steps: train_dice(dice, dice_opt, real_obs, real_act, dice_next_obs, real_obs, sample_action, steps, dice_config, hp.dice_lambda)
            if checkpoint is None:
                train_ratio(args.dice.pretrain_steps)
        else:
            dice_opt = adam(dice.parameters(), args.classifier.lr, device)

            def train_ratio(steps: int) -> torch.Tensor:
                """The classifier's positives are what SAC trains on: the model buffer. Before the first rollout it has none, and the ratio stays 1."""
                size = model_buffer.size
                if size == 0:
                    return torch.full((dice.num_heads,), math.log(2.0), device=device)  # the logistic loss at logit 0
                return train_classifier(dice, dice_opt, model_buffer.obs[:size], model_buffer.act[:size], model_buffer.member[:size], real_obs, real_act, steps, args.classifier.batch_size)
    # Fixed dataset (s, a) for tau's health check; its own generator, so resuming draws the same ones.
    health_idx = torch.randperm(real.size, generator=torch.Generator().manual_seed(args.seed))[:10_000].to(device)

    progress, eval_history, wall_offset, critic_health = EpochProgress(), [], 0.0, CriticHealth()
    q_bound = return_bound(real.rew[: real.size], largest_penalty(args, hp, dynamics), hp.eta, args.sac.gamma)
    data_state_abs_max = real_obs.abs().max().item()
    if checkpoint:
        restore_checkpoint(checkpoint, agent, dice, dice_opt, model_buffer)
        progress = EpochProgress(**checkpoint["epoch_progress"])
        progress.loss_sums = {name: value.to(device) for name, value in progress.loss_sums.items()}
        eval_history, wall_offset = checkpoint["eval_history"], checkpoint["wall_seconds"]
        critic_health = CriticHealth(**checkpoint.get("critic_health", {}))
        if args.seed == checkpoint["args"]["seed"]:
            set_rng_state(checkpoint["rng"])  # the exact continuation; a new --seed takes another path from here
        write_progress(os.path.join(run_dir, "progress.csv"), eval_history)
        for leftover in glob.glob(os.path.join(run_dir, ".checkpoint.pt.*.tmp")):  # a kill in the middle of a write leaves one
            os.remove(leftover)
        print(f"resuming {run_dir} at epoch {start_epoch + 1} (update {progress.step}) of {hp.epochs}")
        del checkpoint  # the model buffer now lives in model_buffer; let the mapped file go
    save_every = args.save_every or args.eval_every
    run_start = time.perf_counter() - wall_offset
    save = lambda epoch: save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, dice, dice_opt, model_buffer, args, data, hp, epoch, progress,
                                         eval_history, dynamics_path, data_sha256, time.perf_counter() - run_start, critic_health)

    def stop_here(last_epoch: int, signum: int):
        writer.flush()  # TensorBoard must hold every step before the checkpoint's, or they are lost for good
        save(last_epoch)
        where = f"in epoch {last_epoch + 2} of {hp.epochs}, after update {progress.step}" if progress.step else f"after epoch {last_epoch + 1} of {hp.epochs}"
        bar.close()  # its last state above the stop line, not drawn again below it
        print(f"stopped {where}; continue with: python drop.py --resume {run_dir}", flush=True)
        raise SystemExit(128 + signum)

    def sac_means() -> dict[str, float]:
        """The epoch's mean SAC losses so far (one host sync)."""
        return {name: (value / max(progress.step, 1)).item() for name, value in progress.loss_sums.items()}

    bar = tqdm(total=hp.epochs, initial=start_epoch, desc=f"drop {data.name}", unit="epoch")
    with StopOnSignal() as stop, writer, bar:  # however the loop ends, the logs are flushed and an error starts on a line of its own
        for epoch in range(start_epoch, hp.epochs):
            epoch_start = time.perf_counter()
            if dice is not None and progress.step == 0:
                objective = train_ratio(hp.dice_steps)
                # E_D[tau] is 1 for a policy the data covers, else the share of its occupancy the data covers; below 0 is a failed estimate.
                with torch.no_grad():
                    tau_data = dice.ratio(real_obs[health_idx], real_act[health_idx]).mean()
                progress.dice = {"objective": objective.mean().item(), "tau_data_mean": tau_data.item()}
                check_finite(progress.dice, "dice/", epoch, run_dir)
            for step in range(progress.step, args.steps_per_epoch):
                if step % args.rollout_freq == 0:
                    check_finite(sac_means(), "sac/", epoch, run_dir)  # a NaN from the updates is named as such, not by the rollout it spoils
                    start_obs = real_obs[torch.randint(real.size, (args.rollout_batch_size,), device=device)]
                    progress.rollouts.append(rollout(dynamics, agent, dice, start_obs, hp, args, terminated_fn, model_buffer))
                    check_finite(progress.rollouts[-1], "rollout/", epoch, run_dir)
                losses = agent.update(mixed_batch(real, model_buffer, args.sac.batch_size, args.real_ratio))
                for name, value in losses.items():
                    progress.loss_sums[name] = progress.loss_sums.get(name, 0.0) + value
                progress.step = step + 1
                if stop.requested:
                    check_finite(sac_means(), "sac/", epoch, run_dir)
                    stop_here(epoch - 1, stop.requested)

            # The epoch's means, all logged at step `epoch`, one host sync per epoch.
            sac = sac_means()
            check_finite(sac, "sac/", epoch, run_dir)
            sac["q_bound"] = q_bound
            rollout_means = {name: float(np.mean([r[name] for r in progress.rollouts])) for name in progress.rollouts[0]}
            state_abs_max = max(r["state_abs_max"] for r in progress.rollouts)
            for warning in (critic_health.update(epoch, sac, q_bound), critic_health.update_states(epoch, state_abs_max, data_state_abs_max)):
                if warning:
                    bar.write(warning, file=sys.stderr)
            for group, values in (("dice", progress.dice), ("rollout", rollout_means), ("sac", sac)):
                for name, value in values.items():
                    writer.add_scalar(f"{group}/{name}", value, epoch)
            writer.add_scalar("charts/epoch_seconds", time.perf_counter() - epoch_start, epoch)
            health = {"tau_data": progress.dice["tau_data_mean"]} if progress.dice else {}
            health.update(penalty=rollout_means["penalty_mean"], bonus=rollout_means["bonus_fraction"])
            if "tau_mean" in rollout_means:
                health.update(tau_rollout=rollout_means["tau_median"], below=rollout_means.get("tau_below_clip", 0.0), above=rollout_means.get("tau_above_clip", 0.0))
            progress = EpochProgress()

            final = epoch + 1 == hp.epochs
            if (epoch + 1) % args.eval_every == 0 or final:
                returns = evaluate(agent.actor, make_eval_env(data), args.eval_episodes, seed=args.seed * 1000)
                scores = normalized_score(data.family, returns)
                eval_history.append({
                    "epoch": epoch, "normalized_score": float(scores.mean()), "normalized_score_std": float(scores.std()), "return": float(returns.mean()),
                    "wall_seconds": round(time.perf_counter() - run_start, 1), "penalty_mean": rollout_means["penalty_mean"],
                    "rollout_tau_mean": rollout_means.get("tau_mean", float("nan")), "rollout_tau_median": rollout_means.get("tau_median", float("nan")),
                })
                for name in ("return", "normalized_score", "normalized_score_std"):
                    writer.add_scalar(f"eval/{name}", eval_history[-1][name], epoch)
                write_progress(os.path.join(run_dir, "progress.csv"), eval_history)
            if (epoch + 1) % save_every == 0 or final:
                writer.flush()
                save(epoch)
            score = eval_history[-1]["normalized_score"] if eval_history else float("nan")
            bar.update()
            bar.set_postfix({name: f"{value:.2f}" for name, value in health.items()} | {"score": f"{score:.1f}"})
            if stop.requested and not final:
                stop_here(epoch, stop.requested)
    print(f"normalized score: {score:.1f} (last eval); {critic_health.summary()}; checkpoint in {run_dir}")


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
