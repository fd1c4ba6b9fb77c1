"""A bootstrapped ensemble of probabilistic dynamics models (PETS/MBPO/MOPO style).

Each member maps a normalised (s, a) to a diagonal Gaussian over (s' - s, r). Run as a
script, it trains an ensemble on an offline dataset and saves it, so that sweeps over eta
can share one model:

    python dynamics.py --env hopper-medium-v2 --dataset FILE.hdf5
    python drop.py --env hopper-medium-v2 --dynamics-path runs/NAME/dynamics.pt
    python dynamics.py --env hopper-medium-v2 --inspect runs/NAME/dynamics.pt   # is its uncertainty alive?
"""

import copy
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import StopOnSignal, atomic_save, check_writable, exclusive_lock
from datasets import DEFAULT_ENV
from nets import EnsembleMLP


# Termination functions on predicted next observations, equal to the Gymnasium envs' own
# `terminated` (Hopper/Walker2d-v4 `is_healthy`; strict inequalities, so NaN terminates too).
# MOPO's copied hopper check reads `np.abs(next_obs[:, 1:] < 100)`, a misplaced parenthesis
# that drops the lower bound; here the bound is |x| < 100 as in the env.
def hopper_terminated(next_obs: torch.Tensor) -> torch.Tensor:
    z, angle, state = next_obs[:, 0], next_obs[:, 1], next_obs[:, 1:]
    healthy = (state.abs() < 100).all(-1) & (z > 0.7) & (angle.abs() < 0.2)
    return ~healthy


def walker2d_terminated(next_obs: torch.Tensor) -> torch.Tensor:
    z, angle = next_obs[:, 0], next_obs[:, 1]
    healthy = (z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0)
    return ~healthy


def halfcheetah_terminated(next_obs: torch.Tensor) -> torch.Tensor:
    return torch.zeros(next_obs.shape[0], dtype=torch.bool, device=next_obs.device)


TERMINATION_FNS = {"hopper": hopper_terminated, "walker2d": walker2d_terminated, "halfcheetah": halfcheetah_terminated}


@dataclass
class DynamicsConfig:
    """Ensemble architecture and training (the MBPO/MOPO defaults)."""

    num_members: int = 7
    """ensemble members, each trained on its own bootstrap sample"""
    num_elites: int = 5
    """members with the lowest holdout MSE, used for rollouts"""
    hidden: int = 200
    """width of each of the 4 swish hidden layers"""
    lr: float = 1e-3
    """Adam learning rate"""
    batch_size: int = 256
    """transitions per member per gradient step"""
    weight_decays: tuple[float, ...] = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
    """L2 coefficients of the 4 hidden layers and the output layer (as in MBPO)"""
    logvar_bound_coef: float = 0.01
    """weight of the penalty on the learned max/min log-variance bounds"""
    logvar_bounds: Literal["shared", "per-member"] = "shared"
    """one pair of learned log-variance bounds for the whole ensemble (MBPO), or a pair per member"""
    holdout_ratio: float = 0.2
    """fraction of transitions held out for early stopping (capped by --holdout-max)"""
    holdout_max: int = 1000
    """at most this many holdout transitions"""
    patience: int = 5
    """stop after this many epochs in which no member improved its holdout MSE by more than 1%"""
    max_epochs: int | None = None
    """hard cap on training epochs (None: early stopping alone decides)"""


class MemberGroups:
    """Lays a flat batch out as `[G, M, ...]`, row g holding the samples assigned to member g.

    With this layout a batched ensemble runs each sample through its own member only; rows are
    zero-padded to the largest group, which costs about 1% for a uniform assignment.
    """

    def __init__(self, member: torch.Tensor, num_groups: int):
        counts = torch.bincount(member, minlength=num_groups)
        order = torch.argsort(member, stable=True)
        group_start = counts.cumsum(0) - counts
        self.member, self.num_groups = member, num_groups
        self.slot = torch.empty_like(member)
        self.slot[order] = torch.arange(len(member), device=member.device) - group_start[member[order]]
        self.width = int(counts.max())  # one host sync per call

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(self.num_groups, self.width, *x.shape[1:])
        out[self.member, self.slot] = x
        return out

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        return y[self.member, self.slot]


class ProbabilisticEnsemble(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, config: DynamicsConfig):
        super().__init__()
        self.obs_dim, self.act_dim, self.config = obs_dim, act_dim, config
        out_dim = obs_dim + 1  # delta-state and reward
        self.net = EnsembleMLP(config.num_members, obs_dim + act_dim, 2 * out_dim, [config.hidden] * 4, nn.SiLU)
        # Learned soft bounds on the log-variance (PETS), initial values as in MBPO. Shared, every
        # member's data holds them up; a member's own pair drifts apart (the upper one sinks below the
        # lower one, where no prediction presses on it), and then its variance stops depending on (s, a).
        rows = config.num_members if config.logvar_bounds == "per-member" else 1
        self.max_logvar = nn.Parameter(torch.full((rows, 1, out_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((rows, 1, out_dim), -10.0))
        self.register_buffer("input_mean", torch.zeros(obs_dim + act_dim))
        self.register_buffer("input_std", torch.ones(obs_dim + act_dim))
        self.register_buffer("elites", torch.arange(config.num_elites))

    def forward(self, obs, act, members: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of (s' - s, r). Inputs `[B, .]` go to every member; `[E', B, .]` pairs up with `members`."""
        x = (torch.cat([obs, act], -1) - self.input_mean) / self.input_std
        num = self.config.num_members if members is None else len(members)
        if x.dim() == 2:
            x = x.expand(num, -1, -1)
        mean, logvar = self.net(x, members).chunk(2, -1)
        max_logvar, min_logvar = self.max_logvar, self.min_logvar
        if members is not None and self.config.logvar_bounds == "per-member":
            max_logvar, min_logvar = max_logvar[members], min_logvar[members]
        logvar = max_logvar - F.softplus(max_logvar - logvar)
        logvar = min_logvar + F.softplus(logvar - min_logvar)
        return mean, logvar

    def mopo_penalty(self, obs: torch.Tensor, act: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """MOPO's uncertainty: the largest norm of the predicted std over `members` (None: every member, as MOPO's code)."""
        _, logvar = self(obs, act, members)
        return (0.5 * logvar).exp().norm(dim=-1).max(0).values

    def mopo_penalty_ceiling(self) -> float:
        """The largest value mopo_penalty can take: every predicted log-variance stays below max_logvar."""
        return (0.5 * self.max_logvar).exp().norm(dim=-1).max().item()

    def sample_step(
        self, obs: torch.Tensor, act: torch.Tensor, groups: MemberGroups
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample (s', r) for each transition from the elite `groups` assigned to it."""
        mean, logvar = self(groups.scatter(obs), groups.scatter(act), self.elites)
        sample = groups.gather(mean + torch.randn_like(mean) * (0.5 * logvar).exp())
        return obs + sample[:, :-1], sample[:, -1]

    @torch.no_grad()
    def elite_mean_next_obs(self, obs: torch.Tensor, act: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Each elite's mean next state for every (s, a): `[num_elites, N, obs_dim]`."""
        parts = [
            self(obs[i : i + chunk], act[i : i + chunk], self.elites)[0][..., :-1] + obs[i : i + chunk]
            for i in range(0, len(obs), chunk)
        ]
        return torch.cat(parts, 1)

    def loss(self, obs: torch.Tensor, act: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss on per-member batches `[E, B, .]`: Gaussian NLL, log-variance bound penalty, L2."""
        mean, logvar = self(obs, act)
        nll = (((mean - targets) ** 2) * (-logvar).exp() + logvar).mean((1, 2)).sum()
        bounds = self.config.logvar_bound_coef * (self.max_logvar.sum() - self.min_logvar.sum())
        layers = [*self.net.hidden, self.net.output]
        weight_decay = sum(
            decay * (layer.weight**2).sum() / 2 for decay, layer in zip(self.config.weight_decays, layers)
        )
        return nll + bounds + weight_decay


def transition_targets(obs: torch.Tensor, next_obs: torch.Tensor, rew: torch.Tensor) -> torch.Tensor:
    """What each member predicts: (s' - s, r)."""
    return torch.cat([next_obs - obs, rew[..., None]], -1)


# Beside an ensemble's file while it trains: what a stopped training needs to go on.
TRAINING_STATE_SUFFIX = ".training"


def training_fingerprint(inputs: torch.Tensor, targets: torch.Tensor, config: DynamicsConfig, seed: int) -> str:
    """What a stopped training must match to go on: the data's exact bytes (a float sum of them
    changes in its last bit with the thread count), the settings and the seed."""
    digest = hashlib.sha256()
    for tensor in (inputs, targets):
        digest.update(tensor.detach().cpu().contiguous().numpy().data)
    return json.dumps([digest.hexdigest(), asdict(config), seed])


def saved_training(path: str | None, fingerprint: str, device: torch.device) -> dict | None:
    """The state a stopped training left at `path`, if it trained on the same data, settings and seed."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        print(f"training the ensemble from the start: {path} is not readable ({type(e).__name__})")
        return None
    if state.get("fingerprint") != fingerprint:
        print(f"training the ensemble from the start: {path} was written for other data, settings or seed")
        return None
    print(f"resuming the ensemble's training from {path} after epoch {len(state['history'])}")
    return state


def train_ensemble(
    model: ProbabilisticEnsemble,
    obs: torch.Tensor,
    act: torch.Tensor,
    next_obs: torch.Tensor,
    rew: torch.Tensor,
    seed: int,
    progress: bool = True,
    resume_path: str | None = None,
    stop: StopOnSignal | None = None,
) -> list[float]:
    """Fit the ensemble by Gaussian NLL on bootstrap samples, early-stop on holdout MSE, pick the elites.

    Returns the mean holdout MSE after each epoch. Each member ends with its best-holdout weights.
    With `resume_path` the training's state is written there after every epoch, and a later call
    goes on from it exactly (1M transitions take hours on a CPU); the file is removed at the end.
    When `stop` is requested the training returns after the epoch it is in, unfinished, its state saved.
    """
    from tqdm import tqdm

    config, device = model.config, obs.device
    generator = torch.Generator(device=device).manual_seed(seed)
    inputs, targets = torch.cat([obs, act], -1), transition_targets(obs, next_obs, rew)
    perm = torch.randperm(len(inputs), generator=generator, device=device)
    num_holdout = int(min(len(inputs) * config.holdout_ratio, config.holdout_max))
    holdout, train = perm[:num_holdout], perm[num_holdout:]
    model.input_mean.copy_(inputs[train].mean(0))
    std = inputs[train].std(0)
    model.input_std.copy_(torch.where(std < 1e-12, torch.ones_like(std), std))  # constant columns pass through (MBPO)
    bootstrap = train[torch.randint(len(train), (config.num_members, len(train)), generator=generator, device=device)]

    def holdout_mse() -> torch.Tensor:
        with torch.no_grad():
            mean, _ = model(obs[holdout], act[holdout])
            return ((mean - targets[holdout]) ** 2).mean((1, 2))

    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    best = holdout_mse()
    best_state = copy.deepcopy(model.state_dict())
    history, epochs_since_update = [], 0
    fingerprint = training_fingerprint(inputs, targets, config, seed)
    saved = saved_training(resume_path, fingerprint, device)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"].cpu())  # a CUDA generator too takes its state on the CPU
        best, best_state, history, epochs_since_update = (
            saved["best"],
            saved["best_state"],
            saved["history"],
            saved["epochs_since_update"],
        )
    with tqdm(
        desc="dynamics", unit="epoch", total=config.max_epochs, initial=len(history), disable=not progress
    ) as bar:  # ETA only with a cap; closed before a stop line
        while (
            epochs_since_update < config.patience
            and (config.max_epochs is None or len(history) < config.max_epochs)
            and not (stop and stop.requested)
        ):
            # An independent shuffle of each member's bootstrap sample.
            shuffled = bootstrap.gather(1, torch.rand(bootstrap.shape, generator=generator, device=device).argsort(1))
            for start in range(0, shuffled.shape[1], config.batch_size):
                idx = shuffled[:, start : start + config.batch_size]
                loss = model.loss(obs[idx], act[idx], targets[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            mse = holdout_mse()
            improved = (best - mse) / best > 0.01
            if improved.any():
                best = torch.where(improved, mse, best)
                for name, param in model.named_parameters():
                    if len(param) == config.num_members:  # a member's own weights: its best epoch's
                        best_state[name][improved] = param.detach()[improved]
                    else:  # shared bounds: their latest values (MBPO keeps them out of its per-member snapshots)
                        best_state[name] = param.detach().clone()
                epochs_since_update = 0
            else:
                epochs_since_update += 1
            history.append(mse.mean().item())
            if resume_path is not None:
                atomic_save(
                    {
                        "fingerprint": fingerprint,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(),
                        "best": best,
                        "best_state": best_state,
                        "history": history,
                        "epochs_since_update": epochs_since_update,
                    },
                    resume_path,
                )
            bar.update()
            bar.set_postfix(holdout_mse=f"{history[-1]:.4f}", since_improved=epochs_since_update)
    if stop and stop.requested:
        return history
    if resume_path is not None and os.path.isfile(resume_path):
        os.remove(resume_path)
    model.load_state_dict(best_state)
    model.elites.copy_(holdout_mse().argsort()[: config.num_elites])
    return history


def save_ensemble(model: ProbabilisticEnsemble, path: str, family: str, data_sha256: str):
    """Atomic save: weights, config, what they were trained for and on (OfflineDataset.transitions_sha256)."""
    payload = {"state_dict": model.state_dict(), "config": asdict(model.config), "family": family, "obs_dim": model.obs_dim, "act_dim": model.act_dim,
               "data_sha256": data_sha256}  # fmt: skip
    atomic_save(payload, path)


def load_ensemble(
    path: str, family: str, obs_dim: int, act_dim: int, device: torch.device, data_sha256: str | None = None
) -> ProbabilisticEnsemble:
    """Load a saved ensemble, refusing one trained for another env or observation size, and warning
    when it was trained on other transitions than data_sha256's (files from before they recorded it say nothing)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: dynamics file {path} does not exist; train one with `python dynamics.py --env ...`")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        saved = (payload["family"], payload["obs_dim"], payload["act_dim"])
    except Exception as e:
        raise SystemExit(f"error: {path} is not a dynamics file saved by dynamics.py ({type(e).__name__}: {e})")
    if saved != (family, obs_dim, act_dim):
        raise SystemExit(
            f"error: {path} was trained for {saved[0]} (obs {saved[1]}, act {saved[2]}), not {family} (obs {obs_dim}, act {act_dim}); retrain it for this env"
        )
    trained_on = payload.get("data_sha256")
    if data_sha256 is not None and trained_on is not None and trained_on != data_sha256:
        # A warning, not an error: a built-in dataset collected on another machine can differ (docs/long-runs.md).
        print(
            f"warning: {path} was trained on other transitions than this dataset's (sha256 {trained_on[:12]}, here {data_sha256[:12]}): "
            f"its errors and uncertainty are not this data's; retrain it with `python dynamics.py` if that is not what you want",
            file=sys.stderr,
        )
    config = payload["config"]
    config.setdefault("logvar_bounds", "per-member")  # files from before the option had one pair per member
    config["weight_decays"] = tuple(config["weight_decays"])
    model = ProbabilisticEnsemble(obs_dim, act_dim, DynamicsConfig(**config)).to(device)
    model.load_state_dict(payload["state_dict"])
    return model


def cache_file(family: str, data_sha256: str, config: DynamicsConfig, seed: int) -> str:
    """Where the ensemble for this data, dynamics configuration and seed lives in $DROP_CACHE_DIR."""
    cache_dir = os.environ.get("DROP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "drop", "dynamics")
    key = hashlib.sha256(json.dumps([data_sha256, asdict(config), seed], sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(cache_dir, f"{family}-{key}.pt")


def trained_or_cached(
    path: str | None,
    use_cache: bool,
    data,
    data_sha256: str,
    config: DynamicsConfig,
    seed: int,
    run_dir: str,
    device: torch.device,
) -> tuple[ProbabilisticEnsemble, str]:
    """The ensemble drop.py rolls out in and its file: `path` if given, else the cache (trained into it on a miss),
    else (use_cache False) trained into run_dir/dynamics.pt. `data` is an OfflineDataset."""
    if path:
        return load_ensemble(path, data.family, data.obs_dim, data.act_dim, device, data_sha256), os.path.abspath(path)

    def train(path: str) -> ProbabilisticEnsemble:
        from torch.utils.tensorboard import SummaryWriter

        as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)
        model = ProbabilisticEnsemble(data.obs_dim, data.act_dim, config).to(device)
        history = train_ensemble(
            model,
            *(as_tensor(x) for x in (data.observations, data.actions, data.next_observations, data.rewards)),
            seed,
            resume_path=path + TRAINING_STATE_SUFFIX,
        )
        with SummaryWriter(
            os.path.join(run_dir, "dynamics")
        ) as writer:  # its own folder, so a resume's purge cannot touch it
            for epoch, mse in enumerate(history):
                writer.add_scalar("dynamics/holdout_mse", mse, epoch)
        save_ensemble(model, path, data.family, data_sha256)
        return model

    if not use_cache:
        path = os.path.abspath(os.path.join(run_dir, "dynamics.pt"))
        return train(path), path
    path = cache_file(data.family, data_sha256, config, seed)
    check_writable(
        os.path.dirname(path),
        "dynamics cache folder",
        "set DROP_CACHE_DIR to a writable folder or pass --no-dynamics-cache",
    )
    # A second run on the same key (a sweep) waits here for the first to finish training, then reuses its file.
    with exclusive_lock(path + ".lock", f"waiting for another run that is training the same ensemble into {path}"):
        if os.path.isfile(path):
            print(
                f"reusing the trained ensemble {path} (same data, dynamics config and seed; --no-dynamics-cache to retrain)"
            )
            return load_ensemble(path, data.family, data.obs_dim, data.act_dim, device, data_sha256), path
        return train(path), path


@dataclass
class Args:
    env: str = DEFAULT_ENV
    """dataset name: D4RL (hopper-medium-v2), built-in (builtin-hopper-medium) or Minari (mujoco/hopper/medium-v0)"""
    dataset: str | None = None
    """a D4RL-format HDF5 file to train on instead (--env then names the task)"""
    seed: int = 0
    """seed of the holdout split, bootstrap samples and initialisation"""
    device: str = "auto"
    """torch device: auto, cpu or cuda"""
    out: str | None = None
    """where to save the ensemble; default runs/dynamics__{env}__{seed}__{time}/dynamics.pt. A stopped training
    leaves OUT.training, and the same command with the same --out goes on from it"""
    inspect: str | None = None
    """instead of training: report on this saved ensemble's uncertainty on --env's data (crossed bounds, constant variances, MOPO's penalty)"""
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    """ensemble architecture and training"""


@torch.no_grad()
def uncertainty_report(
    model: ProbabilisticEnsemble, obs: torch.Tensor, act: torch.Tensor, generator: torch.Generator
) -> dict:
    """Whether the ensemble's variance still depends on (s, a): bounds crossed (max below min, so the
    log-variance is the constant min), outputs whose log-variance varies by under 0.01 over the samples,
    and MOPO's penalty (the members' largest std norm) at the data's actions and at uniform random ones,
    against its ceiling, the largest norm the upper bounds allow."""
    _, logvar = model(obs, act)
    spread = logvar.amax(1) - logvar.amin(1)
    random_act = torch.rand(act.shape, generator=generator, device=act.device) * 2 - 1
    penalty = lambda a: model.mopo_penalty(obs, a).mean().item()
    return {
        "crossed_bounds": int((model.max_logvar < model.min_logvar).sum()), "bounds": model.max_logvar.numel(),
        "constant_outputs": int((spread < 0.01).sum()), "outputs": spread.numel(),
        "mopo_penalty_data": penalty(act), "mopo_penalty_random": penalty(random_act),
        "mopo_penalty_ceiling": model.mopo_penalty_ceiling(),
    }  # fmt: skip


def main(args: Args):
    from datasets import DatasetError, load_dataset
    from sac import pick_device, seed_everything

    try:
        data = load_dataset(args.env, args.dataset)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    seed_everything(args.seed)
    device = pick_device(args.device)
    as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)
    if args.inspect:
        model = load_ensemble(args.inspect, data.family, data.obs_dim, data.act_dim, device, data.transitions_sha256())
        generator = torch.Generator(device=device).manual_seed(args.seed)
        rows = torch.randperm(len(data.observations), generator=generator, device=device)[:4000]
        r = uncertainty_report(model, as_tensor(data.observations)[rows], as_tensor(data.actions)[rows], generator)
        print(
            f"{args.inspect} ({model.config.logvar_bounds} log-variance bounds), on {len(rows)} samples of {data.name}:\n"
            f"  crossed bounds: {r['crossed_bounds']} of {r['bounds']}; outputs whose variance no longer depends on (s, a): {r['constant_outputs']} of {r['outputs']} (member x output)\n"
            f"  MOPO's penalty: {r['mopo_penalty_data']:.2f} at the data's actions, {r['mopo_penalty_random']:.2f} at uniform random actions (ceiling {r['mopo_penalty_ceiling']:.2f})"
        )
        return
    model = ProbabilisticEnsemble(data.obs_dim, data.act_dim, args.dynamics).to(device)
    path = args.out or os.path.join(
        "runs", f"dynamics__{data.name.replace('/', '_')}__{args.seed}__{int(time.time())}", "dynamics.pt"
    )
    # Ctrl-C and kill are how a long training is paused, so they get a line, not a traceback.
    with StopOnSignal("epoch") as stop:
        history = train_ensemble(
            model,
            as_tensor(data.observations),
            as_tensor(data.actions),
            as_tensor(data.next_observations),
            as_tensor(data.rewards),
            args.seed,
            resume_path=path + TRAINING_STATE_SUFFIX,
            stop=stop,
        )
    if stop.requested:
        print(
            f"stopped ({signal.Signals(stop.requested).name}): the finished epochs are saved in {path + TRAINING_STATE_SUFFIX}; the same command goes on from them",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(128 + stop.requested)
    save_ensemble(model, path, data.family, data.transitions_sha256())
    print(
        f"trained {len(history)} epochs, holdout MSE {history[0]:.4f} -> {history[-1]:.4f}; elites {model.elites.tolist()}; saved {path}"
    )


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
