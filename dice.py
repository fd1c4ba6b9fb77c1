"""GradientDICE (Zhang et al., 2020): the density ratio DROP penalises model rewards with.

For a policy pi and a dynamics model T, tau(s, a) estimates rho_pi(s, a) / d_D(s, a): the
discounted occupancy of pi in T over the offline data distribution. GradientDICE finds it as the
saddle point of

    L(tau, f, nu) = (1-g) E_{s0~mu0, a0~pi}[f(s0,a0)] + g E_{(s,a)~D, s'~T, a'~pi}[tau(s,a) f(s',a')]
                    - E_D[tau(s,a) f(s,a) + f(s,a)^2 / 2] + lam (E_D[nu tau(s,a) - nu] - nu^2 / 2),

minimised over tau and maximised over f and nu. DROP keeps one head (tau, f, nu) per elite
dynamics member, because the ratio depends on the model that generates the rollouts.

Run as a script, it estimates the ratio of one fixed policy, trained exactly as drop.py trains
it, and reports E_D[tau] (1 for any policy whose occupancy the data covers; the covered share
of it otherwise), E_D|tau - 1| and the fraction of tau below the clip, and their course:

    python dice.py --dynamics-path ENSEMBLE.pt --policy policies/hopper-medium.npz --steps 8000 --json out.json
"""

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn

from nets import EnsembleMLP
from tasks import Transform

Output = Literal["linear", "softplus", "exp"]
BelowClip = Literal["clip", "zero", "max"]


@dataclass
class DiceConfig:
    """GradientDICE settings that do not vary per dataset (those live in drop.py's table).

    The fields left at None take their value from `preset`: `authors` is the published method,
    `checked` the variant that passes the known-answer checks in MuJoCo (see the README).
    """

    hidden: int = 64
    """width of the two ReLU hidden layers of the tau and f nets"""
    gamma: float = 0.99
    """discount of the occupancy being estimated"""
    batch_size: int = 256
    """samples per GradientDICE step"""
    pretrain_steps: int = 100
    """steps under the initial policy before the first epoch"""
    preset: Literal["authors", "checked"] = "authors"
    """where the fields below that are left unset come from: the authors' settings or the checked variant"""
    optimizer: Literal["adam", "sgd"] | None = None
    """optimiser of tau, f and nu (preset: adam)"""
    nu_lr: float | None = None
    """learning rate of the scalar nu of each head, if not the DICE lr (preset authors: the DICE lr)"""
    f_lr: float | None = None
    """learning rate of the f nets (the maximising player), if not the DICE lr (preset authors: the DICE lr)"""
    output: Output | None = None
    """tau's output layer: linear (can go negative), softplus or exp (preset authors: linear)"""
    normalize_inputs: bool | None = None
    """standardise (s, a) with the dynamics model's input statistics (preset authors: no, raw inputs as in their code)"""
    below_clip: BelowClip | None = None
    """penalty where tau is at or below the clip's lower bound: clip (the transform of the bound, a bonus), zero, or max (the transform of the upper bound) (preset authors: clip)"""


# fmt: off
PRESETS = {
    "authors": dict(optimizer="adam", nu_lr=None, f_lr=None, lam=None, output="linear", normalize_inputs=False, below_clip="clip"),
    "checked": dict(optimizer="adam", nu_lr=1e-2, f_lr=None, lam=1.0, output="linear", normalize_inputs=True, below_clip="max"),
}
# fmt: on


def resolve(config: DiceConfig) -> DiceConfig:
    """`config` with every unset variant field filled from its preset."""
    preset = PRESETS[config.preset]
    return replace(
        config, **{name: value for name, value in preset.items() if name != "lam" and getattr(config, name) is None}
    )


def preset_lambda(config: DiceConfig) -> float | None:
    """The weight of the normalisation constraint the preset sets (checked: 1.0), or None for the per-dataset table's."""
    return PRESETS[config.preset]["lam"]


class GradientDICE(nn.Module):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        num_heads: int,
        hidden: int,
        input_mean: torch.Tensor,
        input_std: torch.Tensor,
        output: Output = "linear",
    ):
        super().__init__()
        self.num_heads, self.output = num_heads, output
        self.tau = EnsembleMLP(num_heads, obs_dim + act_dim, 1, [hidden, hidden])
        self.f = EnsembleMLP(num_heads, obs_dim + act_dim, 1, [hidden, hidden])
        self.nu = nn.Parameter(torch.zeros(num_heads, 1))
        # Every head starts at tau = 1, the ratio of a policy that matches the data, so the first
        # penalties are log(1) = 0 rather than a bonus of eta * log(1 / s1) from tau ~ 0.
        nn.init.zeros_(self.tau.output.weight)
        nn.init.constant_(self.tau.output.bias, {"linear": 1.0, "softplus": math.log(math.e - 1), "exp": 0.0}[output])
        self.register_buffer("input_mean", input_mean.clone())
        self.register_buffer("input_std", input_std.clone())

    def _inputs(self, obs, act, num_heads: int) -> torch.Tensor:
        x = (torch.cat([obs, act], -1) - self.input_mean) / self.input_std
        return x.expand(num_heads, -1, -1) if x.dim() == 2 else x

    def _tau(self, x: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        out = self.tau(x, heads).squeeze(-1)
        if self.output == "softplus":
            return nn.functional.softplus(out)
        return out.exp() if self.output == "exp" else out

    def ratio(self, obs: torch.Tensor, act: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """tau(s, a) as `[H, B]`. `[B, .]` inputs go to every head; `[H', B, .]` pair up with `heads`."""
        num = self.num_heads if heads is None else len(heads)
        return self._tau(self._inputs(obs, act, num), heads)

    def objective(self, obs, act, next_obs, next_act, init_obs, init_act, gamma: float, lam: float) -> torch.Tensor:
        """L(tau, f, nu) of each head, `[H]`. (s, a) and (s0, a0) are `[B, .]`; (s', a') are `[H, B, .]`."""
        x, x_next, x_init = (
            self._inputs(s, a, self.num_heads) for s, a in ((obs, act), (next_obs, next_act), (init_obs, init_act))
        )
        tau = self._tau(x)
        # One f pass over all three sample sets: fewer, larger matmuls.
        f, f_next, f_init = (
            self.f(torch.cat([x, x_next, x_init], 1))
            .squeeze(-1)
            .split([x.shape[1], x_next.shape[1], x_init.shape[1]], 1)
        )
        nu = self.nu
        return (
            (1 - gamma) * f_init.mean(1)
            + gamma * (tau * f_next).mean(1)
            - (tau * f + 0.5 * f**2).mean(1)
            + lam * ((nu * tau - nu).mean(1) - 0.5 * nu[:, 0] ** 2)
        )


def build_dice(
    config: DiceConfig, obs_dim: int, act_dim: int, num_heads: int, input_mean: torch.Tensor, input_std: torch.Tensor
) -> GradientDICE:
    """The heads drop.py trains for a resolved `config`; without input normalisation, (s, a) pass through as they are."""
    if not config.normalize_inputs:
        input_mean, input_std = torch.zeros_like(input_mean), torch.ones_like(input_std)
    return GradientDICE(obs_dim, act_dim, num_heads, config.hidden, input_mean, input_std, config.output)


def dice_optimizer(dice: GradientDICE, lr: float, config: DiceConfig) -> torch.optim.Optimizer:
    """Adam or SGD over all heads; f and nu (one scalar per head) may get their own, larger learning rates."""
    groups = [
        {"params": list(dice.tau.parameters())},
        {"params": list(dice.f.parameters()), "lr": config.f_lr or lr},
        {"params": [dice.nu], "lr": config.nu_lr or lr},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    return torch.optim.Adam(groups, lr=lr, fused=dice.nu.device.type == "cuda")


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
            a_next, a0 = policy(torch.cat([s_next.flatten(0, 1), s0])).split(
                [s_next.shape[0] * s_next.shape[1], len(s0)]
            )
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


def transformed(tau: torch.Tensor, transform: Transform) -> torch.Tensor:
    if transform == "log":
        return torch.log(tau)
    if transform == "tanh-shift":
        return torch.tanh(tau - 1)
    if transform == "tanh-offset":
        return torch.tanh(tau) - math.tanh(1.0)
    raise ValueError(f"unknown penalty transform {transform!r}: use log, tanh-shift or tanh-offset")


def penalty(
    tau: torch.Tensor, transform: Transform, clip: tuple[float, float] | None, below_clip: BelowClip = "clip"
) -> torch.Tensor:
    """The quantity eta multiplies: log(clip(tau)), tanh(tau - 1) or tanh(tau) - tanh(1).

    `below_clip` decides what an estimate at or below the clip's lower bound gets: the transform
    of the bound (the authors': the largest bonus), zero, or the largest penalty.
    """
    if clip is None:
        return transformed(tau, transform)
    value = transformed(tau.clamp(*clip), transform)
    if below_clip == "clip":
        return value
    untrusted = tau <= clip[0]
    fill = 0.0 if below_clip == "zero" else transformed(torch.tensor(clip[1]), transform).item()
    return value.masked_fill(untrusted, fill)


# ---------------------------------------------------------------------------------------------
# Known-answer check: the ratio of one fixed policy, trained exactly as drop.py trains it.


@dataclass
class Args:
    dynamics_path: str
    """the trained ensemble whose elites generate s' (dynamics.py's, or the one a drop.py run used: its checkpoint's dynamics_path)"""
    policy: str
    """the fixed policy: a .npz in the policies/ format (sampled stochastically) or `uniform` (uniform random actions)"""
    env: str = "builtin-hopper-medium"
    """dataset name; with --dataset it only fixes the robot and the per-dataset DICE defaults"""
    dataset: str | None = None
    """a D4RL-format HDF5 file to estimate the ratio on"""
    steps: int = 8000
    """GradientDICE steps"""
    eval_every: int = 400
    """measure tau on the dataset every this many steps (drop.py's epoch is 400 steps on most datasets)"""
    segments: int = 1
    """also report mean tau over each of this many equal consecutive parts of the file's rows"""
    lr: float | None = None
    """DICE learning rate (default: the per-dataset table)"""
    dice_lambda: float | None = None
    """weight of GradientDICE's normalisation constraint (default: the preset's, else the per-dataset table)"""
    seed: int = 0
    """seed of the heads' initialisation and of the sampling"""
    device: str = "auto"
    """torch device: auto, cpu or cuda"""
    json: str | None = None
    """write the final statistics and their course over the steps to this JSON file"""
    plot: str | None = None
    """draw the course of the statistics into this PNG"""
    dice: DiceConfig = field(default_factory=DiceConfig)
    """GradientDICE settings (--dice.preset authors|checked, and each variant field)"""


def uniform_policy(act_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda obs: torch.rand(len(obs), act_dim, device=obs.device) * 2 - 1


@torch.no_grad()
def ratio_statistics(
    dice: GradientDICE,
    obs: torch.Tensor,
    act: torch.Tensor,
    clip: tuple[float, float] | None,
    segments: int,
    chunk: int = 65536,
) -> dict:
    """E_D[tau], E_D|tau - 1|, the fraction at or below the clip's lower bound (all heads pooled), and per-segment means."""
    tau = torch.cat([dice.ratio(obs[i : i + chunk], act[i : i + chunk]) for i in range(0, len(obs), chunk)], 1)
    lower = clip[0] if clip is not None else 0.0
    stats = {
        "mean_tau": tau.mean().item(),
        "mean_abs_tau_minus_1": (tau - 1).abs().mean().item(),
        "below_clip": (tau <= lower).float().mean().item(),
    }
    if segments > 1:
        stats["mean_tau_by_segment"] = [part.mean().item() for part in tau.tensor_split(segments, dim=1)]
    return stats


def plot_course(course: list[dict], path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in course]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    if "mean_tau_by_segment" in course[0]:
        for k in range(len(course[0]["mean_tau_by_segment"])):
            left.plot(steps, [c["mean_tau_by_segment"][k] for c in course], label=f"mean tau, part {k + 1}")
    left.plot(steps, [c["mean_tau"] for c in course], "k", label="E_D[tau]")
    left.plot(steps, [c["mean_abs_tau_minus_1"] for c in course], "k:", label="E_D|tau - 1|")
    left.axhline(1.0, color="grey", lw=0.5)
    left.set_xlabel("GradientDICE step")
    left.legend(fontsize=8)
    right.plot(steps, [c["below_clip"] for c in course], "r")
    right.set_xlabel("GradientDICE step")
    right.set_ylabel("fraction of tau at or below the clip")
    right.set_ylim(0, 1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=80)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def main(args: Args):
    import json

    from tqdm import trange

    from datasets import DatasetError, TanhGaussianPolicy, load_dataset
    from dynamics import load_ensemble
    from sac import Actor, pick_device, seed_everything
    from tasks import task_defaults

    try:
        data = load_dataset(args.env, args.dataset)
        policy_file = None if args.policy == "uniform" else TanhGaussianPolicy.load(Path(args.policy))
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    if policy_file is not None and (policy_file.obs_dim, policy_file.act_dim) != (data.obs_dim, data.act_dim):
        raise SystemExit(
            f"error: {args.policy} is a policy for obs {policy_file.obs_dim} / act {policy_file.act_dim}, but {data.name} has obs {data.obs_dim} / act {data.act_dim}"
        )
    if args.steps < 1 or args.eval_every < 1 or args.segments < 1:
        raise SystemExit("error: --steps, --eval-every and --segments must be at least 1")
    seed_everything(args.seed)
    device = pick_device(args.device)
    config = resolve(args.dice)
    hp = task_defaults(data.task)
    lam = next(value for value in (args.dice_lambda, preset_lambda(config), hp.dice_lambda) if value is not None)
    hp = replace(hp, dice_lr=args.lr or hp.dice_lr, dice_lambda=lam)
    dynamics = load_ensemble(
        args.dynamics_path, data.family, data.obs_dim, data.act_dim, device, data.transitions_sha256()
    )
    if policy_file is None:
        sample_action = uniform_policy(data.act_dim)
    else:
        actor = Actor.from_npz_arrays(policy_file.params).to(device)
        sample_action = lambda obs: actor(obs)[0]
    as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)
    obs, act = as_tensor(data.observations), as_tensor(data.actions)

    dice = build_dice(
        config, data.obs_dim, data.act_dim, len(dynamics.elites), dynamics.input_mean, dynamics.input_std
    ).to(device)
    optimizer = dice_optimizer(dice, hp.dice_lr, config)
    next_obs = dynamics.elite_mean_next_obs(obs, act)
    course = []
    progress = trange(0, args.steps, args.eval_every, desc=f"GradientDICE on {data.name}", unit="block")
    for start in progress:
        train_dice(
            dice,
            optimizer,
            obs,
            act,
            next_obs,
            obs,
            sample_action,
            min(args.eval_every, args.steps - start),
            config,
            hp.dice_lambda,
        )
        course.append(
            {
                "step": min(start + args.eval_every, args.steps),
                **ratio_statistics(dice, obs, act, hp.clip, args.segments),
            }
        )
        progress.set_postfix(tau=f"{course[-1]['mean_tau']:.2f}", below=f"{course[-1]['below_clip']:.2f}")
    result = {
        **{k: v for k, v in course[-1].items() if k != "step"},
        "steps": args.steps,
        "policy": args.policy,
        "dataset": data.path,
        "lr": hp.dice_lr,
        "lam": hp.dice_lambda,
        "clip": hp.clip,
        "dice": asdict(config),
        "course": course,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("course", "dice")}))
    if args.json:
        with open(args.json + ".tmp", "w") as file:
            json.dump(result, file, indent=1)
        os.replace(args.json + ".tmp", args.json)
    if args.plot:
        plot_course(course, args.plot, f"{data.name}, policy {os.path.basename(args.policy)}, preset {config.preset}")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
