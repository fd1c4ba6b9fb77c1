"""Soft Actor-Critic (Haarnoja et al., 2018) with automatic entropy tuning.

drop.py trains this agent on real and model data. Run as a script, it is plain online SAC,
which this project uses to train its own behaviour policies:

    python sac.py --env Hopper-v4 --total-steps 200000
"""

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nets import EnsembleMLP

LOG_STD_MAX = 2.0


@dataclass
class SACConfig:
    """SAC hyperparameters (shared by sac.py and drop.py)."""

    hidden: int = 256
    """width of the two hidden layers of the actor and of each critic"""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor"""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics"""
    alpha_lr: float = 3e-4
    """Adam learning rate of the entropy temperature"""
    gamma: float = 0.99
    """discount factor"""
    polyak: float = 5e-3
    """target-critic update rate: target <- (1 - polyak) * target + polyak * critic"""
    batch_size: int = 256
    """transitions per SAC update"""
    log_std_min: float = -20.0
    """floor of the actor's log-std (the ceiling is 2)"""
    alpha_max: float | None = None
    """upper bound on the entropy temperature alpha (None: unbounded)"""


class Batch(NamedTuple):
    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    next_obs: torch.Tensor
    done: torch.Tensor  # 1.0 where the episode truly terminated (not a time-limit truncation)


class ReplayBuffer:
    """A circular buffer of transitions stored as tensors on the training device.

    `member` records which ensemble member produced a model transition (drop.py's classifier ratio
    trains each head on its own member's samples); it stays 0 for real data.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.capacity, self.size, self.ptr = capacity, 0, 0
        self.obs = torch.zeros(capacity, obs_dim, device=device)
        self.act = torch.zeros(capacity, act_dim, device=device)
        self.rew = torch.zeros(capacity, device=device)
        self.next_obs = torch.zeros(capacity, obs_dim, device=device)
        self.done = torch.zeros(capacity, device=device)
        self.member = torch.zeros(capacity, dtype=torch.int8, device=device)

    def add(self, obs, act, rew, next_obs, done, member: torch.Tensor | None = None):
        """Add a batch of transitions (tensors with a leading batch dimension), overwriting the oldest."""
        n = obs.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.obs.device)) % self.capacity
        member = torch.zeros(n, dtype=torch.int8, device=self.obs.device) if member is None else member
        for storage, values in zip(
            (self.obs, self.act, self.rew, self.next_obs, self.done, self.member),
            (obs, act, rew, next_obs, done, member),
        ):
            storage[idx] = values.to(storage.dtype)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int) -> Batch:
        idx = torch.randint(self.size, (n,), device=self.obs.device)
        return Batch(self.obs[idx], self.act[idx], self.rew[idx], self.next_obs[idx], self.done[idx])


class Actor(nn.Module):
    """Tanh-Gaussian policy with two ReLU hidden layers."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, log_std_min: float = -20.0):
        super().__init__()
        self.log_std_min = log_std_min
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns an action in [-1, 1] and its log-probability."""
        h = self.trunk(obs)
        mean, log_std = self.mean(h), self.log_std(h).clamp(self.log_std_min, LOG_STD_MAX)
        u = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
        # Gaussian log-density of u, then the tanh change of variables in a numerically stable form.
        log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        log_prob = log_prob - (2 * (np.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), log_prob

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        device = self.mean.weight.device
        action, _ = self(torch.as_tensor(obs, dtype=torch.float32, device=device), deterministic)
        return action.cpu().numpy()

    def npz_layers(self) -> dict[str, nn.Linear]:
        """Each layer under its suffix in the policies/*.npz format (w0/b0, w1/b1, w_mean/b_mean, w_logstd/b_logstd)."""
        return {"0": self.trunk[0], "1": self.trunk[2], "_mean": self.mean, "_logstd": self.log_std}

    @classmethod
    def from_npz_arrays(cls, arrays: dict[str, np.ndarray]) -> "Actor":
        """The inverse of to_npz_arrays: an actor from a policies/*.npz file's arrays."""
        hidden, obs_dim = arrays["w0"].shape
        actor = cls(obs_dim, arrays["w_mean"].shape[0], hidden)
        for suffix, layer in actor.npz_layers().items():
            layer.weight.data.copy_(torch.as_tensor(arrays[f"w{suffix}"]))
            layer.bias.data.copy_(torch.as_tensor(arrays[f"b{suffix}"]))
        return actor

    def to_npz_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for datasets.py's numpy collector (no torch, no pickle)."""
        arrays = {}
        for suffix, layer in self.npz_layers().items():
            arrays[f"w{suffix}"] = layer.weight.detach().cpu().numpy()
            arrays[f"b{suffix}"] = layer.bias.detach().cpu().numpy()
        return arrays


class TwinCritic(nn.Module):
    """Two Q-networks as one batched ensemble. Returns `[2, B]`."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.q = EnsembleMLP(2, obs_dim + act_dim, 1, [hidden, hidden])

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], -1).expand(2, -1, -1)
        return self.q(x).squeeze(-1)


def adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """Fused Adam where the device supports it: one kernel per step instead of one per tensor."""
    return torch.optim.Adam(params, lr=lr, fused=device.type == "cuda")


class SAC:
    def __init__(self, obs_dim: int, act_dim: int, config: SACConfig, device: torch.device):
        self.config, self.device = config, device
        self.actor = Actor(obs_dim, act_dim, config.hidden, config.log_std_min).to(device)
        self.critic = TwinCritic(obs_dim, act_dim, config.hidden).to(device)
        self.critic_target = TwinCritic(obs_dim, act_dim, config.hidden).to(device)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.target_entropy = -float(act_dim)
        self.actor_opt = adam(self.actor.parameters(), config.actor_lr, device)
        self.critic_opt = adam(self.critic.parameters(), config.critic_lr, device)
        self.alpha_opt = adam([self.log_alpha], config.alpha_lr, device)

    @torch.no_grad()
    def td_target(self, batch: Batch, alpha: torch.Tensor) -> torch.Tensor:
        """r + gamma * (1 - done) * (min of the target critics - alpha * log pi) at s' with a' ~ pi(s')."""
        next_act, next_log_prob = self.actor(batch.next_obs)
        next_q = self.critic_target(batch.next_obs, next_act).min(0).values - alpha * next_log_prob
        return batch.rew + self.config.gamma * (1.0 - batch.done) * next_q

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One gradient step on critics, actor and temperature. Returns detached losses (no host sync)."""
        alpha = self.log_alpha.exp().detach()
        target_q = self.td_target(batch, alpha)
        q = self.critic(batch.obs, batch.act)
        critic_loss = ((q - target_q) ** 2).mean(1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        # The actor step differentiates through the critic but need not compute its weight gradients
        # (a measurable share of an update on the CPU: docs/speed.md).
        self.critic.requires_grad_(False)
        act, log_prob = self.actor(batch.obs)
        actor_loss = (alpha * log_prob - self.critic(batch.obs, act).min(0).values).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        self.critic.requires_grad_(True)

        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()
        if self.config.alpha_max is not None:  # clamp the parameter itself, so that it cannot wind up beyond the cap
            with torch.no_grad():
                self.log_alpha.clamp_(max=math.log(self.config.alpha_max))

        with torch.no_grad():
            target_params, params = list(self.critic_target.parameters()), list(self.critic.parameters())
            torch._foreach_lerp_(target_params, params, self.config.polyak)
        return {
            "critic_loss": critic_loss.detach(),
            "actor_loss": actor_loss.detach(),
            "alpha": alpha,
            "entropy": -log_prob.detach().mean(),
            "q_mean": q.detach().mean(),
        }


def evaluate(actor: Actor, env, episodes: int, seed: int) -> np.ndarray:
    """Undiscounted returns of the deterministic policy, one episode per seeded reset."""
    action_scale = env.action_space.high
    returns = np.zeros(episodes)
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(actor.act(obs) * action_scale)
            returns[episode] += reward
            done = terminated or truncated
    return returns


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def start_run(run_dir: str, args, track: bool, project: str, purge_step: int | None = None):
    """TensorBoard writer in run_dir, plus wandb mirroring with --track.

    A resumed run passes purge_step, its first step: TensorBoard then hides whatever the stopped
    run logged at that step or later, so no step appears twice.
    """
    from torch.utils.tensorboard import SummaryWriter

    if track:
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: --track needs wandb: pip install wandb")
        wandb.init(project=project, name=os.path.basename(run_dir), config=asdict(args), sync_tensorboard=True)
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    if purge_step is None:
        writer.add_text("args", "\n".join(f"{k}: {v}" for k, v in asdict(args).items()))
    return writer


def write_replay(path: str, buffer: ReplayBuffer, truncations: np.ndarray, args, step: int):
    """The replay buffer in step order as a D4RL-format file; the last row, cut by the stop, counts as truncated."""
    from datasets import write_hdf5_atomically

    order = (
        (buffer.ptr + np.arange(buffer.size)) % buffer.capacity
        if buffer.size == buffer.capacity
        else np.arange(buffer.size)
    )
    arrays = {
        key: getattr(buffer, name)[order].cpu().numpy()
        for key, name in (
            ("observations", "obs"),
            ("actions", "act"),
            ("rewards", "rew"),
            ("next_observations", "next_obs"),
        )
    }
    arrays["terminals"] = buffer.done[order].cpu().numpy() > 0
    arrays["timeouts"] = truncations[order].copy()
    arrays["timeouts"][-1] |= not arrays["terminals"][-1]
    attrs = {
        "env_id": args.env,
        "seed": args.seed,
        "num_transitions": buffer.size,
        "source": "sac.py replay buffer",
        "sac_step": step,
    }
    write_hdf5_atomically(Path(path), arrays, attrs)


@dataclass
class Args:
    env: str = "Hopper-v4"
    """Gymnasium environment id (continuous actions)"""
    seed: int = 1
    """seed of the environment, the network initialisation and the sampling"""
    total_steps: int = 200_000
    """environment steps"""
    learning_starts: int = 5_000
    """uniform-random steps before learning starts"""
    buffer_size: int = 1_000_000
    """replay buffer capacity"""
    eval_every: int = 5_000
    """evaluate (and save an actor snapshot) every this many steps"""
    eval_episodes: int = 5
    """deterministic episodes per evaluation"""
    device: str = "auto"
    """torch device: auto, cpu or cuda"""
    track: bool = False
    """mirror the TensorBoard logs to Weights & Biases"""
    run_name: str | None = None
    """name of runs/{run_name}; default: sac__{env}__{seed}__{time}"""
    save_replay: bool = True
    """write the replay buffer so far to runs/{run_name}/replay.hdf5 (D4RL format) at every evaluation: the raw material of a medium-replay dataset"""
    sac: SACConfig = field(default_factory=SACConfig)
    """SAC hyperparameters"""


def main(args: Args):
    import gymnasium as gym
    from tqdm import trange

    from datasets import DatasetError, make_gym_env

    try:
        env, eval_env = make_gym_env(args.env), make_gym_env(args.env)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    if not isinstance(env.action_space, gym.spaces.Box) or not np.allclose(
        env.action_space.low, -env.action_space.high
    ):
        raise SystemExit(f"error: {args.env} needs a symmetric continuous (Box) action space for sac.py")
    seed_everything(args.seed)
    device = pick_device(args.device)
    run_name = args.run_name or f"sac__{args.env}__{args.seed}__{int(time.time())}"
    writer = start_run(os.path.join("runs", run_name), args, args.track, "drop-sac")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    action_scale = env.action_space.high
    agent = SAC(obs_dim, act_dim, args.sac, device)
    buffer = ReplayBuffer(min(args.buffer_size, args.total_steps), obs_dim, act_dim, device)
    truncations = np.zeros(
        buffer.capacity, dtype=bool
    )  # the buffer keeps terminations only; a D4RL file needs time limits too
    env.action_space.seed(args.seed)

    as_row = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float32)[None], device=device)  # a batch of one
    obs, _ = env.reset(seed=args.seed)
    episode_return = 0.0
    progress = trange(1, args.total_steps + 1, desc=f"sac {args.env}", unit="step")
    for step in progress:
        if step <= args.learning_starts:
            act = env.action_space.sample() / action_scale
        else:
            act = agent.actor.act(obs, deterministic=False)
        next_obs, reward, terminated, truncated, _ = env.step(act * action_scale)
        episode_return += reward
        truncations[buffer.ptr] = truncated and not terminated
        buffer.add(as_row(obs), as_row(act), as_row(reward), as_row(next_obs), as_row(float(terminated)))
        obs = next_obs
        if terminated or truncated:
            writer.add_scalar("charts/episode_return", episode_return, step)
            obs, _ = env.reset()
            episode_return = 0.0

        if step > args.learning_starts:
            losses = agent.update(buffer.sample(args.sac.batch_size))
            if step % 1000 == 0:
                for key, value in losses.items():
                    writer.add_scalar(f"losses/{key}", value.item(), step)
        if step % args.eval_every == 0 or step == args.total_steps:
            returns = evaluate(agent.actor, eval_env, args.eval_episodes, seed=10_000 + step)
            writer.add_scalar("eval/return", returns.mean(), step)
            np.savez(os.path.join("runs", run_name, f"actor_step{step}.npz"), **agent.actor.to_npz_arrays())
            if args.save_replay:
                write_replay(os.path.join("runs", run_name, "replay.hdf5"), buffer, truncations, args, step)
            progress.set_postfix(eval_return=f"{returns.mean():.0f}")
    np.savez(os.path.join("runs", run_name, "actor.npz"), **agent.actor.to_npz_arrays())
    writer.close()
    print(f"final eval return: {returns.mean():.1f} ± {returns.std():.1f}; actors saved in runs/{run_name}")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
