"""What keeps a run alive: atomic writes, the checkpoint and its resume, progress.csv, and stopping on a signal.

A drop.py checkpoint is a dict of tensors and plain Python values, so `torch.load(path,
weights_only=True)` reads it without running any pickled code. A run stopped after any SAC update
continues from its checkpoint to exactly the weights of the same run left alone.
"""

import contextlib
import csv
import dataclasses
import fcntl
import glob
import os
import random
import signal
import sys
import tempfile
import threading
import time
import typing
from dataclasses import asdict, dataclass, field
from typing import IO, Callable

import numpy as np
import torch

from health import CriticHealth
from sac import SAC, ReplayBuffer


def write_failure(path: str, error: BaseException) -> SystemExit:
    """The one-line error for a write that failed: the OS's reason (disk full, permission, ...) and the fix."""
    reason = error
    while reason is not None and not isinstance(reason, OSError):  # torch.save wraps the OSError in a RuntimeError
        reason = reason.__context__
    why = (reason.strerror or str(reason)) if reason is not None else " ".join(str(error).split())
    return SystemExit(
        f"error: could not write {path} ({why}); free some space or choose a writable folder (the previous file, if any, is unchanged)"
    )


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = True):
    """Call write(file) on a temporary file beside `path`, fsync, rename: readers see the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(handle, "wb" if binary else "w", newline=None if binary else "") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the final file should read like any other
        os.replace(tmp, path)
        tmp = None
        directory_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    except (OSError, RuntimeError) as e:
        raise write_failure(path, e)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def atomic_save(payload, path: str):
    """torch.save, atomically. Tensors are written from their own memory one after another, with no serialised copy."""
    atomic_write(path, lambda file: torch.save(payload, file))


def check_writable(directory: str, what: str, fix: str):
    """Fail in one line, before any training, if `directory` cannot be created or written to."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise SystemExit(f"error: the {what} {directory} is not writable ({e.strerror or e}); {fix}")


@contextlib.contextmanager
def exclusive_lock(path: str, waiting_message: str):
    """Hold an exclusive lock on the file `path` (created if needed); print `waiting_message` if another process holds it."""
    with open(path, "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting_message, flush=True)
            fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def rng_state() -> dict:
    """The torch (CPU and CUDA), numpy and Python generators' states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gaussian,
        },
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))


def buffer_state(buffer: ReplayBuffer) -> dict:
    """The buffer's own tensors (no copy: torch.save streams them) and its write position."""
    return {
        "obs": buffer.obs,
        "act": buffer.act,
        "rew": buffer.rew,
        "next_obs": buffer.next_obs,
        "done": buffer.done,
        "member": buffer.member,
        "ptr": buffer.ptr,
        "size": buffer.size,
    }


def load_buffer_state(buffer: ReplayBuffer, state: dict):
    for name in ("obs", "act", "rew", "next_obs", "done"):
        getattr(buffer, name).copy_(state[name])
    if "member" in state:  # checkpoints from before it was kept have none (their runs never read it)
        buffer.member.copy_(state["member"])
    buffer.ptr, buffer.size = state["ptr"], state["size"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict):
    """Restore Adam's moments and step counts, keeping the learning rates `optimizer` was built with."""
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, lr in zip(optimizer.param_groups, learning_rates):
        group["lr"] = lr


def load_checkpoint(
    path: str, required: tuple[str, ...], device: str | torch.device = "cpu", mmap: bool = False
) -> dict:
    """A checkpoint written by drop.py, or one line saying why `path` is not one (missing, truncated, foreign)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}; pass a runs/RUN folder written by drop.py")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
        missing = [key for key in required if key not in checkpoint]
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        raise SystemExit(
            f"error: {path} is not a readable drop.py checkpoint (truncated or another program's file: {type(e).__name__}: {reason})"
        )
    if missing:
        raise SystemExit(
            f"error: {path} is not a drop.py checkpoint with what this needs (missing {', '.join(missing)})"
        )
    return checkpoint


# ---------------------------------------------------------------------------------------------
# A drop.py run: its checkpoint, resume and progress.csv


@dataclass
class EpochProgress:
    """What the current epoch has done so far: enough to stop after any SAC update and continue exactly."""

    step: int = 0
    """SAC updates done (the epoch's DICE training comes before the first)"""
    penalty_stats: dict[str, float] = field(default_factory=dict)
    """what the penalty's training returned at the epoch's start (a ratio's objective and E_D[tau])"""
    rollouts: list[dict[str, float]] = field(default_factory=list)
    """each rollout's summary"""
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    """SAC's losses summed over the updates (tensors: no host sync per update)"""

    def add(self, losses: dict[str, torch.Tensor]):
        """One SAC update done, with these losses."""
        self.loss_sums = {name: self.loss_sums.get(name, 0.0) + value for name, value in losses.items()}
        self.step += 1

    def sac_means(self) -> dict[str, float]:
        """The epoch's mean SAC losses so far (one host sync)."""
        return {name: (value / max(self.step, 1)).item() for name, value in self.loss_sums.items()}


PROGRESS_COLUMNS = [
    "epoch",
    "normalized_score",
    "normalized_score_std",
    "return",
    "wall_seconds",
    "penalty_mean",
    "rollout_tau_mean",
    "rollout_tau_median",
]


def write_progress(path: str, rows: list[dict]):
    """One evaluation per row of runs/RUN/progress.csv, so sweeps need not parse TensorBoard.

    Rewritten whole from the run's evaluation history, so a resumed run never repeats a row.
    """

    def write(file):
        writer = csv.DictWriter(
            file, PROGRESS_COLUMNS, restval="nan"
        )  # evaluations saved before a column existed lack it
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write, binary=False)


@dataclass
class RunRecord:
    """What a run keeps besides its networks and buffers: its folder, its arguments as given, its data and ensemble, and
    what it has done so far. Saved whole at each checkpoint, so that a resumed run continues exactly."""

    run_dir: str
    args: object
    """the arguments as given (the per-dataset table fills the rest again on resume)"""
    data: object
    """the OfflineDataset"""
    data_sha256: str
    dynamics_path: str
    epochs: int
    progress: EpochProgress = field(default_factory=EpochProgress)
    """how far the epoch under way got"""
    eval_history: list[dict] = field(default_factory=list)
    critic_health: CriticHealth = field(default_factory=CriticHealth)
    wall_offset: float = 0.0
    """the wall seconds of the run before this process took it on"""
    started: float = field(default_factory=time.perf_counter)

    def wall_seconds(self) -> float:
        return self.wall_offset + time.perf_counter() - self.started

    def save(self, epoch: int, agent: SAC, penalty, model_buffer: ReplayBuffer):
        save_checkpoint(os.path.join(self.run_dir, "checkpoint.pt"), agent, penalty, model_buffer, self, epoch)


def save_checkpoint(path: str, agent: SAC, penalty, model_buffer: ReplayBuffer, record: RunRecord, epoch: int):
    """Everything needed to continue the run exactly, and what eval.py needs, loadable with weights_only=True.

    `epoch` is the last completed epoch; `record.progress` says how far the next one got. The eval
    env needs no RNG state: it is built anew and reset with fixed seeds at every evaluation.
    """
    data, epochs = record.data, record.epochs
    payload = {
        "actor": agent.actor.state_dict(),
        "critic": agent.critic.state_dict(),
        "critic_target": agent.critic_target.state_dict(),
        "log_alpha": agent.log_alpha.detach(),
        "actor_opt": agent.actor_opt.state_dict(),
        "critic_opt": agent.critic_opt.state_dict(),
        "alpha_opt": agent.alpha_opt.state_dict(),
        "penalty": penalty.state_dict(),
        "model_buffer": buffer_state(model_buffer),
        "rng": rng_state(),
        "args": asdict(record.args),
        "dataset": data.name,
        "data_sha256": record.data_sha256,
        "family": data.family,
        "eval_env_id": data.eval_env_id,
        "obs_dim": data.obs_dim,
        "act_dim": data.act_dim,
        "epoch": epoch,
        "epoch_progress": asdict(record.progress),
        "critic_health": asdict(record.critic_health),
        "epochs": epochs,
        "finished": epoch + 1 == epochs,
        "eval_history": record.eval_history,
        "normalized_score": record.eval_history[-1]["normalized_score"] if record.eval_history else float("nan"),
        "dynamics_path": record.dynamics_path,
        "wall_seconds": record.wall_seconds(),
    }
    atomic_save(payload, path)


def penalty_state(checkpoint: dict) -> dict:
    """The penalty's state; checkpoints from before the penalty interface kept the ratio net under "dice"."""
    if "penalty" in checkpoint:
        return checkpoint["penalty"]
    return (
        {"net": checkpoint["dice"], "optimizer": checkpoint["dice_opt"]} if checkpoint.get("dice") is not None else {}
    )


def restore_run(checkpoint: dict, agent: SAC, penalty, model_buffer: ReplayBuffer, record: RunRecord, seed: int):
    """Load a checkpoint into a freshly built run and its record."""
    for module, key in ((agent.actor, "actor"), (agent.critic, "critic"), (agent.critic_target, "critic_target")):
        module.load_state_dict(checkpoint[key])
    with torch.no_grad():
        agent.log_alpha.copy_(checkpoint["log_alpha"])
    for optimizer, key in (
        (agent.actor_opt, "actor_opt"),
        (agent.critic_opt, "critic_opt"),
        (agent.alpha_opt, "alpha_opt"),
    ):
        load_optimizer_state(optimizer, checkpoint[key])
    penalty.load_state_dict(penalty_state(checkpoint))
    load_buffer_state(model_buffer, checkpoint["model_buffer"])
    progress = dict(checkpoint["epoch_progress"])
    progress.setdefault("penalty_stats", progress.pop("dice", {}))  # its name before the penalty interface
    record.progress = EpochProgress(**progress)
    record.progress.loss_sums = {
        name: value.to(model_buffer.obs.device) for name, value in record.progress.loss_sums.items()
    }
    record.eval_history, record.wall_offset = checkpoint["eval_history"], checkpoint["wall_seconds"]
    record.critic_health = CriticHealth(**checkpoint.get("critic_health", {}))
    if seed == checkpoint["args"]["seed"]:
        set_rng_state(checkpoint["rng"])  # the exact continuation; a new --seed takes another path from here
    write_progress(os.path.join(record.run_dir, "progress.csv"), record.eval_history)
    # A kill in the middle of a write leaves a temporary file.
    for leftover in glob.glob(os.path.join(record.run_dir, ".checkpoint.pt.*.tmp")):
        os.remove(leftover)


def run_folder(resume: str | None, run_name: str) -> str:
    """Where the run lives: the resumed run's folder, else runs/RUN_NAME, which must not hold a run already."""
    run_dir = (os.path.dirname(checkpoint_file(resume)) or ".") if resume else os.path.join("runs", run_name)
    if not resume and os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        raise SystemExit(
            f"error: {run_dir} already holds a run; continue it with `python drop.py --resume {run_dir}`, "
            "or pick another --run-name (or delete the folder)"
        )
    check_writable(run_dir, "runs folder", "run from a folder you can write to, or free some space")
    return run_dir


# Keys a checkpoint needs for --resume (eval.py needs fewer).
RESUME_KEYS = (
    "args",
    "epoch",
    "epochs",
    "finished",
    "epoch_progress",
    "model_buffer",
    "rng",
    "actor_opt",
    "dynamics_path",
    "eval_history",
)
# What a resumed run may change: the way out of a NaN (another seed, smaller steps), where it runs,
# and its length (more epochs extend a run; nothing in an epoch depends on the total).
RESUME_MAY_CHANGE = {
    "resume",
    "seed",
    "sac.actor_lr",
    "sac.critic_lr",
    "sac.alpha_lr",
    "dice_lr",
    "dice.f_lr",
    "dice.nu_lr",
    "classifier.lr",
    "device",
    "track",
    "epochs",
}


def checkpoint_file(run: str) -> str:
    return run if run.endswith(".pt") else os.path.join(run, "checkpoint.pt")


def flat_fields(values: dict, prefix: str = "") -> dict:
    """asdict(args) with nested configs as dotted names, {"sac": {"actor_lr": 3e-4}} -> {"sac.actor_lr": 3e-4},
    and tuples as lists, so that arguments read back from a checkpoint compare equal to the same ones given anew."""
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat |= flat_fields(value, f"{prefix}{name}.")
        else:
            flat[prefix + name] = list(value) if isinstance(value, tuple) else value
    return flat


def dataclass_from_dict(cls, values: dict):
    """A dataclass from its asdict() (nested dataclasses and tuples included); names it no longer has are dropped."""
    hints, kwargs = typing.get_type_hints(cls), {}
    for name in (f.name for f in dataclasses.fields(cls) if f.name in values):
        value, hint = values[name], hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = dataclass_from_dict(hint, value)
        elif isinstance(value, list) and "tuple" in str(hint):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def refuse_changes(saved, args):
    """One line naming every argument of a resumed run that differs from the run's own, unless it may change."""
    before, after = flat_fields(asdict(saved)), flat_fields(asdict(args))
    changed = [name for name, value in after.items() if name not in RESUME_MAY_CHANGE and value != before.get(name)]
    if changed:
        flags = ", ".join(f"--{name.replace('_', '-')} {after[name]}" for name in changed)
        raise SystemExit(
            f"error: {flags} would change the run that --resume continues; only --seed, the learning rates, --epochs, --device and --track may change (start a new run for the rest)"
        )


def resume_checkpoint(args, args_from_dict: Callable[[dict], object]) -> dict | None:
    """The checkpoint --resume continues, after refusing what may not change; None, said in a line, if the run is finished."""
    checkpoint = load_checkpoint(checkpoint_file(args.resume), RESUME_KEYS, mmap=True)
    refuse_changes(args_from_dict(checkpoint["args"]), args)
    epochs, done = args.epochs or checkpoint["epochs"], checkpoint["epoch"] + 1
    if checkpoint["finished"] and epochs == done:
        print(f"{args.resume} is finished ({done} of {done} epochs); nothing to resume (a larger --epochs extends it)")
        return None
    if epochs <= done:
        raise SystemExit(
            f"error: --epochs {epochs}, but {args.resume} has done {done} epochs already; give more than {done} to extend it"
        )
    if not os.path.isfile(checkpoint["dynamics_path"]):
        raise SystemExit(
            f"error: {checkpoint['dynamics_path']}, the ensemble this run trained with, is gone; "
            "put it back to resume (a new run trains or reuses one)"
        )
    return checkpoint


class StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM ask a loop to stop at its next safe point (`requested` is then the signal); a second Ctrl-C stops at once.

    drop.py stops after the current SAC update, dynamics.py after the current epoch; both say in one
    line how to go on. Both signals, because a job started with `nohup ... &` ignores SIGINT.
    """

    def __init__(self, what: str = "update"):
        self.what = what

    def __enter__(self):
        self.requested, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread handle signals
            self.previous = {signum: signal.signal(signum, self.request) for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def request(self, signum, frame):
        self.requested = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n{signal.Signals(signum).name}: stopping after this {self.what}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
