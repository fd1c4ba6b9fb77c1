"""DROP: Density Ratio regularized Offline Policy learning (model-based offline RL).

    python drop.py --env hopper-medium-v2 --eta 1.0

1. Fit a bootstrapped ensemble of probabilistic dynamics models to the offline data.
2. Every epoch, train one GradientDICE head per elite member to estimate
   tau(s, a) = rho_pi^model(s, a) / d_data(s, a) under the current policy.
3. Roll the policy out in the model from dataset states; penalise each model reward with
   r - eta * log(clip(tau, s1, s2)), using the head of the member that produced the transition.
4. Train SAC on batches of 5% real and 95% model transitions.

`--penalty mopo` swaps step 3's penalty for MOPO's (the largest std norm over the elites) and
`--penalty none` removes it (MBPO); both skip step 2.
"""

import csv
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

import numpy as np
import torch

from datasets import DEFAULT_ENV, DatasetError, OfflineDataset, load_dataset, make_eval_env, normalized_score
from dice import DiceConfig, GradientDICE, Transform, build_dice, dice_optimizer, penalty, resolve, train_dice
from dynamics import TERMINATION_FNS, DynamicsConfig, MemberGroups, ProbabilisticEnsemble, load_ensemble, save_ensemble, train_ensemble
from sac import SAC, Batch, ReplayBuffer, SACConfig, evaluate, pick_device, seed_everything, start_run


@dataclass(frozen=True)
class TaskDefaults:
    horizon: int
    eta: float
    dice_steps: int
    dice_lr: float
    dice_lambda: float
    clip: tuple[float, float] | None
    transform: Transform
    epochs: int


# The authors' per-dataset configs (github.com/cmciris/DROP). Where they differ from the
# paper's text (which states one DICE lr, 1e-4), the configs win.
LOG_10, LOG_50 = (0.01, 10.0), (0.01, 50.0)
TASK_DEFAULTS = {
    "halfcheetah-random": TaskDefaults(5, 0.5, 400, 1e-4, 0.1, LOG_10, "log", 500),
    "halfcheetah-medium": TaskDefaults(5, 1.0, 400, 1e-4, 0.1, LOG_10, "log", 500),
    "halfcheetah-medium-replay": TaskDefaults(5, 1.0, 400, 1e-4, 1.0, LOG_10, "log", 500),
    "halfcheetah-medium-expert": TaskDefaults(5, 0.1, 200, 1e-4, 0.5, LOG_50, "log", 500),
    "hopper-random": TaskDefaults(5, 1.0, 400, 1e-4, 0.1, None, "tanh-shift", 1500),
    "hopper-medium": TaskDefaults(5, 5.0, 400, 1e-4, 0.1, LOG_10, "log", 1500),
    "hopper-medium-replay": TaskDefaults(5, 1.0, 400, 1e-4, 0.1, LOG_10, "log", 1500),
    "hopper-medium-expert": TaskDefaults(5, 5.0, 400, 1e-4, 0.1, LOG_10, "log", 1500),
    "walker2d-random": TaskDefaults(1, 1.0, 600, 1e-3, 0.1, LOG_50, "log", 3000),
    "walker2d-medium": TaskDefaults(5, 0.1, 400, 1e-4, 0.1, None, "tanh-offset", 3000),
    "walker2d-medium-replay": TaskDefaults(1, 2.0, 600, 1e-4, 0.1, LOG_50, "log", 3000),
    "walker2d-medium-expert": TaskDefaults(1, 5.0, 500, 1e-4, 0.1, None, "tanh-offset", 3000),
}


@dataclass
class Args:
    env: str = DEFAULT_ENV
    """dataset: D4RL name (hopper-medium-v2), built-in (builtin-hopper-medium) or Minari id (mujoco/hopper/medium-v0)"""
    dataset: str | None = None
    """a D4RL-format HDF5 file to train on; --env then fixes the eval env, the score and the defaults"""
    penalty: Literal["drop", "mopo", "none"] = "drop"
    """reward penalty: drop (density ratio), mopo (max std norm over elites) or none (MBPO)"""
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
    model_retain_epochs: int = 5
    """epochs a model transition stays in the model buffer"""
    real_ratio: float = 0.05
    """fraction of real transitions in each SAC batch"""
    eval_every: int = 10
    """evaluate and checkpoint every this many epochs (and after the last)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes"""
    dynamics_path: str | None = None
    """reuse an ensemble saved by dynamics.py or an earlier drop.py run instead of training one"""
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


def args_from_dict(values: dict) -> Args:
    """The Args of a saved run (`asdict(args)` in its checkpoint), nested configs included."""
    nested = {"sac": SACConfig, "dynamics": DynamicsConfig, "dice": DiceConfig}
    values = {name: nested[name](**value) if name in nested else value for name, value in values.items()}
    values["dynamics"].weight_decays = tuple(values["dynamics"].weight_decays)
    values["clip"] = tuple(values["clip"]) if values.get("clip") is not None else None
    known = {f.name for f in fields(Args)}
    return Args(**{name: value for name, value in values.items() if name in known})


def task_hyperparameters(args: Args, task: str) -> TaskDefaults:
    """The table's entry for `task`, with every flag the user gave on top."""
    family = task.split("-")[0]
    # Tasks without an authors' config (expert datasets, unknown kinds) use the family's medium one.
    defaults = TASK_DEFAULTS.get(task, TASK_DEFAULTS[f"{family}-medium"])
    overrides = {name: getattr(args, name) for name in ("horizon", "eta", "dice_steps", "dice_lr", "dice_lambda", "clip", "transform", "epochs")}
    hp = replace(defaults, **{name: value for name, value in overrides.items() if value is not None})
    dice_lambda = resolve(args.dice).lam
    if args.dice_lambda is None and dice_lambda is not None:
        hp = replace(hp, dice_lambda=dice_lambda)
    if args.no_clip:
        hp = replace(hp, clip=None)
    if args.penalty == "drop" and hp.transform == "log" and (hp.clip is None or hp.clip[0] <= 0):
        raise SystemExit("error: the log transform needs a clip with a positive lower bound: pass --clip 0.01 10 or another --transform")
    return hp


def real_buffer(data: OfflineDataset, device: torch.device) -> ReplayBuffer:
    buffer = ReplayBuffer(len(data.observations), data.obs_dim, data.act_dim, device)
    as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)
    # Only true terminations stop bootstrapping; time-limit truncations (timeouts) do not.
    buffer.add(*(as_tensor(x) for x in (data.observations, data.actions, data.rewards, data.next_observations, data.terminals)))
    return buffer


def drop_penalty(dice: GradientDICE, obs, act, groups: MemberGroups, hp: TaskDefaults, dice_config: DiceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """tau of each sample under its own elite's head, and the penalty eta multiplies."""
    # Head g belongs to elite g, so the grouped layout pairs each sample with its member's head.
    tau = groups.gather(dice.ratio(groups.scatter(obs), groups.scatter(act)))
    return tau, penalty(tau, hp.transform, hp.clip, dice_config.below_clip)


def mopo_penalty(dynamics: ProbabilisticEnsemble, obs, act) -> torch.Tensor:
    """MOPO's uncertainty: the largest norm of the predicted std over the elites."""
    _, logvar = dynamics(obs, act, dynamics.elites)
    return (0.5 * logvar).exp().norm(dim=-1).max(0).values


@torch.no_grad()
def rollout(dynamics, agent, dice, start_obs, hp: TaskDefaults, args: Args, terminated_fn, buffer: ReplayBuffer) -> dict[str, float]:
    """h-step rollouts from `start_obs`; each sample steps with a random elite and is penalised, then stored.

    Returns means over the stored samples, including the penalty's health: how often tau fell
    outside the clip and how often the "penalty" raised the reward instead of lowering it.
    """
    num_elites, dice_config = len(dynamics.elites), resolve(args.dice)
    obs, stats = start_obs, {"reward": [], "penalty": [], "tau": []}
    for _ in range(hp.horizon):
        act, _ = agent.actor(obs)
        groups = MemberGroups(torch.randint(num_elites, (len(obs),), device=obs.device), num_elites)
        next_obs, reward = dynamics.sample_step(obs, act, groups)
        if args.penalty == "drop":
            tau, reward_penalty = drop_penalty(dice, obs, act, groups, hp, dice_config)
            stats["tau"].append(tau)
        elif args.penalty == "mopo":
            reward_penalty = mopo_penalty(dynamics, obs, act)
        else:
            reward_penalty = torch.zeros_like(reward)
        stats["reward"].append(reward)
        stats["penalty"].append(reward_penalty)
        done = terminated_fn(next_obs)
        buffer.add(obs, act, reward - hp.eta * reward_penalty, next_obs, done)
        obs = next_obs[~done]
        if len(obs) == 0:
            break
    stats = {name: torch.cat(values) for name, values in stats.items() if values}
    summary = {f"{name}_mean": values.mean().item() for name, values in stats.items()}
    summary["length_mean"] = len(stats["reward"]) / len(start_obs)
    summary["bonus_fraction"] = (hp.eta * stats["penalty"] < 0).float().mean().item()
    if "tau" in stats and hp.clip is not None:
        summary["tau_below_clip"] = (stats["tau"] <= hp.clip[0]).float().mean().item()
        summary["tau_above_clip"] = (stats["tau"] >= hp.clip[1]).float().mean().item()
    return summary


PROGRESS_COLUMNS = ["epoch", "normalized_score", "normalized_score_std", "return", "wall_seconds", "penalty_mean", "rollout_tau_mean"]


def append_progress(path: str, row: dict):
    """One evaluation per row of runs/RUN/progress.csv, so sweeps need not parse TensorBoard."""
    is_new = not os.path.exists(path)
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, PROGRESS_COLUMNS)
        if is_new:
            writer.writeheader()
        writer.writerow(row)


def model_buffer_capacity(args: Args, horizon: int) -> int:
    """Room for `model_retain_epochs` epochs of rollouts, each at most rollout_batch_size * horizon."""
    rollouts_per_epoch = max(args.steps_per_epoch // args.rollout_freq, 1)
    return args.rollout_batch_size * horizon * args.model_retain_epochs * rollouts_per_epoch


def mixed_batch(real: ReplayBuffer, model: ReplayBuffer, batch_size: int, real_ratio: float) -> Batch:
    num_real = int(batch_size * real_ratio)
    real_part, model_part = real.sample(num_real), model.sample(batch_size - num_real)
    return Batch(*(torch.cat(pair) for pair in zip(real_part, model_part)))


def save_checkpoint(path: str, agent: SAC, dice: GradientDICE | None, args: Args, data: OfflineDataset, epoch: int, score: float):
    """Everything eval.py needs, loadable with weights_only=True (tensors and plain Python values only)."""
    payload = {
        "actor": agent.actor.state_dict(),
        "critic": agent.critic.state_dict(),
        "critic_target": agent.critic_target.state_dict(),
        "log_alpha": agent.log_alpha.detach(),
        "dice": dice.state_dict() if dice is not None else None,
        "args": asdict(args),
        "dataset": data.name,
        "family": data.family,
        "eval_env_id": data.eval_env_id,
        "obs_dim": data.obs_dim,
        "act_dim": data.act_dim,
        "epoch": epoch,
        "normalized_score": score,
    }
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(args: Args):
    from tqdm import trange

    try:
        data = load_dataset(args.env, args.dataset)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    hp = task_hyperparameters(args, data.task)
    seed_everything(args.seed)
    device = pick_device(args.device)
    run_name = args.run_name or f"drop__{data.name.replace('/', '_')}__{args.penalty}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    writer = start_run(run_name, args, args.track, "drop")
    writer.add_text("task_hyperparameters", str(hp))
    print(f"{data.name} ({data.source}, {len(data.observations)} transitions) -> runs/{run_name}\n{hp}")
    real = real_buffer(data, device)
    real_obs, real_act = real.obs[: real.size], real.act[: real.size]

    # 1. Dynamics: train once, or reuse a saved ensemble. Frozen from here on.
    if args.dynamics_path:
        dynamics = load_ensemble(args.dynamics_path, data.family, data.obs_dim, data.act_dim, device)
    else:
        dynamics = ProbabilisticEnsemble(data.obs_dim, data.act_dim, args.dynamics).to(device)
        history = train_ensemble(dynamics, real_obs, real_act, real.next_obs[: real.size], real.rew[: real.size], args.seed)
        for epoch, mse in enumerate(history):
            writer.add_scalar("dynamics/holdout_mse", mse, epoch)
        save_ensemble(dynamics, os.path.join(run_dir, "dynamics.pt"), data.family)
    dynamics.requires_grad_(False)
    terminated_fn = TERMINATION_FNS[data.family]

    agent = SAC(data.obs_dim, data.act_dim, args.sac, device)
    model_buffer = ReplayBuffer(model_buffer_capacity(args, hp.horizon), data.obs_dim, data.act_dim, device)
    sample_action = lambda obs: agent.actor(obs)[0]

    # 2. GradientDICE heads, one per elite. The dynamics are frozen, so each elite's mean
    # next state for every dataset (s, a) is computed once here instead of at every DICE step.
    dice, dice_config = None, resolve(args.dice)
    if args.penalty == "drop":
        dice = build_dice(dice_config, data.obs_dim, data.act_dim, len(dynamics.elites), dynamics.input_mean, dynamics.input_std).to(device)
        dice_opt = dice_optimizer(dice, hp.dice_lr, dice_config)
        dice_next_obs = dynamics.elite_mean_next_obs(real_obs, real_act)
        train_dice(dice, dice_opt, real_obs, real_act, dice_next_obs, real_obs, sample_action, args.dice.pretrain_steps, dice_config, hp.dice_lambda)

    health_idx = torch.randperm(real.size, device=device)[:10_000]  # fixed dataset (s, a) for tau's health check
    score, run_start = float("nan"), time.perf_counter()
    progress = trange(hp.epochs, desc=f"drop {data.name}", unit="epoch")
    for epoch in progress:
        epoch_start = time.perf_counter()
        health = {}
        if dice is not None:
            objective = train_dice(dice, dice_opt, real_obs, real_act, dice_next_obs, real_obs, sample_action, hp.dice_steps, dice_config, hp.dice_lambda)
            writer.add_scalar("dice/objective", objective.mean().item(), epoch)
            # GradientDICE's constraint makes E_D[tau] = 1 for every policy; far from 1 means the estimate failed.
            with torch.no_grad():
                health["tau_data"] = dice.ratio(real_obs[health_idx], real_act[health_idx]).mean().item()
            writer.add_scalar("dice/tau_data_mean", health["tau_data"], epoch)
        last_rollout, loss_sums = {}, {}
        for step in range(args.steps_per_epoch):
            if step % args.rollout_freq == 0:
                start_obs = real_obs[torch.randint(real.size, (args.rollout_batch_size,), device=device)]
                for name, value in rollout(dynamics, agent, dice, start_obs, hp, args, terminated_fn, model_buffer).items():
                    writer.add_scalar(f"rollout/{name}", value, epoch * args.steps_per_epoch + step)
                    last_rollout[name] = value
            losses = agent.update(mixed_batch(real, model_buffer, args.sac.batch_size, args.real_ratio))
            for name, value in losses.items():
                loss_sums[name] = loss_sums.get(name, 0.0) + value
        for name, value in loss_sums.items():  # one host sync per epoch, not per update
            writer.add_scalar(f"sac/{name}", (value / args.steps_per_epoch).item(), epoch)
        writer.add_scalar("charts/epoch_seconds", time.perf_counter() - epoch_start, epoch)
        health.update(penalty=last_rollout["penalty_mean"], bonus=last_rollout["bonus_fraction"])
        if "tau_mean" in last_rollout:
            health.update(tau_rollout=last_rollout["tau_mean"], below=last_rollout.get("tau_below_clip", 0.0), above=last_rollout.get("tau_above_clip", 0.0))

        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == hp.epochs:
            returns = evaluate(agent.actor, make_eval_env(data), args.eval_episodes, seed=args.seed * 1000)
            scores = normalized_score(data.family, returns)
            score = float(scores.mean())
            writer.add_scalar("eval/return", returns.mean(), epoch)
            writer.add_scalar("eval/normalized_score", score, epoch)
            writer.add_scalar("eval/normalized_score_std", scores.std(), epoch)
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, dice, args, data, epoch, score)
            append_progress(os.path.join(run_dir, "progress.csv"), {
                "epoch": epoch, "normalized_score": score, "normalized_score_std": float(scores.std()), "return": float(returns.mean()),
                "wall_seconds": round(time.perf_counter() - run_start, 1), "penalty_mean": last_rollout["penalty_mean"],
                "rollout_tau_mean": last_rollout.get("tau_mean", float("nan")),
            })
        progress.set_postfix({name: f"{value:.2f}" for name, value in health.items()} | {"score": f"{score:.1f}"})
    writer.close()
    print(f"normalized score: {score:.1f} (last eval); checkpoint in {run_dir}")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
