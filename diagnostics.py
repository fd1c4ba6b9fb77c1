"""Is DROP's penalty right? The paper's Fig. 2 and Fig. 3 for a trained run, checked against MuJoCo.

    python diagnostics.py runs/RUN --samples 10000 --seed 0

Fig. 2 (section 5.2): each penalty against the true model error, on two sets of N state-actions:
`dataset` (drawn from the offline data, the paper's setting) and `rollout` (from h-step rollouts of
the run's policy in its ensemble, what the penalty acts on in training). Each sample gets the
random elite k a rollout would give it; its model error is ||mean_k(s, a) - T(s, a)||_2 over the
next-state dimensions, with T one step of MuJoCo itself. DROP's penalty is the run's transform of
clip(tau_k(s, a)), MOPO's the largest std norm over the elites, both from the same ensemble.

Fig. 3: UMAP of dataset state-actions with KDE contours of their density, and 500 rollout samples
projected with the same map, coloured yellow to red by penalty.

Drift: the run's policy in MuJoCo itself for --drift-steps steps from --drift-starts dataset states
(`--drift-from episode-starts`: the data's episode starts, where evaluation sets off),
as evaluation runs it. Per step: the true reward, the ensemble's reward for the same (s, a), and the
ensemble's next-state error. Training only ever sees h model steps from dataset states; this shows
what the policy does after them, and whether the model saw it coming.

Separation: what tells the run's model-buffer samples (what SAC trains on) from the data? Fresh
classifiers of the two on (s, a), on s alone and on a alone (classifier.py's `what_separates`), and
for a --ratio classifier run its own heads, each with its accuracy on held-out samples and the share
of rollout samples it puts at the upper clip, where the penalty stops telling them apart.

Writes runs/RUN/diagnostics/{fig2.png, fig3.png, drift.png, diagnostics.json} (and samples.npz, every
sample's error and penalties, and the drift arrays) and prints a table and the times.
"""

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro

import drop
from checkpoint import penalty_state
from classifier import separation, what_separates
from datasets import DatasetError, OfflineDataset, load_dataset, simulator_states
from dice import resolve
from dynamics import MemberGroups, load_ensemble
from eval import load_policy
from penalties import ClassifierRatio, MopoPenalty, NoPenalty, RatioPenalty, build_penalty
from sac import ReplayBuffer

# Hopper's and Walker2d's observations clip every velocity to [-10, 10]; HalfCheetah's do not.
VELOCITY_CLIP = {"hopper": 10.0, "walker2d": 10.0, "halfcheetah": None}
SUPPORT_SAMPLES = 500  # rollout samples drawn on Fig. 3, as in the paper
UMAP_FIT_SAMPLES = 5000  # dataset state-actions the UMAP is fitted on (at most --samples)
MIN_SAMPLES = 10  # fewer make the correlations meaningless
ACTION_BOUND = 0.95  # |a| beyond this counts as an action at the bounds of [-1, 1]


@dataclass
class Args:
    run_dir: tyro.conf.Positional[str]
    """a run folder written by drop.py (holding checkpoint.pt)"""
    samples: int = 10_000
    """state-actions per sample set (dataset and rollout)"""
    seed: int = 0
    """seed of the sample draws, the elite draws, the policy's actions and the UMAP"""
    drift_starts: int = 20
    """dataset states the policy is run from in MuJoCo for drift.png (0: no drift)"""
    drift_steps: int = 100
    """MuJoCo steps from each of them (an episode that terminates ends earlier)"""
    drift_from: Literal["dataset", "episode-starts"] = "dataset"
    """drift's start states: any dataset state, or the data's episode starts, where evaluation starts (a policy may walk on from mid-stride yet not set off)"""
    separation_steps: int = 2000
    """Adam steps of each fresh classifier of model-buffer against dataset samples (0: no separation)"""
    fig3: bool = True
    """draw fig3.png (--no-fig3 skips the UMAP, most of the command's time and a numba compile on first use)"""


@dataclass
class Run:
    """What a trained run is made of, rebuilt from its folder."""

    checkpoint: dict
    args: drop.Args
    """the run's settings, the per-dataset table's included"""
    data: OfflineDataset
    dynamics: torch.nn.Module
    penalty: NoPenalty
    actor: torch.nn.Module
    env: object  # the Gymnasium env whose MuJoCo is the true dynamics T


def dynamics_path(run_dir: str, checkpoint: dict) -> str:
    """The ensemble the run used: the checkpoint's record, else --dynamics-path, else the one it trained."""
    return (
        checkpoint.get("dynamics_path")
        or checkpoint["args"].get("dynamics_path")
        or os.path.join(run_dir, "dynamics.pt")
    )


def load_run(run_dir: str) -> Run:
    """The run's policy, DICE heads, ensemble and dataset; any missing or mismatched part ends in one line."""
    actor, checkpoint, env = load_policy(os.path.join(run_dir, "checkpoint.pt"), None)
    if "args" not in checkpoint or ("dice" not in checkpoint and "penalty" not in checkpoint):
        raise SystemExit(f"error: {run_dir}/checkpoint.pt has no saved args or penalty; it was not written by drop.py")
    args = drop.args_from_dict(checkpoint["args"])
    try:
        data = load_dataset(args.env, args.dataset)
    except DatasetError as e:
        raise SystemExit(f"error: the dataset of {run_dir} cannot be loaded ({e})")
    path = dynamics_path(run_dir, checkpoint)
    # load_ensemble refuses an ensemble of another robot than the dataset's (a foreign checkpoint's).
    if not os.path.isfile(path):
        raise SystemExit(
            f"error: the dynamics file of {run_dir} is gone ({path}); the diagnostics need the ensemble the run was trained with"
        )
    dynamics = load_ensemble(
        path, data.family, data.obs_dim, data.act_dim, torch.device("cpu"), data.transitions_sha256()
    ).requires_grad_(False)
    args, _ = drop.settings(args, data.task)
    data_obs, data_act = torch.as_tensor(data.observations), torch.as_tensor(data.actions)
    penalty = build_penalty(
        args,
        dynamics,
        data_obs,
        data_act,
        ReplayBuffer(1, data.obs_dim, data.act_dim, torch.device("cpu")),
        lambda obs: actor(obs)[0],
    )
    try:
        penalty.load_state_dict(penalty_state(checkpoint))
    except RuntimeError as e:
        raise SystemExit(
            f"error: the ratio heads in {run_dir}/checkpoint.pt do not fit its ensemble {path} ({' '.join(str(e).split())[:200]})"
        )
    if isinstance(penalty, RatioPenalty):
        penalty.net.requires_grad_(False)
    return Run(checkpoint, args, data, dynamics, penalty, actor.requires_grad_(False), env)


# ---------------------------------------------------------------------------------------------
# The true dynamics T


def rebuild_states(obs: np.ndarray, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """MuJoCo's (qpos, qvel) from observations that leave out the x position, which does not enter
    these robots' dynamics: qpos = [0, obs[:nq-1]], qvel = obs[nq-1:]."""
    obs = np.asarray(obs, dtype=np.float64)
    return np.concatenate([np.zeros((len(obs), 1)), obs[:, : nq - 1]], 1), obs[:, nq - 1 :]


def at_velocity_clip(obs: np.ndarray, nq: int, family: str) -> np.ndarray:
    """Samples whose observed velocity is at (or past) the observation clip: the true velocity is unknown."""
    clip = VELOCITY_CLIP[family]
    if clip is None:
        return np.zeros(len(obs), dtype=bool)
    return (np.abs(obs[:, nq - 1 :]) >= clip).any(1)


def simulate(env, qpos: np.ndarray, qvel: np.ndarray, actions: np.ndarray, desc: str = "MuJoCo") -> np.ndarray:
    """T(s, a): the observation after one env step from each state, with the action scaled to the
    env's action space as evaluation does."""
    from tqdm import tqdm

    sim = env.unwrapped
    env.reset(seed=0)
    next_obs = np.empty((len(qpos), env.observation_space.shape[0]))
    for i in tqdm(range(len(qpos)), desc=desc, unit="step", mininterval=1.0):
        sim.set_state(qpos[i], qvel[i])
        next_obs[i] = sim.step(actions[i] * env.action_space.high)[0]
    return next_obs


# ---------------------------------------------------------------------------------------------
# Errors, penalties and correlations


@torch.no_grad()
def model_errors(
    dynamics, obs: torch.Tensor, act: torch.Tensor, elite: torch.Tensor, true_next_obs: np.ndarray
) -> np.ndarray:
    """||mean_k(s, a) - T(s, a)||_2 for each sample, k its drawn elite."""
    predicted = dynamics.elite_mean_next_obs(obs, act)[elite, torch.arange(len(obs))]
    return np.linalg.norm(predicted.double().numpy() - true_next_obs, axis=1)


@torch.no_grad()
def penalties(run: Run, obs: torch.Tensor, act: torch.Tensor, elite: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
    """Each penalty the run can compute, exactly as training does; DROP's with its tau."""
    result = {}
    if isinstance(run.penalty, RatioPenalty):
        penalty, tau = run.penalty(obs, act, MemberGroups(elite, len(run.dynamics.elites)))
        result["drop"] = {"penalty": penalty.double().numpy(), "tau": tau.double().numpy()}
    members = run.penalty.members if isinstance(run.penalty, MopoPenalty) else None  # as the run trained, else MOPO's
    result["mopo"] = {"penalty": run.dynamics.mopo_penalty(obs, act, members).double().numpy()}
    return result


def correlations(penalty: np.ndarray, error: np.ndarray) -> dict[str, float]:
    """Pearson's r and Spearman's rho (average ranks for ties); NaN where either side is constant."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: the NaN says it
        return {
            "pearson": float(stats.pearsonr(penalty, error)[0]),
            "spearman": float(stats.spearmanr(penalty, error)[0]),
        }


def by_error_tenth(penalty: np.ndarray, error: np.ndarray) -> list[float]:
    """The mean penalty on each tenth of the samples, taken in order of model error: a penalty that follows the error rises along it.
    Fewer than 10 samples give one part per sample."""
    return [
        float(penalty[part].mean()) for part in np.array_split(np.argsort(error, kind="stable"), min(10, len(error)))
    ]


def summary(name: str, values: dict[str, np.ndarray], error: np.ndarray, hp: drop.Args) -> dict[str, float]:
    """Correlations with the error, the mean, the mean by tenth of the error, and for DROP where tau fell against the clip."""
    stats = {
        **correlations(values["penalty"], error),
        "mean": float(values["penalty"].mean()),
        "by_error_tenth": by_error_tenth(values["penalty"], error),
    }
    if name == "drop":
        tau = values["tau"]
        stats["tau_mean"] = float(tau.mean())
        stats["tau_below_clip"] = float((tau < hp.clip[0]).mean()) if hp.clip else 0.0
        stats["tau_above_clip"] = float((tau > hp.clip[1]).mean()) if hp.clip else 0.0
        stats["raises_reward"] = float((hp.eta * values["penalty"] < 0).mean())  # a "penalty" that is a bonus
    return stats


# ---------------------------------------------------------------------------------------------
# Sample sets


@torch.no_grad()
def rollout_samples(run: Run, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` state-actions from h-step rollouts of the run's policy in its ensemble, started at
    dataset states: drop.py's own rollout() fills a buffer as it fills the model buffer in training."""
    obs = torch.as_tensor(run.data.observations)
    buffer = ReplayBuffer(count * run.args.horizon, run.data.obs_dim, run.data.act_dim, torch.device("cpu"))
    start_obs = obs[torch.randint(len(obs), (count,))]
    drop.rollout(
        run.dynamics,
        run.actor,
        run.penalty,
        start_obs,
        run.args,
        drop.rollout_termination(run.data.family, obs, run.args.halt_margin),
        buffer,
    )
    pick = torch.randperm(buffer.size)[:count]
    return buffer.obs[pick].numpy(), buffer.act[pick].numpy()


def true_states(
    run: Run, obs: np.ndarray, states: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which observations have a known simulator state, and the states (qpos, qvel) of those kept:
    the stored `states`, else states rebuilt from the observations, less the samples at the velocity clip."""
    if states is not None:
        return np.ones(len(obs), dtype=bool), *states
    nq = run.env.unwrapped.model.nq
    keep = ~at_velocity_clip(obs, nq, run.data.family)
    qpos, qvel = rebuild_states(obs[keep], nq)
    return keep, qpos, qvel


def evaluate_set(
    run: Run, obs: np.ndarray, act: np.ndarray, states: tuple[np.ndarray, np.ndarray] | None, label: str
) -> dict:
    """Errors and penalties of one sample set. Without stored `states` they are rebuilt from the
    observations, and samples at the velocity clip are skipped."""
    keep, qpos, qvel = true_states(run, obs, states)
    obs, act = obs[keep], act[keep]
    true_next_obs = simulate(run.env, qpos, qvel, act, desc=f"MuJoCo, {label} samples")
    obs_t, act_t = torch.as_tensor(obs), torch.as_tensor(act)
    elite = torch.randint(len(run.dynamics.elites), (len(obs),))  # the elite a rollout would draw
    return {
        "obs": obs,
        "act": act,
        "elite": elite,
        "error": model_errors(run.dynamics, obs_t, act_t, elite, true_next_obs),
        "penalties": penalties(run, obs_t, act_t, elite),
        "skipped": int((~keep).sum()),
        "states": "stored infos/qpos, infos/qvel" if states is not None else "rebuilt from observations",
    }


DRIFT_FROM = {"dataset": "dataset states", "episode-starts": "episode starts of the data"}


def drift_start_rows(data, kind: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """The dataset rows drift starts from: `count` of any rows, or of the first rows of the finished episodes."""
    rows = np.arange(len(data)) if kind == "dataset" else data.episode_starts()
    return rows[rng.choice(len(rows), min(count, len(rows)), replace=False)]


@torch.no_grad()
def real_drift(run: Run, qpos: np.ndarray, qvel: np.ndarray, steps: int) -> dict[str, np.ndarray]:
    """The run's deterministic policy in MuJoCo for `steps` steps from each state (qpos, qvel). Per
    start and step: the true reward, the elites' mean reward for the same (s, a), the mean over the
    elites of ||mean_k(s, a) - T(s, a)||_2, and each penalty as training computes it (with a random
    elite, as in Fig. 2). `[starts, steps]` arrays, NaN after a termination."""
    from tqdm import tqdm

    sim, scale = run.env.unwrapped, run.env.action_space.high
    run.env.reset(seed=0)
    starts, obs_dim, act_dim = len(qpos), run.env.observation_space.shape[0], run.env.action_space.shape[0]
    obs, next_obs, act = (
        np.full((starts, steps, obs_dim), np.nan),
        np.full((starts, steps, obs_dim), np.nan),
        np.full((starts, steps, act_dim), np.nan),
    )
    true_reward = np.full((starts, steps), np.nan)
    for i in tqdm(range(starts), desc="MuJoCo, the policy from dataset states", unit="start"):
        sim.set_state(qpos[i], qvel[i])
        state = sim._get_obs()
        for t in range(steps):
            action = run.actor.act(state.astype(np.float32))
            following, reward, terminated, _, _ = sim.step(action * scale)
            obs[i, t], act[i, t], next_obs[i, t], true_reward[i, t] = state, action, following, reward
            state = following
            if terminated:
                break
    alive = ~np.isnan(true_reward)
    obs_t, act_t = torch.as_tensor(obs[alive], dtype=torch.float32), torch.as_tensor(act[alive], dtype=torch.float32)
    mean, _ = run.dynamics(obs_t, act_t, run.dynamics.elites)  # [elites, samples, obs + 1]
    per_sample = {
        "model_reward": mean[..., -1].mean(0).double().numpy(),
        "error": np.linalg.norm((mean[..., :-1] + obs_t).double().numpy() - next_obs[alive], axis=-1).mean(0),
    }
    elite = torch.randint(len(run.dynamics.elites), (len(obs_t),))
    for name, values in penalties(run, obs_t, act_t, elite).items():
        per_sample[f"{name}_penalty"] = values["penalty"]
    drift = {"true_reward": true_reward}
    for name, values in per_sample.items():
        drift[name] = np.full((starts, steps), np.nan)
        drift[name][alive] = values
    return drift


def drift_summary(drift: dict[str, np.ndarray], data_reward_mean: float) -> dict:
    """Means over the first 10 steps and over all, and per step (over the starts still running)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step no start reached has no mean
        by_step = {name: np.nanmean(values, 0) for name, values in drift.items()}
    summary = {"starts": len(drift["error"]), "steps": drift["error"].shape[1], "data_reward_mean": data_reward_mean}
    for name, values in drift.items():
        summary[f"{name}_first_10"], summary[f"{name}_all"] = (
            float(np.nanmean(values[:, :10])),
            float(np.nanmean(values)),
        )
    summary["running_at_end"] = float((~np.isnan(drift["error"][:, -1])).mean())
    summary["by_step"] = {name: [float(v) for v in values] for name, values in by_step.items()}
    return summary


# ---------------------------------------------------------------------------------------------
# Figures


def normalised(x: np.ndarray) -> np.ndarray:
    """x mapped onto [0, 1] (as the paper plots it); a constant maps to 0."""
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def plot_fig2(sets: dict[str, dict], stats: dict[str, dict], path: str, title: str):
    import matplotlib.pyplot as plt

    names = list(next(iter(sets.values()))["penalties"])
    fig, axes = plt.subplots(len(sets), len(names), figsize=(4 * len(names), 4 * len(sets)), squeeze=False)
    for row, (set_name, samples) in enumerate(sets.items()):
        for col, name in enumerate(names):
            ax, s = axes[row, col], stats[set_name][name]
            ax.scatter(
                normalised(samples["error"]),
                normalised(samples["penalties"][name]["penalty"]),
                s=2,
                alpha=0.3,
                color="C0" if name == "drop" else "C1",
                rasterized=True,
            )
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.set(
                xlim=(-0.02, 1.02),
                ylim=(-0.02, 1.02),
                xlabel="model error (normalised)",
                ylabel=f"{name.upper()} penalty (normalised)",
            )
            ax.set_title(
                f"{name.upper()}, {set_name} samples (n={stats[set_name]['n']})\nPearson {s['pearson']:.2f}, Spearman {s['spearman']:.2f}",
                fontsize=9,
            )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_fig3(
    data_xy: np.ndarray, support_xy: np.ndarray, support_penalties: dict[str, np.ndarray], path: str, title: str
):
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    both = np.concatenate([data_xy, support_xy])
    low, high = both.min(0), both.max(0)
    margin = 0.05 * (high - low)
    gx, gy = np.meshgrid(*(np.linspace(low[d] - margin[d], high[d] + margin[d], 120) for d in range(2)))
    density = gaussian_kde(data_xy.T)(np.stack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
    fig, axes = plt.subplots(1, len(support_penalties), figsize=(5.5 * len(support_penalties), 5), squeeze=False)
    for ax, (name, penalty) in zip(axes[0], support_penalties.items()):
        ax.contour(gx, gy, density, levels=8, colors="k", linewidths=0.7)
        points = ax.scatter(
            *support_xy.T, c=normalised(penalty), cmap="YlOrRd", vmin=0, vmax=1, s=12, edgecolors="grey", linewidths=0.2
        )
        fig.colorbar(points, ax=ax, label=f"{name.upper()} penalty (normalised)")
        ax.set_title(f"{name.upper()}: {len(support_xy)} rollout samples; lines: dataset density (KDE)", fontsize=9)
        ax.set(xticks=[], yticks=[], xlabel="UMAP 1", ylabel="UMAP 2")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_drift(summary: dict, dataset_error: float, horizon: int, path: str, title: str):
    import matplotlib.pyplot as plt

    steps, by_step = np.arange(1, summary["steps"] + 1), summary["by_step"]
    fig, (reward_ax, error_ax, penalty_ax) = plt.subplots(1, 3, figsize=(15, 4))
    reward_ax.plot(steps, by_step["true_reward"], label="MuJoCo")
    reward_ax.plot(steps, by_step["model_reward"], label="ensemble, same (s, a)")
    reward_ax.axhline(summary["data_reward_mean"], color="k", ls=":", lw=0.8, label="dataset mean")
    error_ax.plot(steps, by_step["error"], color="C3", label="ensemble")
    error_ax.axhline(dataset_error, color="k", ls=":", lw=0.8, label="on dataset samples (Fig. 2)")
    error_ax.set_yscale("symlog", linthresh=max(dataset_error, 1e-3))
    for name in ("drop", "mopo"):
        if f"{name}_penalty" in by_step:
            penalty_ax.plot(
                steps, by_step[f"{name}_penalty"], color="C0" if name == "drop" else "C1", label=name.upper()
            )
    for ax in (reward_ax, error_ax, penalty_ax):
        ax.axvline(horizon, color="gray", ls="--", lw=0.8, label=f"rollout horizon h = {horizon}")
        ax.set_xlabel("MuJoCo step from a start state")
        ax.legend(fontsize=8)
    reward_ax.set_ylabel("reward per step, mean over starts")
    error_ax.set_ylabel("next-state error ||mean_k(s, a) - T(s, a)||")
    penalty_ax.set_ylabel("penalty u(s, a) (reward - eta u), as in training")
    fig.suptitle(
        f"{title}\nthe policy from {summary['starts']} {summary['from']}; {summary['running_at_end']:.0%} still running at step {summary['steps']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def umap_embeddings(run: Run, fit_sa: np.ndarray, support_sa: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """UMAP fitted on dataset state-actions (standardised as the ensemble sees them), and the
    rollout samples projected with the same map."""
    import umap

    mean, std = run.dynamics.input_mean.numpy(), run.dynamics.input_std.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": reproducibility is the point
        mapper = umap.UMAP(random_state=seed).fit((fit_sa - mean) / std)
        return mapper.embedding_, mapper.transform((support_sa - mean) / std)


# ---------------------------------------------------------------------------------------------
# Separation: what tells the rollouts from the data


def rollout_separation(run: Run, steps: int, held_out: int, rng: np.random.Generator) -> dict:
    """The separation section of diagnostics.json; `held_out` samples of each side judge the classifiers."""
    buffer = run.checkpoint["model_buffer"]
    size, data_size = int(buffer["size"]), len(run.data)
    held_out = min(held_out, size // 2, data_size // 2)
    model_rows, data_rows = torch.as_tensor(rng.permutation(size)), torch.as_tensor(rng.permutation(data_size))
    model_obs, model_act, member = (
        buffer["obs"][model_rows].float(),
        buffer["act"][model_rows].float(),
        buffer["member"][model_rows].long(),
    )
    data_obs, data_act = (
        torch.as_tensor(run.data.observations)[data_rows].float(),
        torch.as_tensor(run.data.actions)[data_rows].float(),
    )
    upper_clip = run.args.clip[1] if run.args.clip is not None else None
    classifiers = {}
    if isinstance(
        run.penalty, ClassifierRatio
    ):  # the run's own heads: a rollout sample under its elite's head, a dataset sample under a random one
        groups = MemberGroups(member[-held_out:], run.penalty.net.num_heads)
        with torch.no_grad():
            logit = lambda obs, act: groups.gather(
                run.penalty.net.logit(groups.scatter(obs[-held_out:]), groups.scatter(act[-held_out:]))
            )
            classifiers["the run's heads"] = separation(
                logit(model_obs, model_act), logit(data_obs, data_act), upper_clip
            )
    classifiers |= what_separates(
        model_obs,
        model_act,
        data_obs,
        data_act,
        run.dynamics.input_mean,
        run.dynamics.input_std,
        run.args.classifier,
        steps,
        held_out,
        upper_clip,
    )
    at_bounds = lambda act: (act.abs() > ACTION_BOUND).float().mean().item()
    return {
        "classifiers": classifiers,
        "steps": steps,
        "held_out": held_out,
        "rollout_samples": size,
        "upper_clip": upper_clip,
        "actions_at_bounds": {"rollout": at_bounds(model_act), "data": at_bounds(data_act)},
    }


# ---------------------------------------------------------------------------------------------


def json_ready(value):
    """Plain JSON: NaN (a constant penalty has no correlation) becomes null."""
    if isinstance(value, dict):
        return {key: json_ready(v) for key, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def sample_arrays(sets: dict[str, dict]) -> dict[str, np.ndarray]:
    """Every sample's state-action, elite, error and penalties, so that anyone can recompute the statistics."""
    arrays = {}
    for set_name, s in sets.items():
        arrays.update({f"{set_name}/{key}": np.asarray(s[key]) for key in ("obs", "act", "elite", "error")})
        for name, values in s["penalties"].items():
            arrays.update({f"{set_name}/{name}_{key}": value for key, value in values.items()})
    return arrays


def print_table(stats: dict):
    print(
        f"{'set':8} {'penalty':8} {'n':>6} {'skipped':>7} {'pearson':>8} {'spearman':>8} {'mean':>9} {'low10%':>8} {'high10%':>8} {'tau<s1':>7} {'tau>s2':>7} {'bonus':>6}"
    )
    for set_name in ("dataset", "rollout"):
        s = stats[set_name]
        for name in ("drop", "mopo"):
            if name in s:
                p = s[name]
                clip_columns = (
                    f"{p['tau_below_clip']:7.1%} {p['tau_above_clip']:7.1%} {p['raises_reward']:6.1%}"
                    if name == "drop"
                    else ""
                )
                tenths = p["by_error_tenth"]
                print(
                    f"{set_name:8} {name:8} {s['n']:6d} {s['skipped']:7d} {p['pearson']:8.3f} {p['spearman']:8.3f} {p['mean']:9.4f} {tenths[0]:8.3f} {tenths[-1]:8.3f} {clip_columns}"
                )


def main(args: Args):
    import matplotlib

    matplotlib.use("Agg")
    if args.samples < MIN_SAMPLES:
        raise SystemExit(f"error: --samples {args.samples} is too few for correlations; use at least {MIN_SAMPLES}")
    if args.drift_starts < 0 or args.drift_steps < 1:
        raise SystemExit(
            f"error: --drift-starts {args.drift_starts} --drift-steps {args.drift_steps}: give at least 0 starts (0: no drift) and 1 step"
        )
    if args.separation_steps < 0:
        raise SystemExit(
            f"error: --separation-steps {args.separation_steps} is impossible; give 0 (no separation) or more"
        )
    start = time.perf_counter()
    run_dir = args.run_dir.rstrip("/")
    run = load_run(run_dir)
    times = {"load": time.perf_counter() - start}
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    notes = []
    if not isinstance(run.penalty, RatioPenalty):
        notes.append(f"a --penalty {run.args.penalty} run has no DICE heads: only MOPO's penalty is shown")
    stored = simulator_states(run.data)
    if stored is None:
        notes.append(
            f"{run.data.name} stores no infos/qpos, infos/qvel: its states are rebuilt from observations, like the rollout samples"
        )

    # Fig. 2: errors and penalties on both sample sets.
    tick = time.perf_counter()
    rows = rng.choice(len(run.data), min(args.samples, len(run.data)), replace=False)
    rollout_obs, rollout_act = rollout_samples(run, args.samples)
    sets = {
        "dataset": evaluate_set(
            run,
            run.data.observations[rows],
            run.data.actions[rows],
            None if stored is None else (stored[0][rows], stored[1][rows]),
            "dataset",
        ),
        "rollout": evaluate_set(run, rollout_obs, rollout_act, None, "rollout"),
    }
    stats = {
        set_name: {
            "n": len(s["error"]),
            "skipped": s["skipped"],
            "states": s["states"],
            "error_mean": float(s["error"].mean()),
            **{name: summary(name, values, s["error"], run.args) for name, values in s["penalties"].items()},
        }
        for set_name, s in sets.items()
    }
    title = f"{run_dir}: {run.data.name}, --penalty {run.args.penalty}, epoch {run.checkpoint['epoch'] + 1}"
    out = tempfile.mkdtemp(prefix=".diagnostics-", dir=run_dir)  # moved into place only when all is done
    try:
        plot_fig2(sets, stats, os.path.join(out, "fig2.png"), title)
        times["fig2"] = time.perf_counter() - tick

        # Fig. 3: the data support and where the rollout samples fall in it.
        if args.fig3:
            tick = time.perf_counter()
            print(
                f"UMAP on {min(UMAP_FIT_SAMPLES, len(rows))} dataset state-actions (numba compiles for about a minute on first use)"
            )
            data_sa = np.concatenate([run.data.observations[rows], run.data.actions[rows]], 1)[:UMAP_FIT_SAMPLES]
            rollout = sets["rollout"]
            shown = rng.permutation(len(rollout["error"]))[:SUPPORT_SAMPLES]
            data_xy, support_xy = umap_embeddings(
                run, data_sa, np.concatenate([rollout["obs"], rollout["act"]], 1)[shown], args.seed
            )
            support_penalties = {name: values["penalty"][shown] for name, values in rollout["penalties"].items()}
            plot_fig3(
                data_xy,
                support_xy,
                support_penalties,
                os.path.join(out, "fig3.png"),
                title + ("\n" + notes[0] if not isinstance(run.penalty, RatioPenalty) else ""),
            )
            times["fig3"] = time.perf_counter() - tick

        # Drift: the policy in MuJoCo past the h model steps that training sees.
        drift, drift_stats = {}, None
        if args.drift_starts:
            tick = time.perf_counter()
            starts = drift_start_rows(run.data, args.drift_from, args.drift_starts, rng)
            _, qpos, qvel = true_states(
                run, run.data.observations[starts], None if stored is None else (stored[0][starts], stored[1][starts])
            )
            drift = real_drift(run, qpos, qvel, args.drift_steps)
            drift_stats = drift_summary(drift, float(run.data.rewards.mean())) | {"from": DRIFT_FROM[args.drift_from]}
            plot_drift(
                drift_stats, stats["dataset"]["error_mean"], run.args.horizon, os.path.join(out, "drift.png"), title
            )
            times["drift"] = time.perf_counter() - tick

        separated = None
        if args.separation_steps:
            tick = time.perf_counter()
            separated = rollout_separation(run, args.separation_steps, args.samples, rng)
            times["separation"] = time.perf_counter() - tick
        times["total"] = time.perf_counter() - start

        result = {
            **stats,
            "run": {
                "dir": run_dir,
                "dataset": run.data.name,
                "penalty": run.args.penalty,
                "epoch": run.checkpoint["epoch"],
                "eta": run.args.eta,
                "transform": run.args.transform,
                "clip": run.args.clip,
                "below_clip": resolve(run.args.dice).below_clip,
                "horizon": run.args.horizon,
            },
            "samples": args.samples,
            "seed": args.seed,
            "notes": notes,
            "times_s": {k: round(v, 2) for k, v in times.items()},
            **({"drift": drift_stats} if drift_stats else {}),
            **({"separation": separated} if separated else {}),
        }
        with open(os.path.join(out, "diagnostics.json"), "w") as file:
            json.dump(json_ready(result), file, indent=1, allow_nan=False)
        np.savez_compressed(
            os.path.join(out, "samples.npz"),
            **sample_arrays(sets),
            **{f"drift/{name}": values for name, values in drift.items()},
        )
        final = os.path.join(run_dir, "diagnostics")
        os.makedirs(final, exist_ok=True)
        written = [
            "fig2.png",
            *(["fig3.png"] if args.fig3 else []),
            *(["drift.png"] if drift else []),
            "diagnostics.json",
            "samples.npz",
        ]
        for name in written:
            os.replace(os.path.join(out, name), os.path.join(final, name))
        for name in {"fig3.png", "drift.png"} - set(
            written
        ):  # an earlier command's figure would pass for this checkpoint's
            if os.path.exists(os.path.join(final, name)):
                os.remove(os.path.join(final, name))
    finally:
        shutil.rmtree(out, ignore_errors=True)

    for note in notes:
        print(f"note: {note}")
    print_table(stats)
    if drift_stats:
        d = drift_stats
        print(
            f"drift: the policy in MuJoCo from {d['starts']} {d['from']} earns {d['true_reward_first_10']:.2f} a step over the first 10 steps "
            f"and {d['true_reward_all']:.2f} over {d['steps']} (the data's mean: {d['data_reward_mean']:.2f}); the ensemble says "
            f"{d['model_reward_first_10']:.2f} and {d['model_reward_all']:.2f}, with next-state error {d['error_first_10']:.3f} and "
            f"{d['error_all']:.3f} (dataset samples: {stats['dataset']['error_mean']:.3f}); {d['running_at_end']:.0%} still running at the end; "
            + "; ".join(
                f"{name.upper()}'s penalty {d[f'{name}_penalty_first_10']:.2f} then {d[f'{name}_penalty_all']:.2f}"
                for name in ("drop", "mopo")
                if f"{name}_penalty_all" in d
            )
        )
    if separated:
        print(
            f"separation, {separated['held_out']} held-out samples of each side: held-out accuracy (0.5: indistinguishable), share of rollout samples at the upper clip: "
            + "; ".join(
                f"{name} {r['accuracy']:.3f}, {r['rollout_above_clip']:.2f}"
                for name, r in separated["classifiers"].items()
            )
            + f"; actions at the bounds (|a| > {ACTION_BOUND}): rollout {separated['actions_at_bounds']['rollout']:.2f}, data {separated['actions_at_bounds']['data']:.2f}"
        )
    print("times: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items()))
    print(f"wrote {final}/{', '.join(written)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
