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
    return SystemExit(f"error: could not write {path} ({why}); free some space or choose a writable folder (the previous file, if any, is unchanged)")


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
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))


def buffer_state(buffer: ReplayBuffer) -> dict:
    """The buffer's own tensors (no copy: torch.save streams them) and its write position."""
    return {"obs": buffer.obs, "act": buffer.act, "rew": buffer.rew, "next_obs": buffer.next_obs, "done": buffer.done, "member": buffer.member, "ptr": buffer.ptr, "size": buffer.size}


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


def load_checkpoint(path: str, required: tuple[str, ...], device: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A checkpoint written by drop.py, or one line saying why `path` is not one (missing, truncated, foreign)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}; pass a runs/RUN folder written by drop.py")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
        missing = [key for key in required if key not in checkpoint]
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        raise SystemExit(f"error: {path} is not a readable drop.py checkpoint (truncated or another program's file: {type(e).__name__}: {reason})")
    if missing:
        raise SystemExit(f"error: {path} is not a drop.py checkpoint with what this needs (missing {', '.join(missing)})")
    return checkpoint


# ---------------------------------------------------------------------------------------------
# A drop.py run: its checkpoint, resume and progress.csv


@dataclass
class EpochProgress:
    """What the current epoch has done so far: enough to stop after any SAC update and continue exactly."""

    step: int = 0
    """SAC updates done (the epoch's DICE training comes before the first)"""
    dice: dict[str, float] = field(default_factory=dict)
    """the epoch's DICE statistics"""
    rollouts: list[dict[str, float]] = field(default_factory=list)
    """each rollout's summary"""
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    """SAC's losses summed over the updates (tensors: no host sync per update)"""


PROGRESS_COLUMNS = ["epoch", "normalized_score", "normalized_score_std", "return", "wall_seconds", "penalty_mean", "rollout_tau_mean", "rollout_tau_median"]


def write_progress(path: str, rows: list[dict]):
    """One evaluation per row of runs/RUN/progress.csv, so sweeps need not parse TensorBoard.

    Rewritten whole from the run's evaluation history, so a resumed run never repeats a row.
    """

    def write(file):
        writer = csv.DictWriter(file, PROGRESS_COLUMNS, restval="nan")  # evaluations saved before a column existed lack it
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write, binary=False)


def save_checkpoint(path: str, agent: SAC, penalty, model_buffer: ReplayBuffer, args, data, epochs: int, epoch: int, progress: EpochProgress,
                    eval_history: list[dict], dynamics_path: str, data_sha256: str, wall_seconds: float, critic_health: CriticHealth):
    """Everything needed to continue the run exactly, and what eval.py needs, loadable with weights_only=True.

    `args` are the arguments as given (the per-dataset table fills the rest again on resume);
    `epoch` is the last completed epoch; `progress` says how far the next one got. The eval env
    needs no RNG state: it is built anew and reset with fixed seeds at every evaluation.
    """
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
        "args": asdict(args),
        "dataset": data.name,
        "data_sha256": data_sha256,
        "family": data.family,
        "eval_env_id": data.eval_env_id,
        "obs_dim": data.obs_dim,
        "act_dim": data.act_dim,
        "epoch": epoch,
        "epoch_progress": asdict(progress),
        "critic_health": asdict(critic_health),
        "epochs": epochs,
        "finished": epoch + 1 == epochs,
        "eval_history": eval_history,
        "normalized_score": eval_history[-1]["normalized_score"] if eval_history else float("nan"),
        "dynamics_path": dynamics_path,
        "wall_seconds": wall_seconds,
    }
    atomic_save(payload, path)


def penalty_state(checkpoint: dict) -> dict:
    """The penalty's state; checkpoints from before the penalty interface kept the ratio net under "dice"."""
    if "penalty" in checkpoint:
        return checkpoint["penalty"]
    return {"net": checkpoint["dice"], "optimizer": checkpoint["dice_opt"]} if checkpoint.get("dice") is not None else {}


def restore_run(checkpoint: dict, agent: SAC, penalty, model_buffer: ReplayBuffer, run_dir: str, seed: int) -> tuple[EpochProgress, list[dict], float, CriticHealth]:
    """Load a checkpoint into a freshly built run; returns its epoch progress, evaluations, wall seconds and health."""
    for module, key in ((agent.actor, "actor"), (agent.critic, "critic"), (agent.critic_target, "critic_target")):
        module.load_state_dict(checkpoint[key])
    with torch.no_grad():
        agent.log_alpha.copy_(checkpoint["log_alpha"])
    for optimizer, key in ((agent.actor_opt, "actor_opt"), (agent.critic_opt, "critic_opt"), (agent.alpha_opt, "alpha_opt")):
        load_optimizer_state(optimizer, checkpoint[key])
    penalty.load_state_dict(penalty_state(checkpoint))
    load_buffer_state(model_buffer, checkpoint["model_buffer"])
    progress = EpochProgress(**checkpoint["epoch_progress"])
    progress.loss_sums = {name: value.to(model_buffer.obs.device) for name, value in progress.loss_sums.items()}
    if seed == checkpoint["args"]["seed"]:
        set_rng_state(checkpoint["rng"])  # the exact continuation; a new --seed takes another path from here
    write_progress(os.path.join(run_dir, "progress.csv"), checkpoint["eval_history"])
    for leftover in glob.glob(os.path.join(run_dir, ".checkpoint.pt.*.tmp")):  # a kill in the middle of a write leaves one
        os.remove(leftover)
    return progress, checkpoint["eval_history"], checkpoint["wall_seconds"], CriticHealth(**checkpoint.get("critic_health", {}))


# Keys a checkpoint needs for --resume (eval.py needs fewer).
RESUME_KEYS = ("args", "epoch", "epochs", "finished", "epoch_progress", "model_buffer", "rng", "actor_opt", "dynamics_path", "eval_history")
# What a resumed run may change: the way out of a NaN (another seed, smaller steps), where it runs,
# and its length (more epochs extend a run; nothing in an epoch depends on the total).
RESUME_MAY_CHANGE = {"resume", "seed", "sac.actor_lr", "sac.critic_lr", "sac.alpha_lr", "dice_lr", "dice.f_lr", "dice.nu_lr", "classifier.lr", "device", "track", "epochs"}


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
        raise SystemExit(f"error: {flags} would change the run that --resume continues; only --seed, the learning rates, --epochs, --device and --track may change (start a new run for the rest)")


def resume_checkpoint(args, args_from_dict: Callable[[dict], object]) -> dict | None:
    """The checkpoint --resume continues, after refusing what may not change; None, said in a line, if the run is finished."""
    checkpoint = load_checkpoint(checkpoint_file(args.resume), RESUME_KEYS, mmap=True)
    refuse_changes(args_from_dict(checkpoint["args"]), args)
    epochs, done = args.epochs or checkpoint["epochs"], checkpoint["epoch"] + 1
    if checkpoint["finished"] and epochs == done:
        print(f"{args.resume} is finished ({done} of {done} epochs); nothing to resume (a larger --epochs extends it)")
        return None
    if epochs <= done:
        raise SystemExit(f"error: --epochs {epochs}, but {args.resume} has done {done} epochs already; give more than {done} to extend it")
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
