"""Files that must survive a kill: atomic writes, RNG states, buffers, one-line errors on bad files.

A drop.py checkpoint is a dict of tensors and plain Python values, so `torch.load(path,
weights_only=True)` reads it without running any pickled code. This file holds the parts of
saving and restoring that do not depend on what a run contains; drop.py decides what goes in.
"""

import contextlib
import fcntl
import os
import random
import tempfile
from typing import IO, Callable

import numpy as np
import torch

from sac import ReplayBuffer


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
