"""The reward penalties of a model rollout: DROP's density ratio (GradientDICE or a classifier), MOPO's, or none.

Every penalty has the same small surface, so drop.py's loop never asks which one it holds:

    penalty.train(steps)                 fit it to the current policy; returns statistics to log
    penalty(obs, act, groups)            (the penalty eta multiplies, tau or None) for each sample
    penalty.largest()                    the largest |penalty| it can give (the critic's return bound)
    penalty.state_dict() / load_state_dict(state)    what a checkpoint keeps

A new penalty is one class here, one line in PENALTIES, and its tests.
"""

import math

import torch

from checkpoint import load_optimizer_state
from classifier import RatioClassifier, train_classifier
from dice import GradientDICE, build_dice, dice_optimizer, penalty, resolve, train_dice, transformed
from dynamics import MemberGroups, ProbabilisticEnsemble
from sac import ReplayBuffer, adam


class NoPenalty:
    """MBPO: model rewards as the model predicts them."""

    reads: tuple[str, ...] = ()
    """the ratio settings it reads (Args field names, `dice.*` patterns): drop.py refuses any other given"""

    def __init__(
        self,
        args,
        dynamics: ProbabilisticEnsemble,
        data_obs: torch.Tensor,
        data_act: torch.Tensor,
        model_buffer: ReplayBuffer,
        policy,
    ):
        self.dynamics = dynamics

    @staticmethod
    def refuse(args) -> str | None:
        """Why these settings cannot run with this penalty, or None."""
        return (
            None
            if args.ratio == "dice"
            else f"--ratio {args.ratio} is DROP's ratio estimator; --penalty {args.penalty} has no ratio (drop --ratio, or use --penalty drop)"
        )

    def train(self, steps: int) -> dict[str, float]:
        return {}

    def __call__(
        self, obs: torch.Tensor, act: torch.Tensor, groups: MemberGroups
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.zeros(len(obs), device=obs.device), None

    def largest(self) -> float:
        return 0.0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class MopoPenalty(NoPenalty):
    """MOPO: the largest Frobenius norm of the predicted std over every member (MOPO's fake_env.py), or over the elites."""

    def __init__(self, args, dynamics, data_obs, data_act, model_buffer, policy):
        super().__init__(args, dynamics, data_obs, data_act, model_buffer, policy)
        self.members = dynamics.elites if args.mopo_members == "elites" else None

    def __call__(self, obs, act, groups):
        return self.dynamics.mopo_penalty(obs, act, self.members), None

    def largest(self) -> float:
        return self.dynamics.mopo_penalty_ceiling()


class RatioPenalty(NoPenalty):
    """DROP: eta multiplies transform(clip(tau)), tau read from the head of the elite that produced the sample."""

    reads = ("dice_steps", "transform", "clip", "no_clip", "dice.preset", "dice.below_clip")

    net: GradientDICE | RatioClassifier
    optimizer: torch.optim.Optimizer

    def __init__(self, args, dynamics, data_obs, data_act, model_buffer, policy):
        super().__init__(args, dynamics, data_obs, data_act, model_buffer, policy)
        self.transform, self.clip, self.below_clip = args.transform, args.clip, resolve(args.dice).below_clip
        self.data_obs, self.data_act = data_obs, data_act
        # Fixed dataset (s, a) for tau's health check; its own generator, so a resumed run draws the same ones.
        self.health_idx = torch.randperm(len(data_obs), generator=torch.Generator().manual_seed(args.seed))[:10_000].to(
            data_obs.device
        )

    @staticmethod
    def refuse(args) -> str | None:
        if args.transform == "log" and (args.clip is None or args.clip[0] <= 0):
            return (
                "the log transform needs a clip with a positive lower bound: pass --clip 0.01 10 or another --transform"
            )
        return None

    def fit(self, steps: int) -> torch.Tensor:
        """`steps` of training; each head's objective."""
        raise NotImplementedError

    def train(self, steps: int) -> dict[str, float]:
        objective = self.fit(steps)
        # E_D[tau] is 1 for a policy the data covers, else the share of its occupancy the data covers; below 0 is a failed estimate.
        with torch.no_grad():
            tau_data = self.net.ratio(self.data_obs[self.health_idx], self.data_act[self.health_idx]).mean()
        return {"objective": objective.mean().item(), "tau_data_mean": tau_data.item()}

    def __call__(self, obs, act, groups):
        # Head g belongs to elite g, so the grouped layout pairs each sample with its member's head.
        tau = groups.gather(self.net.ratio(groups.scatter(obs), groups.scatter(act)))
        return penalty(tau, self.transform, self.clip, self.below_clip), tau

    def largest(self) -> float:
        # Each transform is monotone, so the clip's ends (or 0 and infinity) bound it; below_clip's fills lie within.
        ends = torch.tensor(self.clip if self.clip is not None else (0.0, math.inf))
        return transformed(ends, self.transform).abs().max().item()

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict):
        self.net.load_state_dict(state["net"])
        load_optimizer_state(self.optimizer, state["optimizer"])


class DiceRatio(RatioPenalty):
    """The paper's estimator: GradientDICE, one head per elite, trained at dataset (s, a) with s' from that elite."""

    reads = (*RatioPenalty.reads, "dice_lr", "dice_lambda", "dice.*")

    def __init__(self, args, dynamics, data_obs, data_act, model_buffer, policy):
        super().__init__(args, dynamics, data_obs, data_act, model_buffer, policy)
        self.config = resolve(args.dice)
        self.net = build_dice(
            self.config,
            data_obs.shape[1],
            data_act.shape[1],
            len(dynamics.elites),
            dynamics.input_mean,
            dynamics.input_std,
        ).to(data_obs.device)
        self.optimizer = dice_optimizer(self.net, args.dice_lr, self.config)
        self.policy, self.lam = policy, args.dice_lambda
        self.next_obs = None

    def fit(self, steps: int) -> torch.Tensor:
        # The dynamics are frozen, so each elite's mean next state for every dataset (s, a) is computed once,
        # at the first training (a run rebuilt only to read its penalty, as diagnostics.py does, never pays for it).
        if self.next_obs is None:
            self.next_obs = self.dynamics.elite_mean_next_obs(self.data_obs, self.data_act)
        obs, act = self.data_obs, self.data_act  # the start states s0 are the data's states too
        return train_dice(
            self.net, self.optimizer, obs, act, self.next_obs, obs, self.policy, steps, self.config, self.lam
        )


class ClassifierRatio(RatioPenalty):
    """Ours (--ratio classifier): a logistic classifier of model-buffer against dataset samples, one head per elite."""

    reads = (*RatioPenalty.reads, "classifier.*")

    def __init__(self, args, dynamics, data_obs, data_act, model_buffer, policy):
        super().__init__(args, dynamics, data_obs, data_act, model_buffer, policy)
        obs_dim, act_dim, heads = data_obs.shape[1], data_act.shape[1], len(dynamics.elites)
        hidden, mean, std = args.classifier.hidden, dynamics.input_mean, dynamics.input_std
        self.net = RatioClassifier(obs_dim, act_dim, heads, hidden, mean, std).to(data_obs.device)
        self.optimizer = adam(self.net.parameters(), args.classifier.lr, data_obs.device)
        self.model_buffer, self.batch_size = model_buffer, args.classifier.batch_size

    @staticmethod
    def refuse(args) -> str | None:
        if args.dice_steps < 1 or args.classifier.batch_size < 1:
            return f"--ratio classifier needs --dice-steps and --classifier.batch-size of at least 1 (got {args.dice_steps}, {args.classifier.batch_size})"
        return RatioPenalty.refuse(args)

    def fit(self, steps: int) -> torch.Tensor:
        """The positives are what SAC trains on: the model buffer. Before the first rollout it has none, and the ratio stays 1."""
        buffer, size = self.model_buffer, self.model_buffer.size
        if size == 0:  # the logistic loss at logit 0
            return torch.full((self.net.num_heads,), math.log(2.0), device=self.data_obs.device)
        positives = buffer.obs[:size], buffer.act[:size], buffer.member[:size]
        net, negatives = self.net, (self.data_obs, self.data_act)
        return train_classifier(net, self.optimizer, *positives, *negatives, steps, self.batch_size)


PENALTIES = {"drop": DiceRatio, "drop-classifier": ClassifierRatio, "mopo": MopoPenalty, "none": NoPenalty}


def penalty_class(args) -> type[NoPenalty]:
    """The class of --penalty (and of --ratio, for drop)."""
    return PENALTIES[f"drop-{args.ratio}" if args.penalty == "drop" and args.ratio != "dice" else args.penalty]


def build_penalty(
    args, dynamics: ProbabilisticEnsemble, data_obs, data_act, model_buffer: ReplayBuffer, policy
) -> NoPenalty:
    """The run's penalty; `policy` maps states to sampled actions of the current policy."""
    return penalty_class(args)(args, dynamics, data_obs, data_act, model_buffer, policy)
