"""GradientDICE (Zhang et al., 2020): the density ratio DROP penalises model rewards with.

For a policy pi and a dynamics model T, tau(s, a) estimates rho_pi(s, a) / d_D(s, a): the
discounted occupancy of pi in T over the offline data distribution. GradientDICE finds it as the
saddle point of

    L(tau, f, nu) = (1-g) E_{s0~mu0, a0~pi}[f(s0,a0)] + g E_{(s,a)~D, s'~T, a'~pi}[tau(s,a) f(s',a')]
                    - E_D[tau(s,a) f(s,a) + f(s,a)^2 / 2] + lam (E_D[nu tau(s,a) - nu] - nu^2 / 2),

minimised over tau and maximised over f and nu. DROP keeps one head (tau, f, nu) per elite
dynamics member, because the ratio depends on the model that generates the rollouts.
"""

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn

from nets import EnsembleMLP

Transform = Literal["log", "tanh-shift", "tanh-offset"]


@dataclass
class DiceConfig:
    """GradientDICE settings that do not vary per dataset (those live in drop.py's table)."""

    hidden: int = 64
    """width of the two ReLU hidden layers of the tau and f nets"""
    gamma: float = 0.99
    """discount of the occupancy being estimated"""
    batch_size: int = 256
    """samples per GradientDICE step"""
    pretrain_steps: int = 100
    """steps under the initial policy before the first epoch"""


class GradientDICE(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, num_heads: int, hidden: int, input_mean: torch.Tensor, input_std: torch.Tensor):
        super().__init__()
        self.num_heads = num_heads
        self.tau = EnsembleMLP(num_heads, obs_dim + act_dim, 1, [hidden, hidden])
        self.f = EnsembleMLP(num_heads, obs_dim + act_dim, 1, [hidden, hidden])
        self.nu = nn.Parameter(torch.zeros(num_heads, 1))
        # Every head starts at tau = 1, the ratio of a policy that matches the data, so the first
        # penalties are log(1) = 0 rather than a bonus of eta * log(1 / s1) from tau ~ 0.
        nn.init.zeros_(self.tau.output.weight)
        nn.init.ones_(self.tau.output.bias)
        self.register_buffer("input_mean", input_mean.clone())
        self.register_buffer("input_std", input_std.clone())

    def _inputs(self, obs, act, num_heads: int) -> torch.Tensor:
        x = (torch.cat([obs, act], -1) - self.input_mean) / self.input_std
        return x.expand(num_heads, -1, -1) if x.dim() == 2 else x

    def ratio(self, obs: torch.Tensor, act: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """tau(s, a) as `[H, B]`. `[B, .]` inputs go to every head; `[H', B, .]` pair up with `heads`."""
        num = self.num_heads if heads is None else len(heads)
        return self.tau(self._inputs(obs, act, num), heads).squeeze(-1)

    def objective(self, obs, act, next_obs, next_act, init_obs, init_act, gamma: float, lam: float) -> torch.Tensor:
        """L(tau, f, nu) of each head, `[H]`. (s, a) and (s0, a0) are `[B, .]`; (s', a') are `[H, B, .]`."""
        x, x_next, x_init = (self._inputs(s, a, self.num_heads) for s, a in ((obs, act), (next_obs, next_act), (init_obs, init_act)))
        tau = self.tau(x).squeeze(-1)
        # One f pass over all three sample sets: fewer, larger matmuls.
        f, f_next, f_init = self.f(torch.cat([x, x_next, x_init], 1)).squeeze(-1).split([x.shape[1], x_next.shape[1], x_init.shape[1]], 1)
        nu = self.nu
        return (
            (1 - gamma) * f_init.mean(1)
            + gamma * (tau * f_next).mean(1)
            - (tau * f + 0.5 * f**2).mean(1)
            + lam * ((nu * tau - nu).mean(1) - 0.5 * nu[:, 0] ** 2)
        )


def train_dice(
    dice: GradientDICE,
    optimizer: torch.optim.Optimizer,
    obs: torch.Tensor,
    act: torch.Tensor,
    next_obs: torch.Tensor,
    init_obs: torch.Tensor,
    policy: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
    config: DiceConfig,
    lam: float,
) -> torch.Tensor:
    """Run `steps` of simultaneous gradient descent (tau) / ascent (f, nu). Returns the mean objective per head.

    obs, act: the offline data `[N, .]`; next_obs: each head's predicted next state for it `[H, N, obs]`
    (cached, since the dynamics are frozen); init_obs: samples of the start-state distribution;
    policy: maps states to sampled actions.
    """
    total = torch.zeros(dice.num_heads, device=obs.device)
    for _ in range(steps):
        idx = torch.randint(len(obs), (config.batch_size,), device=obs.device)
        s_next = next_obs[:, idx]
        s0 = init_obs[torch.randint(len(init_obs), (config.batch_size,), device=obs.device)]
        with torch.no_grad():  # one policy pass for a' and a0
            a_next, a0 = policy(torch.cat([s_next.flatten(0, 1), s0])).split([s_next.shape[0] * s_next.shape[1], len(s0)])
            a_next = a_next.view(*s_next.shape[:2], -1)
        objective = dice.objective(obs[idx], act[idx], s_next, a_next, s0, a0, config.gamma, lam)
        optimizer.zero_grad(set_to_none=True)
        objective.sum().backward()
        # One backward pass serves both players: f and nu ascend, so flip their gradients.
        for p in [*dice.f.parameters(), dice.nu]:
            p.grad.neg_()
        optimizer.step()
        total += objective.detach()
    return total / max(steps, 1)


def penalty(tau: torch.Tensor, transform: Transform, clip: tuple[float, float] | None) -> torch.Tensor:
    """The quantity eta multiplies: log(clip(tau)), tanh(tau - 1) or tanh(tau) - tanh(1)."""
    if clip is not None:
        tau = tau.clamp(*clip)
    if transform == "log":
        return torch.log(tau)
    if transform == "tanh-shift":
        return torch.tanh(tau - 1)
    if transform == "tanh-offset":
        return torch.tanh(tau) - math.tanh(1.0)
    raise ValueError(f"unknown penalty transform {transform!r}: use log, tanh-shift or tanh-offset")
