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

`--penalty mopo` swaps the penalty for MOPO's (the largest std norm over the ensemble's members) and
`--penalty none` removes it (MBPO); both take MOPO's per-dataset h (tasks.py). The penalties live
in penalties.py; what keeps a run alive (checkpoints, resume, signals) in checkpoint.py, and the
critic's health checks in health.py.
"""

import os
import sys
import time
from dataclasses import dataclass, field, fields, replace
from fnmatch import fnmatch
from typing import Literal

import numpy as np
import torch

from checkpoint import (
    RESUME_KEYS,
    EpochProgress,
    RunRecord,
    StopOnSignal,
    checkpoint_file,
    dataclass_from_dict,
    load_checkpoint,
    restore_run,
    resume_checkpoint,
    run_folder,
    write_progress,
)
from classifier import ClassifierConfig
from datasets import DEFAULT_ENV, DatasetError, OfflineDataset, load_dataset, make_eval_env, normalized_score, task_of
from dice import DiceConfig, preset_lambda
from dynamics import TERMINATION_FNS, DynamicsConfig, MemberGroups, ProbabilisticEnsemble, trained_or_cached
from health import check_finite, return_bound
from penalties import NoPenalty, build_penalty, penalty_class
from sac import SAC, Actor, Batch, ReplayBuffer, SACConfig, evaluate, pick_device, seed_everything, start_run
from tasks import Penalty, Transform, task_defaults


@dataclass
class Args:
    env: str = DEFAULT_ENV
    """dataset: D4RL name (hopper-medium-v2), built-in (builtin-hopper-medium) or Minari id (mujoco/hopper/medium-v0)"""
    dataset: str | None = None
    """a D4RL-format HDF5 file to train on; --env then fixes the eval env, the score and the defaults"""
    penalty: Penalty = "drop"
    """reward penalty: drop (density ratio), mopo (max std norm over the members) or none (MBPO)"""
    ratio: Literal["dice", "classifier"] = "dice"
    """DROP's ratio estimator: dice (GradientDICE, the paper's) or classifier (rollout vs data samples, defined where the rollouts go)"""
    mopo_members: Literal["all", "elites"] = "all"
    """--penalty mopo: the largest std norm over all members (MOPO's and the DROP authors' fake_env.py) or over the elites only (this project's runs before 2026-12-06)"""
    eta: float | None = None
    """penalty coefficient (default: the per-dataset table)"""
    horizon: int | None = None
    """model rollout length h (default: the per-dataset table)"""
    epochs: int | None = None
    """training epochs (default: the per-dataset table)"""
    dice_steps: int | None = None
    """ratio training steps per epoch, GradientDICE's or the classifier's (default: the per-dataset table)"""
    dice_lr: float | None = None
    """GradientDICE Adam learning rate (default: the per-dataset table)"""
    dice_lambda: float | None = None
    """weight lam of GradientDICE's normalisation constraint (default: the --dice.preset's, else the per-dataset table)"""
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
    episode_start_share: float = 0.0
    """share of each rollout's start states drawn from the data's episode starts (a robot at rest, where evaluation starts) instead of from all rows; 0: all rows, as MBPO, MOPO and the authors"""
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


# The per-dataset table's fields; those of the ratio are read only by the penalties that name them (penalties.py).
RATIO_FIELDS = ("dice_steps", "dice_lr", "dice_lambda", "clip", "transform")
TABLE_FIELDS = ("horizon", "eta", *RATIO_FIELDS, "epochs")


def settings(args: Args, task: str) -> tuple[Args, str]:
    """The run's settings: the flags given, the rest from the per-dataset table (tasks.py); and where they come from.

    Refuses, in one line, any value no run can have, before any data is read.
    """
    try:
        table = task_defaults(task, args.penalty)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    given = [name for name in TABLE_FIELDS if getattr(args, name) is not None]
    source = table.source + (
        f"; {', '.join('--' + name.replace('_', '-') for name in given)} from the command line" if given else ""
    )
    if reason := ignored_flags(args):
        raise SystemExit(f"error: {reason}")
    filled = {name: getattr(table, name) for name in TABLE_FIELDS if getattr(args, name) is None}
    if args.dice_lambda is None and preset_lambda(args.dice) is not None:
        filled["dice_lambda"] = preset_lambda(args.dice)  # --dice-lambda, else the preset's, else the table's
    args = replace(args, **filled)
    if args.no_clip:
        args = replace(args, clip=None)
    rules = [
        ("--horizon", args.horizon, args.horizon >= 1, "at least 1"),
        ("--epochs", args.epochs, args.epochs >= 1, "at least 1"),
        ("--eta", args.eta, args.eta >= 0, "at least 0"),
        ("--dice-steps", args.dice_steps, args.dice_steps >= 0, "at least 0"),
        ("--dice-lr", args.dice_lr, args.dice_lr > 0, "above 0"),
        ("--episode-start-share", args.episode_start_share, 0 <= args.episode_start_share <= 1, "from 0 to 1"),
    ]
    impossible = [f"{flag} {value} ({rule})" for flag, value, holds, rule in rules if not holds]
    if args.halt_margin is not None and args.halt_margin < 0:
        impossible.append(f"--halt-margin {args.halt_margin} (at least 0, or None never to halt)")
    if args.clip is not None and args.clip[0] >= args.clip[1]:
        impossible.append(f"--clip {args.clip[0]} {args.clip[1]} (the lower bound below the upper)")
    if impossible:
        raise SystemExit(f"error: impossible {', '.join(impossible)}")
    if args.mopo_members != "all" and args.penalty != "mopo":
        raise SystemExit(
            f"error: --mopo-members is MOPO's; --penalty {args.penalty} takes no member set (drop the flag, or use --penalty mopo)"
        )
    if reason := penalty_class(args).refuse(args):
        raise SystemExit(f"error: {reason}")
    return args, source


def ignored_flags(args: Args) -> str | None:
    """Why ratio flags given to a penalty that does not read them would pass silently, or None. `args` as given, before the table fills them."""
    given = [name for name in RATIO_FIELDS if getattr(args, name) is not None] + ["no_clip"] * args.no_clip
    given += [
        f"{prefix}.{f.name}"
        for prefix, config in (("dice", args.dice), ("classifier", args.classifier))
        for f in fields(config)
        if getattr(config, f.name) != f.default
    ]
    reads = penalty_class(args).reads
    ignored = ["--" + name.replace("_", "-") for name in given if not any(fnmatch(name, flag) for flag in reads)]
    if not ignored:
        return None
    method = f"--penalty {args.penalty}" + (f" --ratio {args.ratio}" if args.penalty == "drop" else "")
    one = len(ignored) == 1
    return f"{', '.join(ignored)} {'is' if one else 'are'} not read by {method} (drop {'it' if one else 'them'})"


def args_from_dict(values: dict) -> Args:
    """The Args of a saved run (`asdict(args)` in its checkpoint), older runs' names mapped to today's."""
    values = dict(values)
    values.setdefault("halt_margin", None)  # runs saved before the flag existed never halted
    # MOPO runs saved before --mopo-members took the penalty over the elites
    values.setdefault("mopo_members", "elites" if values.get("penalty") == "mopo" else "all")
    if values.get("dice_lambda") is None and values.get("dice", {}).get("lam") is not None:
        values["dice_lambda"] = values["dice"]["lam"]  # --dice.lam, before it became --dice-lambda
    return dataclass_from_dict(Args, values)


def real_buffer(data: OfflineDataset, device: torch.device) -> ReplayBuffer:
    buffer = ReplayBuffer(len(data.observations), data.obs_dim, data.act_dim, device)
    as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)
    # Only true terminations stop bootstrapping; time-limit truncations (timeouts) do not.
    buffer.add(
        *(as_tensor(x) for x in (data.observations, data.actions, data.rewards, data.next_observations, data.terminals))
    )
    return buffer


def rollout_starts(real_size: int, episode_starts: torch.Tensor, args: Args, device: torch.device) -> torch.Tensor:
    """The dataset rows an epoch's rollouts start from: uniform over the data, but for a share at its episode starts."""
    rows = torch.randint(real_size, (args.rollout_batch_size,), device=device)
    if at_rest := round(args.episode_start_share * args.rollout_batch_size):  # no draw at 0: runs stay as they were
        rows[:at_rest] = episode_starts[torch.randint(len(episode_starts), (at_rest,))].to(device)
    return rows


def rollout_termination(family: str, real_obs: torch.Tensor, halt_margin: float | None):
    """When a model rollout ends: where the env itself terminates, and with a margin, where it leaves the data's range.

    A learned model extrapolates far off the data within a few steps, and a critic that bootstraps
    from those invented states diverged there (docs/stable-loop.md). Ending there as a termination
    gives them no value to bootstrap from. NaN counts as outside.
    """
    env_terminated = TERMINATION_FNS[family]
    if halt_margin is None:
        return env_terminated
    low, high = real_obs.min(0).values, real_obs.max(0).values
    low, high = low - halt_margin * (high - low), high + halt_margin * (high - low)
    return lambda next_obs: env_terminated(next_obs) | ~((next_obs >= low) & (next_obs <= high)).all(-1)


@torch.no_grad()
def rollout(
    dynamics: ProbabilisticEnsemble,
    actor: Actor,
    penalty: NoPenalty,
    start_obs,
    args: Args,
    terminated_fn,
    buffer: ReplayBuffer,
) -> dict[str, float]:
    """h-step rollouts from `start_obs`; each sample steps with a random elite and is penalised, then stored.

    Returns means over the stored samples, including the penalty's health: how often tau fell
    outside the clip and how often the "penalty" raised the reward instead of lowering it.
    """
    num_elites = len(dynamics.elites)
    obs, stats = start_obs, {"reward": [], "penalty": [], "terminated": [], "tau": []}
    state_abs_max = torch.zeros((), device=obs.device)
    for _ in range(args.horizon):
        act, _ = actor(obs)
        groups = MemberGroups(torch.randint(num_elites, (len(obs),), device=obs.device), num_elites)
        next_obs, reward = dynamics.sample_step(obs, act, groups)
        # NaN-propagating: a broken model state shows here.
        state_abs_max = torch.maximum(state_abs_max, next_obs.abs().amax())
        reward_penalty, tau = penalty(obs, act, groups)
        done = terminated_fn(next_obs)
        buffer.add(obs, act, reward - args.eta * reward_penalty, next_obs, done, groups.member)
        for name, values in (
            ("reward", reward),
            ("penalty", reward_penalty),
            ("terminated", done.float()),
            ("tau", tau),
        ):
            if values is not None:
                stats[name].append(values)
        obs = next_obs[~done]
        if len(obs) == 0:
            break
    stats = {name: torch.cat(values) for name, values in stats.items() if values}
    summary = {f"{name}_mean": values.mean().item() for name, values in stats.items()}
    summary["length_mean"] = len(stats["reward"]) / len(start_obs)
    summary["state_abs_max"] = state_abs_max.item()
    summary["bonus_fraction"] = (args.eta * stats["penalty"] < 0).float().mean().item()
    if "tau" in stats:  # the classifier's tau is exp(logit): heavy-tailed, so its mean says little and its median much
        summary["tau_median"] = stats["tau"].median().item()
    if "tau" in stats and args.clip is not None:
        summary["tau_below_clip"] = (stats["tau"] <= args.clip[0]).float().mean().item()
        summary["tau_above_clip"] = (stats["tau"] >= args.clip[1]).float().mean().item()
    return summary


def model_buffer_capacity(args: Args, horizon: int) -> int:
    """Room for `model_retain_epochs` epochs of rollouts, each at most rollout_batch_size * horizon."""
    rollouts_per_epoch = max(args.steps_per_epoch // args.rollout_freq, 1)
    return args.rollout_batch_size * horizon * args.model_retain_epochs * rollouts_per_epoch


def mixed_batch(real: ReplayBuffer, model: ReplayBuffer, batch_size: int, real_ratio: float) -> Batch:
    num_real = int(batch_size * real_ratio)
    real_part, model_part = real.sample(num_real), model.sample(batch_size - num_real)
    return Batch(*(torch.cat(pair) for pair in zip(real_part, model_part)))


def log_epoch(
    writer, epoch: int, progress: EpochProgress, sac: dict[str, float], epoch_seconds: float
) -> tuple[dict[str, float], dict[str, float]]:
    """The epoch's means into TensorBoard, all at step `epoch`; returns the rollouts' means and the progress bar's health figures."""
    rollout_means = {name: float(np.mean([r[name] for r in progress.rollouts])) for name in progress.rollouts[0]}
    for group, values in (("penalty", progress.penalty_stats), ("rollout", rollout_means), ("sac", sac)):
        for name, value in values.items():
            writer.add_scalar(f"{group}/{name}", value, epoch)
    writer.add_scalar("charts/epoch_seconds", epoch_seconds, epoch)
    health = {"tau_data": progress.penalty_stats["tau_data_mean"]} if "tau_data_mean" in progress.penalty_stats else {}
    health.update(penalty=rollout_means["penalty_mean"], bonus=rollout_means["bonus_fraction"])
    if "tau_mean" in rollout_means:
        health.update(
            tau_rollout=rollout_means["tau_median"],
            below=rollout_means.get("tau_below_clip", 0.0),
            above=rollout_means.get("tau_above_clip", 0.0),
        )
    return rollout_means, health


def evaluation(
    actor: Actor, data: OfflineDataset, args: Args, epoch: int, wall_seconds: float, rollout_means: dict[str, float]
) -> dict[str, float]:
    """One row of progress.csv: the deterministic policy's D4RL-normalised score in MuJoCo."""
    returns = evaluate(actor, make_eval_env(data), args.eval_episodes, seed=args.seed * 1000)
    scores = normalized_score(data.family, returns)
    return {
        "epoch": epoch,
        "normalized_score": float(scores.mean()),
        "normalized_score_std": float(scores.std()),
        "return": float(returns.mean()),
        "wall_seconds": round(wall_seconds, 1),
        "penalty_mean": rollout_means["penalty_mean"],
        "rollout_tau_mean": rollout_means.get("tau_mean", float("nan")),
        "rollout_tau_median": rollout_means.get("tau_median", float("nan")),
    }


def parse_args(argv: list[str]) -> Args:
    """The command line; with --resume, the flags given on top of the stopped run's own arguments. Impossible values stop here, before any data."""
    import tyro

    if old := next((arg for arg in argv if arg.startswith("--dice.lam")), None):
        raise SystemExit(f"error: {old.split('=')[0]} is now --dice-lambda (one flag for GradientDICE's lambda)")
    args = tyro.cli(Args, args=argv)
    if args.resume is not None:
        saved = args_from_dict(load_checkpoint(checkpoint_file(args.resume), RESUME_KEYS, mmap=True)["args"])
        args = tyro.cli(Args, args=argv, default=replace(saved, resume=args.resume))
    try:
        settings(args, task_of(args.env))
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    return args


def main(given: Args):
    from tqdm import tqdm

    checkpoint = resume_checkpoint(given, args_from_dict) if given.resume else None
    if given.resume and checkpoint is None:
        return  # the run is finished
    try:
        args, source = settings(given, task_of(given.env))
        data = load_dataset(args.env, args.dataset)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    data_sha256 = data.transitions_sha256()
    if checkpoint is not None and checkpoint.get("data_sha256", data_sha256) != data_sha256:
        raise SystemExit(
            f"error: the dataset {data.path} changed since {args.resume} started; resume needs the same data"
        )
    episode_starts = torch.from_numpy(data.episode_starts())
    if args.episode_start_share and not len(episode_starts):
        raise SystemExit(f"error: --episode-start-share needs whole episodes; {data.name} marks no terminal or timeout")
    seed_everything(args.seed)
    device = pick_device(args.device)
    name = f"drop__{data.name.replace('/', '_')}__{args.penalty}__{args.seed}__{int(time.time())}"
    run_dir = run_folder(args.resume, args.run_name or name)
    print(f"{data.name} ({data.source}, {len(data.observations)} transitions) -> {run_dir}")
    print(f"settings: h {args.horizon}, eta {args.eta}, {args.epochs} epochs ({source})")
    real = real_buffer(data, device)
    real_obs, real_act = real.obs[: real.size], real.act[: real.size]

    # 1. Dynamics: trained once per data, config and seed (cached), or a saved ensemble. Frozen from here on.
    dynamics, dynamics_path = trained_or_cached(
        checkpoint["dynamics_path"] if checkpoint else args.dynamics_path, not args.no_dynamics_cache,
        data, data_sha256, args.dynamics, args.seed, run_dir, device,
    )  # fmt: skip
    dynamics.requires_grad_(False)
    terminated_fn = rollout_termination(data.family, real_obs, args.halt_margin)

    # 2. SAC, the model buffer, and the penalty (penalties.py): DROP's ratio heads, one per elite, MOPO's or none.
    agent = SAC(data.obs_dim, data.act_dim, args.sac, device)
    model_buffer = ReplayBuffer(model_buffer_capacity(args, args.horizon), data.obs_dim, data.act_dim, device)
    sample_action = lambda obs: agent.actor(obs)[0]
    penalty = build_penalty(args, dynamics, real_obs, real_act, model_buffer, sample_action)
    record = RunRecord(run_dir, given, data, data_sha256, dynamics_path, args.epochs)
    start_epoch = checkpoint["epoch"] + 1 if checkpoint else 0
    if checkpoint:
        restore_run(checkpoint, agent, penalty, model_buffer, record, given.seed)
        print(f"resuming {run_dir} at epoch {start_epoch + 1} (update {record.progress.step}) of {args.epochs}")
        del checkpoint  # the model buffer now lives in model_buffer; let the mapped file go
    else:  # GradientDICE's pretraining under the initial policy; the other penalties have nothing to fit yet
        penalty.train(args.dice.pretrain_steps)
    writer = start_run(run_dir, args, args.track, "drop", purge_step=start_epoch if start_epoch else None)
    writer.add_text("settings", source)
    q_bound = return_bound(real.rew[: real.size], penalty.largest(), args.eta, args.sac.gamma)
    data_state_abs_max = real_obs.abs().max().item()
    save = lambda epoch: record.save(epoch, agent, penalty, model_buffer)

    def stop_here(last_epoch: int, signum: int):
        writer.flush()  # TensorBoard must hold every step before the checkpoint's, or they are lost for good
        save(last_epoch)
        step, epochs = record.progress.step, args.epochs
        where = (
            f"in epoch {last_epoch + 2} of {epochs}, after update {step}"
            if step
            else f"after epoch {last_epoch + 1} of {epochs}"
        )
        bar.close()  # its last state above the stop line, not drawn again below it
        print(f"stopped {where}; continue with: python drop.py --resume {run_dir}", flush=True)
        raise SystemExit(128 + signum)

    # 3. The epochs: fit the penalty to the current policy, roll out and penalise, update SAC on mixed batches.
    bar = tqdm(total=args.epochs, initial=start_epoch, desc=f"drop {data.name}", unit="epoch")
    # However the loop ends, the logs are flushed and an error starts on a line of its own.
    with StopOnSignal() as stop, writer, bar:
        for epoch in range(start_epoch, args.epochs):
            progress, epoch_start = record.progress, time.perf_counter()
            if progress.step == 0:
                progress.penalty_stats = penalty.train(args.dice_steps)
                check_finite(progress.penalty_stats, "penalty/", epoch, run_dir)
            for step in range(progress.step, args.steps_per_epoch):
                if step % args.rollout_freq == 0:
                    # A NaN from the updates is named as such, not by the rollout it spoils.
                    check_finite(progress.sac_means(), "sac/", epoch, run_dir)
                    start_obs = real_obs[rollout_starts(real.size, episode_starts, args, device)]
                    summary = rollout(dynamics, agent.actor, penalty, start_obs, args, terminated_fn, model_buffer)
                    progress.rollouts.append(summary)
                    check_finite(summary, "rollout/", epoch, run_dir)
                progress.add(agent.update(mixed_batch(real, model_buffer, args.sac.batch_size, args.real_ratio)))
                if stop.requested:
                    check_finite(progress.sac_means(), "sac/", epoch, run_dir)
                    stop_here(epoch - 1, stop.requested)

            sac = progress.sac_means() | {"q_bound": q_bound}
            check_finite(sac, "sac/", epoch, run_dir)
            state_abs_max = max(r["state_abs_max"] for r in progress.rollouts)
            health = record.critic_health
            for warning in (
                health.update(epoch, sac, q_bound),
                health.update_states(epoch, state_abs_max, data_state_abs_max),
            ):
                if warning:
                    bar.write(warning, file=sys.stderr)
            rollout_means, postfix = log_epoch(writer, epoch, progress, sac, time.perf_counter() - epoch_start)
            record.progress, final = EpochProgress(), epoch + 1 == args.epochs
            if (epoch + 1) % args.eval_every == 0 or final:
                record.eval_history.append(
                    evaluation(agent.actor, data, args, epoch, record.wall_seconds(), rollout_means)
                )
                for name in ("return", "normalized_score", "normalized_score_std"):
                    writer.add_scalar(f"eval/{name}", record.eval_history[-1][name], epoch)
                write_progress(os.path.join(run_dir, "progress.csv"), record.eval_history)
            if (epoch + 1) % (args.save_every or args.eval_every) == 0 or final:
                writer.flush()
                save(epoch)
            score = record.eval_history[-1]["normalized_score"] if record.eval_history else float("nan")
            bar.update()
            bar.set_postfix({name: f"{value:.2f}" for name, value in postfix.items()} | {"score": f"{score:.1f}"})
            if stop.requested and not final:
                stop_here(epoch, stop.requested)
    print(f"normalized score: {score:.1f} (last eval); {record.critic_health.summary()}; checkpoint in {run_dir}")


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
