"""A classifier estimate of DROP's ratio, defined where the rollouts go (`drop.py --ratio classifier`).

GradientDICE learns tau(s, a) = rho_model(s, a) / rho_data(s, a) only at dataset state-actions, yet
DROP reads it at rollout samples, which leave the data's support as soon as the policy does. A
classifier trained to tell rollout samples (label 1) from dataset samples (label 0), on balanced
batches, has at its optimum the logit

    log(rho_model(s, a) / rho_data(s, a)),

learned on both sides of the boundary. Head g belongs to elite g, like the DICE heads: its
positives are the model-buffer samples that elite produced, the samples SAC trains on. The ratio
is exp(logit), so drop.py's per-dataset clips, transforms and etas keep their meaning.

`what_separates` asks the same classifier what gives a run's rollouts away: fresh classifiers of
rollout against dataset samples on (s, a), on s alone and on a alone (diagnostics.py reports it).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nets import EnsembleMLP


@dataclass
class ClassifierConfig:
    """Settings of the classifier ratio (drop.py --ratio classifier); its steps per epoch are the table's dice_steps."""

    hidden: int = 64
    """width of the two ReLU hidden layers of each head (as the DICE nets')"""
    lr: float = 1e-3
    """Adam learning rate"""
    batch_size: int = 256
    """model samples, and as many dataset samples, per head and step"""


LOGIT_MAX = 50.0  # the largest logit the ratio takes: e^50 lies far above every clip, and e^89 overflows float32


class RatioClassifier(nn.Module):
    """One logistic classifier per elite on standardised (s, a); `ratio` has GradientDICE's interface."""

    def __init__(
        self, obs_dim: int, act_dim: int, num_heads: int, hidden: int, input_mean: torch.Tensor, input_std: torch.Tensor
    ):
        super().__init__()
        self.num_heads = num_heads
        self.net = EnsembleMLP(num_heads, obs_dim + act_dim, 1, [hidden, hidden])
        # Every head starts at logit 0, ratio 1: no penalty before it has seen a rollout.
        nn.init.zeros_(self.net.output.weight)
        nn.init.zeros_(self.net.output.bias)
        # The dynamics model's input statistics: the logit should not depend on the units of (s, a).
        self.register_buffer("input_mean", input_mean.clone())
        self.register_buffer("input_std", input_std.clone())

    def logit(self, obs: torch.Tensor, act: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """log(rho_model / rho_data) as `[H, B]`. `[B, .]` inputs go to every head; `[H', B, .]` pair up with `heads`."""
        x = (torch.cat([obs, act], -1) - self.input_mean) / self.input_std
        if x.dim() == 2:
            x = x.expand(self.num_heads if heads is None else len(heads), -1, -1)
        return self.net(x, heads).squeeze(-1)

    def ratio(self, obs: torch.Tensor, act: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """exp(logit), finite far off the data too (where the logit can reach the thousands)."""
        return self.logit(obs, act, heads).clamp(max=LOGIT_MAX).exp()


def classifier_loss(classifier: RatioClassifier, model_obs, model_act, data_obs, data_act) -> torch.Tensor:
    """Logistic loss of each head, `[H]`: model samples `[H, B, .]` are label 1, data samples `[H, B, .]` label 0."""
    positive, negative = classifier.logit(model_obs, model_act), classifier.logit(data_obs, data_act)
    return F.softplus(-positive).mean(1) + F.softplus(negative).mean(1)


def train_classifier(
    classifier: RatioClassifier,
    optimizer: torch.optim.Optimizer,
    model_obs: torch.Tensor,
    model_act: torch.Tensor,
    model_member: torch.Tensor,
    data_obs: torch.Tensor,
    data_act: torch.Tensor,
    steps: int,
    batch_size: int,
) -> torch.Tensor:
    """`steps` Adam steps on balanced batches: per head, batch_size of its own elite's model samples and
    batch_size dataset samples. Returns the mean loss per head (log 2 = 0.69 is chance).

    model_member[i] is the head (elite position) whose member produced model sample i; every head needs some.
    """
    device, heads = data_obs.device, classifier.num_heads
    own = [torch.nonzero(model_member == g).squeeze(1) for g in range(heads)]
    total = torch.zeros(heads, device=device)
    for _ in range(steps):
        model_idx = torch.stack([rows[torch.randint(len(rows), (batch_size,), device=device)] for rows in own])
        data_idx = torch.randint(len(data_obs), (heads, batch_size), device=device)
        loss = classifier_loss(
            classifier, model_obs[model_idx], model_act[model_idx], data_obs[data_idx], data_act[data_idx]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        total += loss.detach()
    return total / max(steps, 1)


# ---------------------------------------------------------------------------------------------
# What separates rollouts from the data?

INPUT_PARTS = {"state and action": (True, True), "state only": (True, False), "action only": (False, True)}


def hide(obs: torch.Tensor, act: torch.Tensor, input_mean: torch.Tensor, keep_state: bool, keep_action: bool):
    """(s, a) with a hidden part set to its mean, which standardises to 0: the classifier cannot use it."""
    obs_dim = obs.shape[-1]
    return (obs if keep_state else input_mean[:obs_dim].expand_as(obs)), (
        act if keep_action else input_mean[obs_dim:].expand_as(act)
    )


def separation(model_logit: torch.Tensor, data_logit: torch.Tensor, upper_clip: float | None) -> dict[str, float]:
    """Balanced held-out accuracy (0.5: the two are indistinguishable), median logits, and the share of
    rollout samples whose ratio exp(logit) reaches the upper clip."""
    return {
        "accuracy": 0.5 * ((model_logit > 0).float().mean() + (data_logit < 0).float().mean()).item(),
        "median_logit_rollout": model_logit.median().item(),
        "median_logit_data": data_logit.median().item(),
        "rollout_above_clip": float("nan")
        if upper_clip is None
        else (model_logit >= math.log(upper_clip)).float().mean().item(),
    }


def what_separates(
    model_obs,
    model_act,
    data_obs,
    data_act,
    input_mean,
    input_std,
    config: ClassifierConfig,
    steps: int,
    held_out: int,
    upper_clip: float | None,
) -> dict[str, dict[str, float]]:
    """A fresh one-head classifier per entry of INPUT_PARTS, trained on all but the last `held_out`
    samples of each side (as drop.py trains its heads) and judged on those."""
    results = {}
    for name, (keep_state, keep_action) in INPUT_PARTS.items():
        obs_m, act_m = hide(model_obs, model_act, input_mean, keep_state, keep_action)
        obs_d, act_d = hide(data_obs, data_act, input_mean, keep_state, keep_action)
        classifier = RatioClassifier(model_obs.shape[-1], model_act.shape[-1], 1, config.hidden, input_mean, input_std)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=config.lr)
        one_head = torch.zeros(len(obs_m) - held_out, dtype=torch.long)
        train_classifier(
            classifier,
            optimizer,
            obs_m[:-held_out],
            act_m[:-held_out],
            one_head,
            obs_d[:-held_out],
            act_d[:-held_out],
            steps,
            config.batch_size,
        )
        with torch.no_grad():
            results[name] = separation(
                classifier.logit(obs_m[-held_out:], act_m[-held_out:])[0],
                classifier.logit(obs_d[-held_out:], act_d[-held_out:])[0],
                upper_clip,
            )
    return results
