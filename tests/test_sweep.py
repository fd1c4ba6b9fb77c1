"""sweep.py: a tiny grid (two built-in datasets x two penalties x two seeds) on a local Ray with 2
CPUs fills every cell of the table even when one run's Ray worker is SIGKILLed mid-sweep; the same
command again trains nothing; the CSV's scores are the checkpoints'. The statistics match
hand-computed values."""

import csv
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch
import tyro

import datasets
import sweep

ENVS = ["builtin-hopper-medium", "builtin-halfcheetah-medium"]
TINY = [
    "--epochs", "2", "--steps-per-epoch", "20", "--rollout-freq", "20", "--rollout-batch-size", "100",
    "--eval-every", "1", "--eval-episodes", "1", "--dice-steps", "5", "--dice.pretrain-steps", "5",
    "--sac.hidden", "16", "--sac.batch-size", "64",
    "--dynamics.num-members", "3", "--dynamics.num-elites", "2", "--dynamics.hidden", "8", "--dynamics.max-epochs", "1",
]  # fmt: skip
GRID = ["--envs", *ENVS, "--penalties", "drop", "none", "--seeds", "0", "1", "--name", "tiny", *TINY]
KILLED_RUN = "builtin-halfcheetah-medium__drop__eta1__seed1"


def run_sweep(argv: list[str]) -> list[dict]:
    return sweep.main(*tyro.cli(sweep.Args, args=argv, return_unknown_args=True))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working folder, a built-in data cache holding 2000-step collections under the built-in
    names (the real ones have 200,000), and one local Ray with 2 CPUs for every test here."""
    workdir = tmp_path_factory.mktemp("work")
    collect = datasets.collect
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DROP_DATA_DIR", str(workdir / "data"))  # set before Ray starts, so that its workers see it
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.chdir(workdir)
        with pytest.MonkeyPatch.context() as small:
            small.setattr(
                datasets,
                "collect",
                lambda env_id, policy, num_transitions, seed, out: collect(env_id, policy, 2000, seed, out),
            )
            for env in ENVS:
                datasets.load_dataset(env)
        sweep.start_ray(None, 2)
        try:
            yield workdir
        finally:
            ray.shutdown()


def drop_processes(run_name: str, sweep_dir: str) -> list[int]:
    """Process ids of drop.py commands running `run_name` in `sweep_dir` (not another sweep's run of the same name)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                argv = file.read().decode().split("\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if any(arg.endswith("drop.py") for arg in argv) and run_name in argv and os.path.samefile(cwd, sweep_dir):
            pids.append(int(pid))
    return pids


def process_state(pid: int) -> tuple[str, int]:
    """State letter (R, S, Z, ...) and parent id of a process; ("gone", 0) once it is reaped."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            state, parent = file.read().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return "gone", 0
    return state, int(parent)


def kill_worker_once_started(run_dir: str, run_name: str, killed: dict, stop: threading.Event):
    """SIGKILL the Ray worker of `run_name` once its drop.py has made the run folder."""
    while not stop.is_set():
        pids = drop_processes(run_name, os.path.dirname(os.path.dirname(run_dir))) if os.path.isdir(run_dir) else []
        if pids:
            killed["worker_pid"] = worker = process_state(pids[0])[1]
            with open(f"/proc/{worker}/cmdline", "rb") as file:
                assert file.read().startswith(b"ray::"), (
                    "the drop.py's parent is not a Ray worker"
                )  # never kill anything else
            os.kill(worker, signal.SIGKILL)
            deadline = time.monotonic() + 2.0  # the tiny run has seconds left: alive after this, it outlived its worker
            while process_state(pids[0])[0] not in ("Z", "gone") and time.monotonic() < deadline:
                time.sleep(0.02)
            killed["drop_state_after"] = process_state(pids[0])[0]
            return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def tiny_sweep(workdir):
    """The grid run once, with one run's Ray worker killed in the middle of that run."""
    killed, stop = {}, threading.Event()
    killer = threading.Thread(
        target=kill_worker_once_started, args=(str(workdir / "sweeps/tiny/runs" / KILLED_RUN), KILLED_RUN, killed, stop)
    )
    killer.start()
    try:
        rows = run_sweep(GRID)
    finally:
        stop.set()
        killer.join()
    return rows, killed


def test_every_cell_filled_although_a_worker_was_killed(tiny_sweep, workdir):
    rows, killed = tiny_sweep
    assert killed, "the run to kill never started"
    assert killed["drop_state_after"] in ("Z", "gone"), "the killed worker's drop.py lives on"
    assert len(rows) == 8 and all(row["epochs"] == 2 for row in rows)
    assert {(row["dataset"], row["penalty"], row["seed"]) for row in rows} == {
        (e, p, s) for e in ENVS for p in ("drop", "none") for s in (0, 1)
    }
    table = (workdir / "sweeps/tiny/table.md").read_text()
    for env in ENVS:
        line = next(line for line in table.splitlines() if line.startswith(f"| {env} |"))
        assert line.count("(2)") == 2, line  # drop and none, two seeds each
    assert "Failed" not in table and "P(X > Y)" in table
    assert (workdir / "sweeps/tiny/curves.png").stat().st_size > 1000


def test_csv_scores_are_the_checkpoint_scores(tiny_sweep, workdir):
    with open(workdir / "sweeps/tiny/results.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8
    for row in rows:
        checkpoint = torch.load(workdir / "sweeps/tiny" / row["run_dir"] / "checkpoint.pt", weights_only=True)
        assert float(row["normalized_score"]) == checkpoint["normalized_score"]
        assert row["host"] and float(row["wall_seconds"]) > 0


def test_runs_share_one_ensemble_per_dataset_and_seed(tiny_sweep, workdir):
    ensembles = sorted(os.listdir(workdir / "sweeps/tiny/dynamics"))
    assert ensembles == sorted(f"{env}__seed{seed}.pt" for env in ENVS for seed in (0, 1))
    for row in tiny_sweep[0]:
        checkpoint = torch.load(workdir / "sweeps/tiny" / row["run_dir"] / "checkpoint.pt", weights_only=True)
        assert checkpoint["args"]["dynamics_path"].endswith(f"dynamics/{row['dataset']}__seed{row['seed']}.pt")


def test_rerun_trains_nothing(tiny_sweep, workdir, capsys, monkeypatch):
    # Checkpoints, ensembles, and the logs that every started script writes: none may change.
    def no_data(env, *_):
        raise AssertionError(f"the report of a finished sweep read {env} again")

    monkeypatch.setattr(sweep, "load_dataset", no_data)  # its data line comes from data_scores.json
    outputs = [
        *(workdir / "sweeps/tiny").glob("runs/*/checkpoint.pt"),
        *(workdir / "sweeps/tiny").glob("dynamics/*.pt"),
        *(workdir / "sweeps/tiny").glob("logs/*.log"),
    ]
    assert len(outputs) == 8 + 4 + (8 + 4)  # checkpoints, ensembles, logs of runs and ensembles
    before = {path: path.stat().st_mtime_ns for path in outputs}
    rows = run_sweep(GRID)
    assert "8 already finished, 0 to run" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in outputs} == before
    assert [row["normalized_score"] for row in rows] == [row["normalized_score"] for row in tiny_sweep[0]]


def test_report_only_tabulates_unfinished_runs_and_starts_nothing(tiny_sweep, workdir):
    argv = GRID.copy()
    argv[argv.index("--epochs") + 1] = "3"  # every run is now one epoch short of the plan
    outputs = [*(workdir / "sweeps/tiny").glob("runs/*/checkpoint.pt"), *(workdir / "sweeps/tiny").glob("logs/*.log")]
    before = {path: path.stat().st_mtime_ns for path in outputs}
    rows = run_sweep([*argv, "--report-only"])
    assert [row["epochs"] for row in rows] == [2] * 8
    assert [row["normalized_score"] for row in rows] == [row["normalized_score"] for row in tiny_sweep[0]]
    assert {path: path.stat().st_mtime_ns for path in outputs} == before
    assert "--report-only" in (workdir / "sweeps/tiny/table.md").read_text().splitlines()[0]
    with pytest.raises(SystemExit, match="no sweep 'elsewhere' here.*without --report-only"):
        run_sweep(["--envs", *ENVS, "--name", "elsewhere", "--report-only"])


def test_report_only_keeps_the_rows_of_runs_whose_folders_are_gone(tiny_sweep, workdir):
    """A study outlives its machines through results.csv: a run whose folder is lost keeps its last
    row, every number of it, and the table's title names it; a run that has its folder is read from it."""
    moved = workdir / "sweeps/moved"
    shutil.copytree(workdir / "sweeps/tiny", moved)
    lost = "builtin-hopper-medium__drop__eta5__seed0"
    shutil.rmtree(moved / "runs" / lost)
    argv = [*GRID[: GRID.index("--name")], "--name", "moved", *TINY, "--report-only"]
    rows = run_sweep(argv)
    assert rows == tiny_sweep[0]
    assert (
        f"1 of them from the last results.csv, their folders not here ({lost})"
        in (moved / "table.md").read_text().splitlines()[0]
    )
    with open(moved / "results.csv") as file:
        assert [row["run_dir"] for row in csv.DictReader(file)] == [row["run_dir"] for row in tiny_sweep[0]]
    os.remove(moved / "results.csv")  # nothing to keep them from: the lost run leaves the table
    assert len(run_sweep(argv)) == len(tiny_sweep[0]) - 1


def test_critic_columns_unknown_to_older_checkpoints_and_results_show_as_a_dash(tmp_path):
    """A checkpoint or results.csv from before drop.py kept a critic column: the column is NaN (the table's dash), not never."""
    health = {"max_critic_loss": 9.0, "max_alpha": 0.5, "diverging_since": None}
    assert sweep.critic_columns(health | {"overestimating_since": 2})["overestimating_since"] == 3  # 1-based
    columns = sweep.critic_columns(health)
    assert np.isnan(columns["overestimating_since"]) and columns["diverging_since"] == 0
    assert all(np.isnan(value) for value in sweep.critic_columns(None).values())
    run = sweep.Run("hopper-medium-v2", "hopper-medium", "drop", 5.0, 0, 7, "drop")
    older = {"dataset": "hopper-medium-v2", "penalty": "drop", "eta": 5.0, "seed": 0, "epochs": 7}
    older |= {"normalized_score": 3.5, "wall_seconds": 1.0, "host": "h", "run_dir": os.path.join("runs", run.name)}
    older |= {"max_critic_loss": 9.0, "max_alpha": 0.5, "diverging_since": 0}
    sweep.write_csv(str(tmp_path / "results.csv"), [older])
    (row,) = sweep.kept_rows(str(tmp_path), [run]).values()
    assert np.isnan(row.pop("overestimating_since")) and row == older
    assert [sweep.since_epoch(epoch) for epoch in (float("nan"), 0, 5)] == ["—", "never", "epoch 5"]


@pytest.mark.parametrize("flag, old, new", [("--sac.hidden", "16", "32"), ("--dynamics.hidden", "8", "16")])
def test_rerun_with_other_settings_is_refused(tiny_sweep, flag, old, new):
    """Finished runs and ensembles made with other flags would mix two experiments in one table."""
    argv = GRID.copy()
    argv[argv.index(flag) + 1] = new
    with pytest.raises(SystemExit, match=f"{flag} {old} then, {new} now"):
        run_sweep(argv)


def test_cut_off_run_starts_over_without_resume(tmp_path):
    """A checkpoint short of the planned epochs is not finished; without a "finished" key it cannot be resumed."""
    run_dir = tmp_path / "run"
    assert sweep.resume_flags(str(run_dir), 2) == []
    run_dir.mkdir()
    torch.save({"epoch": 0, "normalized_score": 1.0}, run_dir / "checkpoint.pt")
    assert sweep.resume_flags(str(run_dir), 2) == []
    assert sweep.resume_flags(str(run_dir), 1) is None
    torch.save({"epoch": 0, "normalized_score": 1.0, "finished": False, "epochs": 2}, run_dir / "checkpoint.pt")
    assert sweep.resume_flags(str(run_dir), 2) == ["--resume", str(run_dir), "--epochs", "2"]
    torch.save({"epoch": 1, "normalized_score": 1.0, "finished": True, "epochs": 2}, run_dir / "checkpoint.pt")
    assert sweep.resume_flags(str(run_dir), 2) is None
    assert sweep.resume_flags(str(run_dir), 5) == ["--resume", str(run_dir), "--epochs", "5"]  # extended


def test_more_epochs_extend_the_finished_runs_and_fewer_are_refused(tiny_sweep, workdir, capsys):
    """Last of the tests on the tiny sweep: it extends one of its runs."""
    one_run = ["--envs", "builtin-hopper-medium", "--penalties", "drop", "--seeds", "0", "--name", "tiny", *TINY]
    ensemble = workdir / "sweeps/tiny/dynamics/builtin-hopper-medium__seed0.pt"
    trained = ensemble.stat().st_mtime_ns
    first_part = torch.load(
        workdir / "sweeps/tiny/runs/builtin-hopper-medium__drop__eta5__seed0/checkpoint.pt", weights_only=True
    )["wall_seconds"]
    [row] = run_sweep([*one_run, "--epochs", "3"])
    assert "0 already finished, 1 to run" in capsys.readouterr().out
    checkpoint = torch.load(workdir / "sweeps/tiny" / row["run_dir"] / "checkpoint.pt", weights_only=True)
    assert (row["epochs"], checkpoint["finished"], ensemble.stat().st_mtime_ns) == (3, True, trained)
    assert (
        row["wall_seconds"] == round(checkpoint["wall_seconds"], 1) > round(first_part, 1)
    )  # both parts, not the last process's
    assert [entry["epoch"] for entry in checkpoint["eval_history"]] == [0, 1, 2]  # continued, not started over
    with pytest.raises(
        SystemExit, match=r"has done 3 epochs, more than this sweep's 2; a sweep can extend its runs, not shorten them"
    ):
        run_sweep(one_run)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "3"], "--seed is set by sweep.py"),
        (["--run_name=x"], "--run_name=x is set by sweep.py"),
        (["--epochz", "3"], "drop.py does not take `--epochz 3`"),
        (["--envs", "hopper-mediocre-v2"], "unknown dataset 'hopper-mediocre-v2'"),
        (["--address", "auto", "--num-cpus", "2"], "--num-cpus sizes a local Ray"),
    ],
)
def test_bad_flags_end_in_one_line_before_anything_runs(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message) as error:
        run_sweep(argv)
    assert str(error.value).startswith("error: ") and "\n" not in str(error.value)
    assert not (tmp_path / "sweeps").exists()


def test_grid_defaults_to_table_etas_and_runs_none_once():
    runs = sweep.plan(
        tyro.cli(
            sweep.Args,
            args=["--envs", "hopper-medium-v2", "halfcheetah-random-v2", "--penalties", "drop", "none", "--seeds", "0"],
        ),
        sweep.drop.Args(),
    )
    assert [(r.task, r.penalty, r.eta, r.epochs, r.column) for r in runs] == [
        ("hopper-medium", "drop", 5.0, 1500, "drop"), ("hopper-medium", "none", 0.0, 1500, "none"),
        ("halfcheetah-random", "drop", 0.5, 500, "drop"), ("halfcheetah-random", "none", 0.0, 500, "none"),
    ]  # fmt: skip
    runs = sweep.plan(
        tyro.cli(sweep.Args, args=["--penalties", "drop", "none", "--etas", "1", "2", "--seeds", "0"]),
        sweep.drop.Args(epochs=3),
    )
    assert [(r.penalty, r.eta, r.epochs, r.column) for r in runs] == [
        ("drop", 1.0, 3, "drop eta=1"),
        ("drop", 2.0, 3, "drop eta=2"),
        ("none", 0.0, 3, "none"),
    ]


def test_variants_are_columns_of_drop_runs_with_their_own_flags():
    args = tyro.cli(sweep.Args, args=["--envs", "builtin-halfcheetah-medium", "--penalties", "drop", "mopo", "--seeds", "0",
                                      "--variants", "checked=--dice.preset checked", "classifier=--ratio classifier"])  # fmt: skip
    runs = sweep.plan(args, sweep.drop.Args(epochs=4))
    assert [(r.name, r.column, r.eta, r.flags) for r in runs] == [
        ("builtin-halfcheetah-medium__drop__eta1__seed0", "drop", 1.0, ()),
        ("builtin-halfcheetah-medium__drop-checked__eta1__seed0", "drop (checked)", 1.0, ("--dice.preset", "checked")),
        ("builtin-halfcheetah-medium__drop-classifier__eta1__seed0", "drop (classifier)", 1.0, ("--ratio", "classifier")),
        ("builtin-halfcheetah-medium__mopo__eta1__seed0", "mopo", 1.0, ()),  # MOPO's own lambda for halfcheetah-medium
    ]  # fmt: skip


def test_flags_for_drops_ratio_go_to_the_drop_runs_alone():
    """drop.py refuses a ratio flag with --penalty mopo|none, so a sweep gives them to its drop runs (and their variants) only."""
    passthrough = ["--dice-steps", "5", "--epochs", "4", "--clip", "0.1", "3", "--dice.nu-lr", "0.01", "--horizon", "7"]
    shared, ratio_only = sweep.ratio_flags_apart(passthrough)
    assert (shared, ratio_only) == (
        ["--epochs", "4", "--horizon", "7"],
        ["--dice-steps", "5", "--clip", "0.1", "3", "--dice.nu-lr", "0.01"],
    )
    args = tyro.cli(sweep.Args, args=["--envs", "builtin-hopper-medium", "--penalties", "drop", "mopo", "none", "--seeds", "0",
                                      "--variants", "checked=--dice.preset checked"])  # fmt: skip
    runs = sweep.plan(args, sweep.drop_flags_checked(shared), tuple(ratio_only))
    assert [(r.penalty, r.variant, r.flags) for r in runs] == [
        ("drop", "", tuple(ratio_only)), ("drop", "checked", (*ratio_only, "--dice.preset", "checked")), ("mopo", "", ()), ("none", "", ()),
    ]  # fmt: skip


def test_the_none_runs_took_none_of_drops_flags(tiny_sweep, workdir):
    """TINY's --dice-steps 5 --dice.pretrain-steps 5 reached the drop runs and not the MBPO ones."""
    for row in tiny_sweep[0]:
        args = torch.load(workdir / "sweeps/tiny" / row["run_dir"] / "checkpoint.pt", weights_only=True)["args"]
        drop_run = row["penalty"] == "drop"
        assert (args["dice_steps"], args["dice"]["pretrain_steps"]) == ((5, 5) if drop_run else (None, 100))


@pytest.mark.parametrize(
    "variant", ["checked", "=--ratio classifier", "a b=--ratio classifier", "x=--seed 3", "x=--no-such-flag"]
)
def test_a_bad_variant_is_refused_in_one_line(variant):
    with pytest.raises(SystemExit, match="^error: ") as error:
        sweep.plan(
            tyro.cli(sweep.Args, args=["--penalties", "drop", "--seeds", "0", "--variants", variant]), sweep.drop.Args()
        )
    assert "\n" not in str(error.value)


def test_table_puts_the_paper_beside_ours_and_leaves_gaps_visible():
    runs = sweep.plan(
        tyro.cli(
            sweep.Args,
            args=[
                "--envs",
                "hopper-medium-v2",
                "builtin-halfcheetah-medium",
                "--penalties",
                "drop",
                "none",
                "--seeds",
                "0",
                "1",
            ],
        ),
        sweep.drop.Args(),
    )
    scores = iter([10.0, 20.0, 5.0, 5.0, 30.0, 50.0, 7.0])  # the last run (halfcheetah, none, seed 1) failed
    health = lambda i: {
        "epochs": 3,
        "max_critic_loss": 40.0 + i,
        "max_alpha": 0.5,
        "overestimating_since": 1 if i == 1 else 4 if i == 2 else 0,
        "diverging_since": 2 if i == 1 else 0,
    }
    rows = {run: {"normalized_score": score, **health(i)} for i, (run, score) in enumerate(zip(runs, scores))}
    table = sweep.format_table("Sweep `t`", runs, rows, ["halfcheetah none seed 1: it broke"], reps=100)
    # every run's critic, an over-estimating and a diverged one marked
    assert f"| {runs[0].name} | 3 | 10.0 | 40 | 0.5 | never | never |" in table
    assert f"| {runs[1].name} | 3 | 20.0 | 41 | 0.5 | epoch 1 | epoch 2 |" in table
    assert f"| {runs[2].name} | 3 | 5.0 | 42 | 0.5 | epoch 4 | never |" in table  # over-estimating, not diverging
    assert "| hopper-medium-v2 | 15.0 ± 7.1 (2) | 5.0 ± 0.0 (2) | 52.1 | 26.3 | 4.9 |" in table
    assert "| builtin-halfcheetah-medium | 40.0 ± 14.1 (2) | 7.0 (1) | 50.2† | 42.3† | 28.3† |" in table
    assert "| drop | 25.0 |" in table  # IQM of 10, 20, 30, 50
    assert (
        "| none | 5.7 |" in table and "Not aggregated" not in table
    )  # a missing seed still leaves a score on each dataset
    assert "| drop | none | 1.00 |" in table and "- halfcheetah none seed 1: it broke" in table
    rows.pop(runs[2])
    rows.pop(runs[3])
    table = sweep.format_table("Sweep `t`", runs, rows, [], reps=100)
    assert (
        "| hopper-medium-v2 | 15.0 ± 7.1 (2) | — |" in table
        and "Not aggregated, for lack of a score on every dataset: none." in table
    )
    assert "P(X > Y)" not in table


# ---------------------------------------------------------------------------------------------
# Statistics, against values worked out by hand


def test_iqm_drops_the_lowest_and_highest_quarter():
    assert sweep.iqm(np.arange(1.0, 9.0)) == 4.5  # mean of 3, 4, 5, 6
    assert sweep.iqm(np.array([0.0, 0.0, 0.0, 100.0])) == 0.0  # one of four cut at each end
    assert sweep.iqm(np.array([1.0, 2.0, 30.0])) == 11.0  # n < 4 cuts nothing
    np.testing.assert_allclose(sweep.iqm(np.array([[1.0, 2, 3, 4], [8, 4, 2, 6]])), [2.5, 5.0])  # along the last axis


def test_probability_of_improvement_counts_ties_half_and_averages_tasks():
    # Task 1: pairs (1,2) loses, (1,0) wins, (2,2) ties, (2,0) wins -> 2.5 / 4. Task 2: X always wins -> 1.
    x = [np.array([1.0, 2.0]), np.array([5.0])]
    y = [np.array([2.0, 0.0]), np.array([3.0, 4.0])]
    assert sweep.probability_of_improvement(x, y) == pytest.approx((0.625 + 1.0) / 2)
    assert sweep.probability_of_improvement(y, x) == pytest.approx((0.375 + 0.0) / 2)


def test_bootstrap_resamples_within_each_task_only():
    """Two tasks at 0 and 10, two runs each: every stratified resample holds two 0s and two 10s,
    so the IQM (the mean of the middle two) is 5 every time; pooling the tasks would vary it."""
    value, interval = sweep.iqm_with_ci([np.zeros(2), np.full(2, 10.0)], reps=2000)
    assert value == 5.0 and interval == (5.0, 5.0)


def test_bootstrap_percentile_interval_of_a_two_run_task():
    """Runs 0 and 1: a resample's mean is 0, 0.5 or 1 with chances 1/4, 1/2, 1/4, so the 95% interval is [0, 1]
    and the 50% interval is [0.5, 0.5]."""
    runs = [np.array([0.0, 1.0])]
    assert sweep.iqm_with_ci(runs, reps=4000) == (0.5, (0.0, 1.0))
    boot = sweep.iqm(np.concatenate(sweep.stratified_resample(runs, 4000, np.random.default_rng(0)), -1))
    assert sweep.percentile_interval(boot, confidence=0.5) == (0.5, 0.5)
    value, interval = sweep.improvement_with_ci([np.array([1.0, 2.0])], [np.array([0.0, 0.5])], reps=1000)
    assert value == 1.0 and interval == (1.0, 1.0)


def test_the_data_line_is_the_score_of_the_datasets_own_episodes(tiny_sweep, workdir):
    with open(workdir / "sweeps/tiny/data_scores.json") as file:
        scores = json.load(file)
    assert set(scores) == set(ENVS)
    data = datasets.load_dataset(ENVS[0])
    ends = np.flatnonzero(data.terminals | data.timeouts)
    returns = [data.rewards[start : end + 1].sum() for start, end in zip([0, *(ends[:-1] + 1)], ends)]
    assert scores[ENVS[0]] == pytest.approx(
        float(
            np.mean(
                100 * (np.array(returns) - datasets.REF_SCORES["hopper"][0]) / np.diff(datasets.REF_SCORES["hopper"])[0]
            )
        ),
        rel=1e-4,
    )


def test_the_data_scores_record_keeps_earlier_datasets(tmp_path):
    """A sweep extended by a dataset keeps the line of the ones it prepared before; nothing new, nothing written."""
    assert sweep.record_data_scores(str(tmp_path), {}) == {} and not os.listdir(tmp_path)
    sweep.record_data_scores(str(tmp_path), {"a": 1.0, "b": 2.0})
    assert sweep.record_data_scores(str(tmp_path), {"b": 3.0, "c": 4.0}) == {"a": 1.0, "b": 3.0, "c": 4.0}
    assert sweep.record_data_scores(str(tmp_path), {}) == {"a": 1.0, "b": 3.0, "c": 4.0}


def script(tmp_path, body: str) -> str:
    path = tmp_path / "script.py"
    path.write_text(body)
    return str(path)


def test_a_script_stopped_by_a_signal_stops_the_sweep_and_one_that_fails_does_not(tmp_path):
    """drop.py and dynamics.py exit with 128 + the signal after saving their state: not a failure, not
    retried, and from then on no script of the sweep starts."""
    (tmp_path / "logs").mkdir()
    log = str(tmp_path / "logs/run.log")
    with pytest.raises(sweep.ScriptFailed, match="exited with 3: broken"):
        sweep.run_script([script(tmp_path, "print('broken'); raise SystemExit(3)")], str(tmp_path), log, 1)
    assert not os.path.exists(sweep.stop_file(str(tmp_path)))
    with pytest.raises(sweep.ScriptStopped, match="script.py stopped in epoch 2"):
        sweep.run_script(
            [script(tmp_path, "print('stopped in epoch 2'); raise SystemExit(128 + 15)")], str(tmp_path), log, 1
        )
    assert os.path.exists(sweep.stop_file(str(tmp_path)))
    ran = tmp_path / "ran"
    with pytest.raises(sweep.ScriptStopped, match="not started: the sweep is stopping"):
        sweep.run_script([script(tmp_path, f"open({str(ran)!r}, 'w')")], str(tmp_path), log, 1)
    assert not ran.exists()


def test_a_running_script_is_asked_to_stop_once_the_sweep_stops(tmp_path):
    (tmp_path / "logs").mkdir()
    body = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda signum, frame: (print('saved'), sys.exit(128 + signum)))\n"
        "print('running', flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "logs/run.log"
    threading.Timer(1.0, lambda: open(sweep.stop_file(str(tmp_path)), "a").close()).start()
    started = time.monotonic()
    with pytest.raises(sweep.ScriptStopped, match="saved"):
        sweep.run_script([script(tmp_path, body)], str(tmp_path), str(log), 1)
    assert time.monotonic() - started < 10


def sigterm_once(ready, timeout: float = 120.0):
    """SIGTERM to this process (the sweep's driver) once ready() holds."""

    def wait_then_signal():
        deadline = time.monotonic() + timeout
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_then_signal, daemon=True).start()


def test_sigterm_to_the_sweep_saves_the_running_runs_and_starts_no_new_one(tiny_sweep, workdir):
    """The first SIGTERM (or Ctrl-C) reaches each running drop.py, which saves its state; the queued
    run does not start; the sweep ends with one line; the same command carries on."""
    stopped_dir = workdir / "sweeps/stopped"
    (stopped_dir / "dynamics").mkdir(parents=True)
    shutil.copy(
        workdir / "sweeps/tiny/dynamics/builtin-hopper-medium__seed0.pt", stopped_dir / "dynamics"
    )  # no ensemble to train
    argv = ["--envs", "builtin-hopper-medium", "--penalties", "drop", "mopo", "none", "--seeds", "0"]
    argv += ["--name", "stopped", *TINY]
    argv[argv.index("--epochs") + 1] = "300"  # about 30 s a run: signalled long before the end
    stop_line = "^stopped: 3 of 3 runs saved their state or did not start; the same command carries on from there$"
    training = lambda: list(stopped_dir.glob("runs/*/progress.csv"))

    sigterm_once(lambda: len(training()) == 2)
    with pytest.raises(SystemExit, match=stop_line):
        run_sweep(argv)
    started = sorted(path.parent.name for path in training())
    assert len(started) == 2 and len(os.listdir(stopped_dir / "runs")) == 2  # the third was queued behind the 2 CPUs
    stopped_at = {}
    for name in started:
        checkpoint = torch.load(stopped_dir / "runs" / name / "checkpoint.pt", weights_only=True)
        assert not checkpoint["finished"] and checkpoint["epoch"] < 299
        stopped_at[name] = checkpoint["epoch"]
        assert "continue with: python drop.py --resume" in (stopped_dir / "logs" / f"{name}.log").read_text()
    assert "Failed" not in (stopped_dir / "table.md").read_text()

    rows = lambda: sum(len(path.read_text().splitlines()) for path in training())
    evaluated = rows()
    sigterm_once(lambda: rows() >= evaluated + 2)  # the same command: both runs carry on (the third waits again)
    with pytest.raises(SystemExit, match=stop_line):
        run_sweep(argv)
    assert len(os.listdir(stopped_dir / "runs")) == 2
    for name in started:
        checkpoint = torch.load(stopped_dir / "runs" / name / "checkpoint.pt", weights_only=True)
        assert checkpoint["epoch"] > stopped_at[name]
        assert [entry["epoch"] for entry in checkpoint["eval_history"]] == list(range(len(checkpoint["eval_history"])))


def test_curves_draw_one_line_per_column_and_none_in_the_datas_gray(tmp_path, monkeypatch):
    import matplotlib.figure
    from matplotlib.colors import to_hex

    from checkpoint import write_progress

    runs = [sweep.Run("env", "hopper-medium", "drop", 1.0, 0, 2, f"column {i}", f"v{i}") for i in range(9)]
    for i, run in enumerate(runs):
        os.makedirs(tmp_path / "runs" / run.name)
        rows = [{"epoch": epoch, "normalized_score": float(i + epoch)} for epoch in (0, 1)]
        write_progress(str(tmp_path / "runs" / run.name / "progress.csv"), rows)
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, path, **_: drawn.append(figure))
    monkeypatch.setattr(os, "replace", lambda *_: None)  # nothing was written to move into place
    sweep.plot_curves(str(tmp_path / "curves.png"), runs, str(tmp_path), {"env": 40.0})
    lines = drawn[0].axes[0].lines
    columns = [line for line in lines if line.get_linestyle() == "-"]
    assert len(columns) == 9 and [line.get_ydata()[0] for line in columns] == list(range(9))
    (data,) = [line for line in lines if line.get_linestyle() == "--"]
    assert to_hex(data.get_color()) == "#808080"
    assert all(to_hex(line.get_color()) != "#7f7f7f" for line in columns), (
        "a column drawn in the gray of the data's line"
    )
