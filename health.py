"""Is the run healthy? SAC's critic against the largest return the rewards allow, rollout states against
the data's, and every logged number finite. Each report of a run states what CriticHealth keeps."""

import math
import os
from dataclasses import dataclass

import torch


def return_bound(data_rewards: torch.Tensor, largest_penalty: float, eta: float, gamma: float) -> float:
    """(max|r| of the data + |eta| x the largest penalty) / (1 - gamma): the largest |return| penalised rewards allow.

    It is taken from the data, not the model buffer: a model that invents rewards far beyond the
    data's would otherwise raise the bound that should catch it.
    """
    return (data_rewards.abs().max().item() + abs(eta) * largest_penalty) / (1 - gamma)


# The critic over-estimates when |mean Q| stays above the return bound itself for DIVERGING_EPOCHS epochs in
# a row (no return the rewards allow reaches it), and diverges when it stays above Q_BOUND_FACTOR x the bound.
Q_BOUND_FACTOR, DIVERGING_EPOCHS = 3.0, 3
# Model rollouts count as far off the data when their largest |s| exceeds this many times the data's.
FAR_STATE_FACTOR = 5.0


@dataclass
class CriticHealth:
    """What every report of a run states: SAC's largest epoch-mean critic loss and alpha, whether Q over-estimated or diverged, and how far the rollouts went."""

    max_critic_loss: float = 0.0
    max_alpha: float = 0.0
    above_bound_since: int | None = None
    """first epoch (0-based) of the current stretch with |mean Q| above the reward bound"""
    overestimating_since: int | None = None
    """above_bound_since of the first such stretch that lasted DIVERGING_EPOCHS epochs"""
    over_bound_since: int | None = None
    """first epoch (0-based) of the current stretch with |mean Q| above Q_BOUND_FACTOR x the reward bound"""
    diverging_since: int | None = None
    """over_bound_since of the first stretch that lasted DIVERGING_EPOCHS epochs"""
    max_state_abs: float = 0.0
    """the largest |s| of any model rollout state"""
    far_states_since: int | None = None
    """the first epoch whose rollout states went beyond FAR_STATE_FACTOR x the data's largest |s|"""

    def _stretch_lasted(self, epoch: int, beyond: bool, current: str, first: str) -> bool:
        """Count the stretch of epochs `beyond` a limit in field `current`; True (once, recorded in `first`) when one first lasts DIVERGING_EPOCHS."""
        if not beyond:
            setattr(self, current, None)
            return False
        if getattr(self, current) is None:
            setattr(self, current, epoch)
        if getattr(self, first) is None and epoch + 1 - getattr(self, current) >= DIVERGING_EPOCHS:
            setattr(self, first, getattr(self, current))
            return True
        return False

    def update(self, epoch: int, sac: dict[str, float], q_bound: float) -> str | None:
        """Take one epoch's SAC means; returns the one-line warning when the critic has just been found over-estimating or diverging."""
        self.max_critic_loss, self.max_alpha = (
            max(self.max_critic_loss, sac["critic_loss"]),
            max(self.max_alpha, sac["alpha"]),
        )
        q, figures = sac["q_mean"], f"critic loss {sac['critic_loss']:.3g}, alpha {sac['alpha']:.3g}"
        overestimating = self._stretch_lasted(epoch, abs(q) > q_bound, "above_bound_since", "overestimating_since")
        if self._stretch_lasted(epoch, abs(q) > Q_BOUND_FACTOR * q_bound, "over_bound_since", "diverging_since"):
            return (
                f"warning: the critic is diverging: mean Q {q:.3g} has been beyond {Q_BOUND_FACTOR:g} x (max|r| + eta x max penalty) / (1 - gamma) = "
                f"{Q_BOUND_FACTOR * q_bound:.3g} since epoch {self.over_bound_since + 1} ({figures}); "
                "its scores mean nothing (see sac/q_mean, sac/q_bound)"
            )
        if overestimating:
            return (
                f"warning: the critic over-estimates: mean Q {q:.3g} has been beyond (max|r| + eta x max penalty) / (1 - gamma) = "
                f"{q_bound:.3g}, more than any return the rewards allow, since epoch {self.above_bound_since + 1} ({figures}); "
                "the policy chases values it cannot earn (see sac/q_mean, sac/q_bound)"
            )
        return None

    def update_states(self, epoch: int, state_abs_max: float, data_state_abs_max: float) -> str | None:
        """Take one epoch's largest rollout |s|; returns the one-line warning the first time it is far beyond the data's."""
        self.max_state_abs = max(self.max_state_abs, state_abs_max)
        if (
            self.far_states_since is not None or state_abs_max <= FAR_STATE_FACTOR * data_state_abs_max
        ):  # NaN is far too
            return None
        self.far_states_since = epoch
        return (
            f"warning: model rollouts reach |s| = {state_abs_max:.3g} in epoch {epoch + 1}, beyond {FAR_STATE_FACTOR:g} x the data's largest |s| "
            f"({data_state_abs_max:.3g}): the model invents states the critic then bootstraps from (see rollout/state_abs_max; --halt-margin ends rollouts there)"
        )

    def summary(self) -> str:
        overestimated = (
            f"; critic over-estimating since epoch {self.overestimating_since + 1}"
            if self.overestimating_since is not None
            else ""
        )
        diverged = (
            f"; critic diverging since epoch {self.diverging_since + 1}" if self.diverging_since is not None else ""
        )
        far = (
            f"; rollout states beyond {FAR_STATE_FACTOR:g} x the data's since epoch {self.far_states_since + 1}"
            if self.far_states_since is not None
            else ""
        )
        return f"largest critic loss {self.max_critic_loss:.3g}, largest alpha {self.max_alpha:.3g}, largest rollout |s| {self.max_state_abs:.3g}{overestimated}{diverged}{far}"


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
