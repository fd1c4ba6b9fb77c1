"""A long run survives: killed (SIGKILL) or stopped (SIGTERM) in the middle of an epoch and resumed, it
ends with exactly the weights of the same run left alone; the trained dynamics are reused from the
cache, also by two runs starting at once; NaNs, bad folders, full disks and bad checkpoints end in
one line, never in a half-written file."""

import fcntl
import math
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import tyro
from test_drop import ROOT, TINY, assert_one_line_error, hopper_file, logged_scalars, run_script  # noqa: F401 (fixture)

import datasets
import drop
import dynamics
from checkpoint import atomic_save

torch.set_num_threads(1)
# Four epochs of 300 updates: about a second each, so a kill lands inside an epoch.
LONG = [*TINY, "--epochs", "4", "--steps-per-epoch", "300", "--save-every", "1", "--eval-every", "2"]
WEIGHT_KEYS = (
    "actor",
    "critic",
    "critic_target",
    "log_alpha",
    "actor_opt",
    "critic_opt",
    "alpha_opt",
    "penalty",
    "model_buffer",
    "rng",
)


def drop_argv(hopper_file: str, run_name: str, *extra: str) -> list[str]:
    return ["--env", "hopper-medium-v2", "--dataset", hopper_file, *LONG, "--run-name", run_name, *extra]


def assert_same(a, b, where=""):
    """Tensors bit for bit, nested dicts and lists entry by entry."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where


def load(path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def uninterrupted(hopper_file, workdir) -> dict:
    """The reference: the same run, never stopped (in this process, same thread count as the subprocesses)."""
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        drop.main(tyro.cli(drop.Args, args=drop_argv(hopper_file, "uninterrupted")))
    finally:
        os.chdir(cwd)
    return load(workdir / "runs" / "uninterrupted" / "checkpoint.pt")


def start_and_stop(hopper_file: str, workdir, run_name: str, signum: int) -> subprocess.CompletedProcess:
    """Start drop.py, wait for its first checkpoint, send `signum` a moment later (inside epoch 2)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "drop.py"), *drop_argv(hopper_file, run_name)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # one stream, as a terminal shows it
    checkpoint = workdir / "runs" / run_name / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert process.poll() is None, "the run ended before it could be stopped"
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert not load(checkpoint)["finished"]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def resume(workdir, run_name: str, *extra: str) -> subprocess.CompletedProcess:
    result = run_script(os.path.join(ROOT, "drop.py"), "--resume", f"runs/{run_name}", *extra, cwd=workdir)
    assert result.returncode == 0, result.stderr
    return result


def test_sigkill_mid_epoch_then_resume_gives_exactly_the_uninterrupted_run(hopper_file, workdir, uninterrupted):
    stopped = start_and_stop(hopper_file, workdir, "killed", signal.SIGKILL)
    assert stopped.returncode == -signal.SIGKILL
    assert (
        load(workdir / "runs" / "killed" / "checkpoint.pt")["epoch_progress"]["step"] == 0
    )  # periodic checkpoints sit between epochs
    (workdir / "runs" / "killed" / ".checkpoint.pt.x1y2.tmp").write_bytes(
        b"PK\x03"
    )  # as a kill during a write leaves it
    resume(workdir, "killed")
    resumed = load(workdir / "runs" / "killed" / "checkpoint.pt")
    for key in WEIGHT_KEYS:
        assert_same(resumed[key], uninterrupted[key], key)
    assert resumed["finished"] and resumed["epoch"] == 3
    assert not list((workdir / "runs" / "killed").glob("*.tmp"))
    assert [row["epoch"] for row in resumed["eval_history"]] == [1, 3]
    assert_same(
        [row["normalized_score"] for row in resumed["eval_history"]],
        [row["normalized_score"] for row in uninterrupted["eval_history"]],
    )
    # TensorBoard: every epoch once, no step twice; progress.csv: one row per evaluation.
    for tag, values in logged_scalars(str(workdir / "runs" / "killed")).items():
        assert len(values) == (2 if tag.startswith("eval/") else 4), tag
    rows = (workdir / "runs" / "killed" / "progress.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "1", "3"]


def test_sigterm_finishes_the_update_checkpoints_and_says_how_to_resume(hopper_file, workdir, uninterrupted):
    stopped = start_and_stop(hopper_file, workdir, "terminated", signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout
    line = [line for line in stopped.stdout.splitlines() if line.startswith("stopped ")]
    assert len(line) == 1 and line[0].endswith("continue with: python drop.py --resume runs/terminated"), stopped.stdout
    assert stopped.stdout.rstrip().splitlines()[-1] == line[0]  # the progress bar is not drawn again below it
    assert (
        load(workdir / "runs" / "terminated" / "checkpoint.pt")["epoch_progress"]["step"] > 0
    )  # stopped inside an epoch
    result = resume(workdir, "terminated")
    assert "resuming runs/terminated at epoch" in result.stdout
    resumed = load(workdir / "runs" / "terminated" / "checkpoint.pt")
    for key in WEIGHT_KEYS:
        assert_same(resumed[key], uninterrupted[key], key)
    for tag, values in logged_scalars(str(workdir / "runs" / "terminated")).items():
        assert len(values) == (2 if tag.startswith("eval/") else 4), tag


def test_resume_of_a_finished_run_says_so(workdir, uninterrupted, capsys):
    drop.main(drop.parse_args(["--resume", str(workdir / "runs" / "uninterrupted")]))
    assert "is finished (4 of 4 epochs); nothing to resume (a larger --epochs extends it)" in capsys.readouterr().out


def test_a_finished_run_extended_with_more_epochs_is_exactly_the_longer_run(
    hopper_file, workdir, uninterrupted, monkeypatch
):
    monkeypatch.chdir(workdir)
    drop.main(tyro.cli(drop.Args, args=drop_argv(hopper_file, "extended", "--epochs", "2")))
    assert load(workdir / "runs" / "extended" / "checkpoint.pt")["finished"]
    with pytest.raises(
        SystemExit,
        match=r"^error: --epochs 1, but runs/extended has done 2 epochs already; give more than 2 to extend it$",
    ):
        drop.main(drop.parse_args(["--resume", "runs/extended", "--epochs", "1"]))
    drop.main(drop.parse_args(["--resume", "runs/extended", "--epochs", "4"]))
    extended = load(workdir / "runs" / "extended" / "checkpoint.pt")
    for key in WEIGHT_KEYS:
        assert_same(extended[key], uninterrupted[key], key)
    assert extended["finished"] and extended["epochs"] == 4
    assert_same(
        extended["eval_history"],
        [
            row | {"wall_seconds": mine["wall_seconds"]}
            for row, mine in zip(uninterrupted["eval_history"], extended["eval_history"])
        ],
    )


def test_a_checkpoint_from_before_the_penalty_interface_resumes_exactly(
    hopper_file, workdir, uninterrupted, monkeypatch
):
    """Checkpoints written before penalties.py kept the ratio under "dice"/"dice_opt", the epoch's statistics under
    epoch_progress["dice"] and DICE's lambda as --dice.lam: such a run goes on to the same weights as one never stopped."""
    monkeypatch.chdir(workdir)
    drop.main(tyro.cli(drop.Args, args=drop_argv(hopper_file, "old-format", "--epochs", "2")))
    path = workdir / "runs" / "old-format" / "checkpoint.pt"
    checkpoint = load(path)
    penalty = checkpoint.pop("penalty")
    checkpoint["dice"], checkpoint["dice_opt"] = penalty["net"], penalty["optimizer"]
    checkpoint["epoch_progress"]["dice"] = checkpoint["epoch_progress"].pop("penalty_stats")
    checkpoint["args"]["dice"]["lam"] = None
    torch.save(checkpoint, path)
    drop.main(drop.parse_args(["--resume", "runs/old-format", "--epochs", "4"]))
    resumed = load(path)
    for key in WEIGHT_KEYS:
        assert_same(resumed[key], uninterrupted[key], key)


def test_a_new_run_never_overwrites_a_run_folder(workdir, uninterrupted, hopper_file, monkeypatch):
    monkeypatch.chdir(workdir)
    with pytest.raises(
        SystemExit,
        match=r"^error: runs/uninterrupted already holds a run; continue it with `python drop.py --resume runs/uninterrupted`",
    ):
        drop.main(tyro.cli(drop.Args, args=drop_argv(hopper_file, "uninterrupted")))


def test_resume_refuses_flags_that_change_the_run_and_takes_seed_and_learning_rates(workdir, uninterrupted):
    run = str(workdir / "runs" / "uninterrupted")
    with pytest.raises(
        SystemExit, match=r"^error: --eta 2.0 would change the run that --resume continues; only --seed"
    ):
        drop.main(drop.parse_args(["--resume", run, "--eta", "2"]))
    with pytest.raises(SystemExit, match=r"--sac.hidden 64"):
        drop.main(drop.parse_args(["--resume", run, "--sac.hidden", "64"]))
    with pytest.raises(SystemExit, match=r"--penalty none"):  # main itself checks, whoever built the arguments
        drop.main(drop.Args(resume=run, penalty="none"))
    args = drop.parse_args(
        ["--resume", run, "--seed", "5", "--sac.actor-lr", "1e-5", "--dice-lr", "1e-5", "--eval-episodes", "1"]
    )
    assert (args.seed, args.sac.actor_lr, args.dice_lr, args.sac.hidden) == (5, 1e-5, 1e-5, 32)
    assert drop.parse_args(["--resume", run]) == replace(drop.args_from_dict(uninterrupted["args"]), resume=run)


def test_cached_dynamics_are_reused_and_give_the_same_run(hopper_file, tmp_path, monkeypatch, capsys):
    """The second run on the same data, dynamics config and seed loads the ensemble and ends exactly like the first."""
    monkeypatch.setenv("DROP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = ["--env", "hopper-medium-v2", "--dataset", hopper_file, *TINY]
    drop.main(tyro.cli(drop.Args, args=[*argv, "--run-name", "first"]))
    assert "reusing" not in capsys.readouterr().out
    drop.main(tyro.cli(drop.Args, args=[*argv, "--run-name", "second"]))
    reuse = [line for line in capsys.readouterr().out.splitlines() if line.startswith("reusing")]
    first, second = (
        load(tmp_path / "runs" / "first" / "checkpoint.pt"),
        load(tmp_path / "runs" / "second" / "checkpoint.pt"),
    )
    assert (
        len(reuse) == 1
        and second["dynamics_path"] in reuse[0]
        and second["dynamics_path"].startswith(str(tmp_path / "cache"))
    )
    for key in ("actor", "critic", "penalty", "model_buffer"):
        assert_same(first[key], second[key], key)
    # Another seed or dynamics config is another key; --no-dynamics-cache trains into the run; --dynamics-path wins.
    drop.main(tyro.cli(drop.Args, args=[*argv, "--run-name", "other-seed", "--seed", "1"]))
    drop.main(tyro.cli(drop.Args, args=[*argv, "--run-name", "no-cache", "--no-dynamics-cache"]))
    drop.main(
        tyro.cli(
            drop.Args,
            args=[*argv, "--run-name", "given", "--dynamics-path", str(tmp_path / "runs" / "no-cache" / "dynamics.pt")],
        )
    )
    assert "reusing" not in capsys.readouterr().out
    assert len([name for name in os.listdir(tmp_path / "cache") if name.endswith(".pt")]) == 2
    assert load(tmp_path / "runs" / "no-cache" / "checkpoint.pt")["dynamics_path"] == str(
        tmp_path / "runs" / "no-cache" / "dynamics.pt"
    )
    assert load(tmp_path / "runs" / "given" / "checkpoint.pt")["dynamics_path"] == str(
        tmp_path / "runs" / "no-cache" / "dynamics.pt"
    )


def read_until(process: subprocess.Popen, marker: str) -> str:
    """The process's output up to the first line that contains `marker`."""
    lines = []
    while marker not in (line := process.stdout.readline()):
        assert line, f"{marker!r} never came: {''.join(lines)}"
        lines.append(line)
    return "".join(lines) + line


def test_two_runs_on_the_same_key_at_once_train_once_and_both_finish(hopper_file, tmp_path, monkeypatch):
    """Both start while a third process holds the cache entry's lock, so both must wait; then one trains, the other reuses."""
    monkeypatch.setenv("DROP_CACHE_DIR", str(tmp_path / "cache"))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    argv = ["--env", "hopper-medium-v2", "--dataset", hopper_file, *TINY]
    args = tyro.cli(drop.Args, args=argv)
    data = datasets.load_dataset(args.env, args.dataset)
    cache_file = dynamics.cache_file(data.family, data.transitions_sha256(), args.dynamics, args.seed)
    os.makedirs(os.path.dirname(cache_file))
    with open(cache_file + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = [
            subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "drop.py"), *argv, "--run-name", name],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in ("a", "b")
        ]
        waited = [read_until(run, "waiting for another run") for run in runs]
        fcntl.flock(lock, fcntl.LOCK_UN)
    outputs = [
        (before + stdout, stderr)
        for before, (stdout, stderr) in zip(waited, (run.communicate(timeout=120) for run in runs))
    ]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert all("waiting for another run" in stdout for stdout, _ in outputs)
    assert sum("reusing the trained ensemble" in stdout for stdout, _ in outputs) == 1
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(
        [os.path.basename(cache_file), os.path.basename(cache_file) + ".lock"]
    )
    assert_same(
        load(tmp_path / "runs" / "a" / "checkpoint.pt")["actor"],
        load(tmp_path / "runs" / "b" / "checkpoint.pt")["actor"],
    )


def test_a_nan_stops_the_run_naming_epoch_and_quantity_and_resume_with_another_seed_works(
    hopper_file, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    argv = [
        "--env",
        "hopper-medium-v2",
        "--dataset",
        hopper_file,
        *TINY,
        "--epochs",
        "3",
        "--save-every",
        "1",
        "--run-name",
        "nan",
    ]
    batches = 0
    mixed_batch = drop.mixed_batch

    def poisoned_batch(*a):  # from epoch 2 on, a NaN reward reaches SAC, as from a broken model
        nonlocal batches
        batches += 1
        batch = mixed_batch(*a)
        return batch._replace(rew=batch.rew * math.nan) if batches > 20 else batch

    with monkeypatch.context() as patch:
        patch.setattr(drop, "mixed_batch", poisoned_batch)
        with pytest.raises(
            SystemExit,
            match=r"^error: sac/critic_loss is nan in epoch 2; the last good checkpoint \(epoch 1\) stays: python drop.py --resume runs/nan",
        ):
            drop.main(tyro.cli(drop.Args, args=argv))
    checkpoint = load(tmp_path / "runs" / "nan" / "checkpoint.pt")
    assert checkpoint["epoch"] == 0 and all(torch.isfinite(v).all() for v in checkpoint["actor"].values())
    drop.main(
        drop.parse_args(["--resume", "runs/nan", "--seed", "1", "--sac.critic-lr", "1e-4", "--dice.nu-lr", "1e-3"])
    )
    resumed = load(tmp_path / "runs" / "nan" / "checkpoint.pt")
    assert resumed["finished"] and resumed["args"]["seed"] == 1
    assert [group["lr"] for group in resumed["critic_opt"]["param_groups"]] == [1e-4]
    assert resumed["penalty"]["optimizer"]["param_groups"][2]["lr"] == 1e-3  # tau, f, nu


def test_unwritable_runs_or_cache_folder_is_one_line_before_training(hopper_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--env", "hopper-medium-v2", "--dataset", hopper_file, *TINY]
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    with pytest.raises(
        SystemExit, match=r"^error: the runs folder runs/x is not writable .*; run from a folder you can write to"
    ) as error:
        drop.main(tyro.cli(drop.Args, args=[*argv, "--run-name", "x"]))
    assert "\n" not in str(error.value) and "dynamics:" not in capsys.readouterr().err
    (tmp_path / "runs").unlink()
    (tmp_path / "blocker").write_text("")
    monkeypatch.setenv("DROP_CACHE_DIR", str(tmp_path / "blocker" / "cache"))
    with pytest.raises(
        SystemExit,
        match=r"^error: the dynamics cache folder .*blocker/cache is not writable .*; set DROP_CACHE_DIR to a writable folder or pass --no-dynamics-cache",
    ):
        drop.main(tyro.cli(drop.Args, args=[*argv, "--run-name", "y"]))


def test_a_full_disk_at_the_checkpoint_is_one_line_and_leaves_no_partial_file(hopper_file, tmp_path):
    """A file-size limit makes the checkpoint write fail for real (EFBIG), like a full disk (ENOSPC)."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))  # the tiny checkpoint is 1.5 MB

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    argv = ["--env", "hopper-medium-v2", "--dataset", hopper_file, *TINY, "--run-name", "full"]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "drop.py"), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    result.stderr = "\n".join(line for line in result.stderr.splitlines() if "%|" not in line)  # progress bars
    assert_one_line_error(result, "could not write runs/full/checkpoint.pt", "File too large")
    names = os.listdir(tmp_path / "runs" / "full")
    assert "checkpoint.pt" not in names and not [name for name in names if name.endswith(".tmp")], names


def test_atomic_save_keeps_the_previous_file_when_a_write_fails(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    atomic_save({"x": torch.ones(3)}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(SystemExit, match=r"^error: could not write .*checkpoint.pt \(File too large\)"):
            atomic_save({"x": torch.zeros(1_000_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert torch.equal(load(path)["x"], torch.ones(3))


def test_truncated_or_foreign_checkpoints_are_one_line_for_resume_and_eval(workdir, uninterrupted, tmp_path):
    data = (workdir / "runs" / "uninterrupted" / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "foreign").mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "foreign" / "checkpoint.pt")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "checkpoint.pt").write_text("not a checkpoint")
    for name, fragment in (
        ("truncated", "not a readable drop.py checkpoint"),
        ("foreign", "missing"),
        ("text", "not a readable drop.py checkpoint"),
    ):
        with pytest.raises(SystemExit, match=rf"^error: .*{name}/checkpoint.pt .*{fragment}") as error:
            drop.parse_args(["--resume", str(tmp_path / name)])
        assert "\n" not in str(error.value)
    for name in ("truncated", "foreign"):
        assert_one_line_error(
            run_script(os.path.join(ROOT, "eval.py"), str(tmp_path / name), cwd=tmp_path), f"{name}/checkpoint.pt"
        )
