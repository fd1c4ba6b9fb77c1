"""Sweeps: a grid of drop.py runs on Ray, and the paper's Table 1 with honest statistics.

    python sweep.py --envs builtin-hopper-medium builtin-halfcheetah-medium --penalties drop mopo none --seeds 0 1 --epochs 100

Every (dataset, penalty, eta, seed) is one `python drop.py` run, executed as a Ray task; every
other flag (`--epochs`, `--sac.hidden`, ...) goes to drop.py unchanged. The dynamics ensemble of
each (dataset, seed) is trained once, by its own Ray task that the runs of the pair wait for, and
shared by the pair's penalties and etas. Everything lands in sweeps/NAME/:

    runs/RUN/        drop.py's run folders (checkpoint.pt, progress.csv, TensorBoard logs)
    dynamics/        one ensemble per (dataset, seed)
    logs/            each run's and each ensemble's console output, and where it ran
    results.csv      one row per run
    table.md         Table 1's layout, the paper's numbers beside ours, IQM and probability of improvement
    curves.png       normalised score against epoch, one panel per dataset

The same command again skips finished runs and continues cut-off ones. `--address auto` (or
`ray://HOST:10001`) runs the same grid on a Ray cluster whose nodes see this folder at the same path.
"""

import contextlib
import csv
import io
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import ray
import torch
import tyro

import drop
from checkpoint import StopOnSignal, flat_fields
from datasets import DatasetError, _parse_name, load_dataset, normalized_score

HERE = os.path.dirname(os.path.abspath(__file__))
Penalty = Literal["drop", "mopo", "none"]

# Why Ray core tasks and not Ray Tune: a run must wait for its (dataset, seed)'s ensemble. Passed
# as an argument, the ensemble task's ObjectRef makes Ray start the run only once the ensemble
# exists, holding no CPU meanwhile; a Tune trial would sit on its CPUs while it waited, and with
# few CPUs every trial can end up waiting for an ensemble that has no CPU left to train on. And a
# run's state lives in its drop.py checkpoint, which the run task reads before it starts, so
# running the command again is the restore: there is no second record of the experiment (Tune's)
# that could disagree with the run folders. Retries are Ray's: max_retries re-runs a task whose
# worker died, and retry_exceptions re-runs it when its drop.py was killed by a signal.


@dataclass
class Args:
    """Run a grid of drop.py runs on Ray and tabulate them. Flags not listed here go to every drop.py run
    (--epochs 100, --sac.hidden 64, ...); --dynamics.* and --device also go to dynamics.py."""

    envs: tuple[str, ...] = (drop.DEFAULT_ENV,)
    """datasets, any names drop.py takes (D4RL, builtin-..., Minari ids)"""
    penalties: tuple[Penalty, ...] = ("drop", "mopo", "none")
    """reward penalties; `none` (MBPO) ignores eta, so it runs once per dataset and seed, with eta 0"""
    seeds: tuple[int, ...] = (0, 1)
    """seeds; each (dataset, seed) trains one dynamics ensemble"""
    etas: tuple[float, ...] | None = None
    """penalty coefficients (default: each dataset's value in drop.py's table)"""
    variants: tuple[str, ...] = ()
    """more versions of the drop runs, each NAME=FLAGS (checked="--dice.preset checked" classifier="--ratio classifier"): a table column each, on the same datasets, seeds and ensembles"""
    name: str = "sweep"
    """the sweep's folder: sweeps/{name}"""
    address: str | None = None
    """Ray cluster to run on: auto, or ray://HOST:10001 (default: start a local Ray on this machine)"""
    num_cpus: int | None = None
    """CPUs of the local Ray (default: all of this machine's)"""
    cpus_per_run: int = 1
    """CPUs reserved for each run, and its torch threads (see the README for the measured default)"""
    gpus_per_run: float = 0.0
    """GPUs reserved for each run (fractions share a card)"""
    max_retries: int = 2
    """times Ray retries a run whose worker died or whose drop.py was killed"""
    bootstrap_resamples: int = 10_000
    """resamples of the stratified bootstrap behind the confidence intervals"""
    report_only: bool = False
    """write table.md, results.csv and curves.png from the runs as they stand, finished or not, and start nothing: a look at a sweep in progress (the table's epochs column says how far each run is)"""


# Flags whose values the sweep sets itself, per run.
SWEEP_FLAGS = ("--env", "--dataset", "--seed", "--penalty", "--eta", "--run-name", "--dynamics-path", "--resume")
# Table 1 of the DROP paper (D4RL, normalised scores; DROP and MOPO over six seeds): DROP, MOPO, MBPO.
PAPER_TABLE1 = {
    "hopper-random": (18.2, 11.2, 4.5),
    "hopper-medium": (52.1, 26.3, 4.9),
    "hopper-medium-replay": (88.2, 78.6, 49.8),
    "hopper-medium-expert": (54.7, 33.9, 56.0),
    "walker2d-random": (9.2, 12.1, 8.6),
    "walker2d-medium": (73.4, 11.9, 12.7),
    "walker2d-medium-replay": (39.2, 39.0, 22.2),
    "walker2d-medium-expert": (65.3, 59.2, 7.6),
    "halfcheetah-random": (38.0, 33.8, 30.7),
    "halfcheetah-medium": (50.2, 42.3, 28.3),
    "halfcheetah-medium-replay": (58.6, 54.4, 47.3),
    "halfcheetah-medium-expert": (65.7, 64.2, 9.7),
}


@dataclass(frozen=True)
class Run:
    env: str
    task: str  # the key of drop.py's table: <family>-<kind>
    penalty: Penalty
    eta: float
    seed: int
    epochs: int  # planned
    column: str  # the table column: the penalty (and variant), and eta when the sweep sets several
    variant: str = ""  # the name of a --variants entry; "" for the plain runs
    flags: tuple[str, ...] = ()  # its drop.py flags

    @property
    def name(self) -> str:
        penalty = f"{self.penalty}-{self.variant}" if self.variant else self.penalty
        return f"{self.env.replace('/', '_')}__{penalty}__eta{self.eta:g}__seed{self.seed}"


# ---------------------------------------------------------------------------------------------
# Statistics (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice"), in numpy
# because rliable does not import here. Scores come per task (dataset): a list of arrays [..., runs].


def iqm(scores: np.ndarray) -> np.ndarray:
    """Interquartile mean over the last axis: the mean after dropping the lowest and highest
    floor(n/4) scores (as rliable's scipy.stats.trim_mean(scores, 0.25))."""
    ordered = np.sort(scores, axis=-1)
    cut = ordered.shape[-1] // 4
    return ordered[..., cut : ordered.shape[-1] - cut].mean(-1)


def probability_of_improvement(x_per_task: list[np.ndarray], y_per_task: list[np.ndarray]) -> np.ndarray:
    """P(X > Y): for each task, the chance that a run of X beats a run of Y (ties count half,
    the Mann-Whitney statistic), averaged over tasks."""
    per_task = []
    for x, y in zip(x_per_task, y_per_task):
        x, y = x[..., :, None], y[..., None, :]
        per_task.append(((x > y) + 0.5 * (x == y)).mean((-2, -1)))
    return np.mean(per_task, axis=0)


def stratified_resample(per_task: list[np.ndarray], reps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`reps` bootstrap copies of each task's runs, drawn with replacement within that task only."""
    return [runs[rng.integers(len(runs), size=(reps, len(runs)))] for runs in per_task]


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    low, high = np.percentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


def iqm_with_ci(per_task: list[np.ndarray], reps: int, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """IQM of all runs of all tasks, and its 95% stratified-bootstrap percentile interval."""
    resampled = stratified_resample(per_task, reps, np.random.default_rng(seed))
    return float(iqm(np.concatenate(per_task))), percentile_interval(iqm(np.concatenate(resampled, -1)))


def improvement_with_ci(
    x_per_task: list[np.ndarray], y_per_task: list[np.ndarray], reps: int, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """P(X > Y) and its 95% stratified-bootstrap interval (X's and Y's runs resampled independently)."""
    rng = np.random.default_rng(seed)
    boot = probability_of_improvement(
        stratified_resample(x_per_task, reps, rng), stratified_resample(y_per_task, reps, rng)
    )
    return float(probability_of_improvement(x_per_task, y_per_task)), percentile_interval(boot)


# ---------------------------------------------------------------------------------------------
# The grid


def split_flags(argv: list[str]) -> list[list[str]]:
    """['--a', '1', '--b', '2', '3', '--c'] -> [['--a', '1'], ['--b', '2', '3'], ['--c']]."""
    groups = []
    for token in argv:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def drop_flags_checked(passthrough: list[str], default: drop.Args | None = None) -> drop.Args:
    """drop.py's arguments from the pass-through flags (on top of `default`); a flag drop.py refuses ends the sweep before it starts."""
    for group in split_flags(passthrough):
        if group[0].split("=")[0].replace("_", "-") in SWEEP_FLAGS:
            raise SystemExit(
                f"error: {group[0]} is set by sweep.py for each run; use --envs, --seeds, --penalties, --etas, --name instead"
            )
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return tyro.cli(drop.Args, args=passthrough, default=default)
    except SystemExit:
        raise SystemExit(
            f"error: drop.py does not take `{' '.join(passthrough)}`; see `python drop.py --help` for its flags"
        ) from None


def ratio_flags_apart(passthrough: list[str]) -> tuple[list[str], list[str]]:
    """The pass-through flags every run takes, and those for DROP's ratio (--dice.*, --clip, ...), which only the drop runs take."""
    shared, ratio_only = [], []
    for group in split_flags(passthrough):
        alone = drop_flags_checked(group)
        (ratio_only if drop.ignored_flags(replace(alone, penalty="none")) else shared).extend(group)
    return shared, ratio_only


def drop_variants(variants: tuple[str, ...], ratio_flags: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...]]]:
    """The plain drop runs ("", `ratio_flags`) and each NAME=FLAGS of --variants (after `ratio_flags`)."""
    parsed = [("", ratio_flags)]
    for variant in variants:
        name, equals, flags = variant.partition("=")
        if not equals or not name.replace("-", "").isalnum() or name in {n for n, _ in parsed}:
            raise SystemExit(
                f"error: --variants {variant!r}: each variant is NAME=FLAGS with a new name of letters, digits and dashes, e.g. checked='--dice.preset checked'"
            )
        parsed.append((name, (*ratio_flags, *flags.split())))
    return parsed


def plan(args: Args, drop_args: drop.Args, ratio_flags: tuple[str, ...] = ()) -> list[Run]:
    """Every run of the grid, with the eta and epochs drop.py will use; the drop runs' own flags are `ratio_flags` and their variant's."""
    runs = []
    for env, penalty in itertools.product(args.envs, args.penalties):
        try:
            parsed = _parse_name(env)
        except DatasetError as e:
            raise SystemExit(f"error: {e}")
        task = f"{parsed.family}-{parsed.kind}"
        for variant, flags in drop_variants(args.variants, ratio_flags) if penalty == "drop" else [("", ())]:
            hp, _ = drop.settings(replace(drop_flags_checked(list(flags), drop_args), penalty=penalty), task)
            etas = (0.0,) if penalty == "none" else args.etas or (hp.eta,)
            for eta, seed in itertools.product(etas, args.seeds):
                column = f"{penalty} ({variant})" if variant else penalty
                column += "" if penalty == "none" or args.etas is None or len(args.etas) == 1 else f" eta={eta:g}"
                runs.append(Run(env, task, penalty, eta, seed, hp.epochs, column, variant, flags))
    return runs


def dynamics_path(sweep_dir: str, env: str, seed: int) -> str:
    return os.path.join(sweep_dir, "dynamics", f"{env.replace('/', '_')}__seed{seed}.pt")


def read_checkpoint(path: str) -> dict:
    """A run's checkpoint or an ensemble file, memory-mapped: the sweep reads a few small entries,
    never the model buffer that makes a run's checkpoint hundreds of MB."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def resume_flags(run_dir: str, planned_epochs: int) -> list[str] | None:
    """None when the run is finished; otherwise the drop.py flags that carry it on ([] = start over).
    A run finished with fewer epochs than planned is extended (the same as a run planned that long).

    Checkpoints that say "finished" come from a drop.py with --resume; older ones are finished
    when their last epoch is the planned last epoch, and cannot be continued.
    """
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return []
    checkpoint = read_checkpoint(path)
    if (
        checkpoint.get("finished", checkpoint["epoch"] + 1 == planned_epochs)
        and checkpoint.get("epochs", planned_epochs) == planned_epochs
    ):
        return None
    return ["--resume", run_dir, "--epochs", str(planned_epochs)] if "finished" in checkpoint else []


def refuse_changed_settings(sweep_dir: str, runs: list[Run], drop_args: drop.Args):
    """Stop before anything runs if a run or ensemble already in sweep_dir was made with other
    settings than this command's: mixing them would put two experiments in one table."""
    ignored = {
        "dynamics_path",
        "device",
        "track",
        "resume",
        "epochs",
    }  # where and how a run ran, not what it computed; more epochs extend a run
    # (file, its settings' key, the settings wanted, their flags' prefix, the most epochs a run there may have done)
    saved_files = [
        (dynamics_path(sweep_dir, run.env, run.seed), "config", asdict(drop_args.dynamics), "--dynamics.", None)
        for run in runs
    ]
    saved_files += [
        (os.path.join(sweep_dir, "runs", run.name, "checkpoint.pt"), "args",
         asdict(replace(drop_flags_checked(list(run.flags), drop_args), env=run.env, penalty=run.penalty, eta=run.eta, seed=run.seed, run_name=run.name)), "--", run.epochs)
        for run in runs
    ]  # fmt: skip
    for path, key, wanted, flag_prefix, most_epochs in saved_files:
        if not os.path.isfile(path):
            continue
        saved_file = read_checkpoint(path)
        saved = flat_fields(saved_file[key])
        changed = [
            f"{flag_prefix}{name.replace('_', '-')} {saved[name]} then, {value} now"
            for name, value in flat_fields(wanted).items()
            if name in saved and name not in ignored and saved[name] != value
        ]
        if changed:
            raise SystemExit(
                f"error: {path} was made with other settings ({'; '.join(changed)}); give this sweep another --name, or delete that file"
            )
        if most_epochs is not None and (done := saved_file["epoch"] + 1) > most_epochs:
            raise SystemExit(
                f"error: {path} has done {done} epochs, more than this sweep's {most_epochs}; a sweep can extend its runs, not shorten them (give --epochs {done} or more, or another --name)"
            )


# ---------------------------------------------------------------------------------------------
# Ray tasks: each starts one script as a subprocess and waits for it.


class ScriptKilled(Exception):
    """The script died of a signal (a SIGKILL, the OOM killer): worth a retry."""


class ScriptFailed(Exception):
    """The script exited with an error (or the dataset is unusable): it would fail again, so no retry."""


class ScriptStopped(Exception):
    """The script stopped cleanly on Ctrl-C or SIGTERM and saved its state, or was not started because
    the sweep is stopping: not a failure, and the same command carries on from there."""


# drop.py and dynamics.py exit with 128 + the signal after saving their state on SIGINT or SIGTERM.
STOP_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def stop_file(sweep_dir: str) -> str:
    """While this file exists the sweep is stopping: running scripts are asked to stop and no new one
    starts. A file and not a message, so that the runs on every node of a cluster see it."""
    return os.path.join(sweep_dir, "logs", "stopping")


def run_script(argv: list[str], cwd: str, log_path: str, threads: int):
    """`python argv...` in cwd with `threads` torch threads, its output in log_path, and a record of where it ran.

    Ray runs each worker in its own process group and kills the group when the worker dies, so
    the script never outlives a killed worker and races its own retry (test_sweep.py checks this).
    Once the sweep is stopping (`stop_file`), the script gets a SIGTERM and saves its state.
    """
    script, stopping = os.path.basename(argv[0]), stop_file(cwd)
    if os.path.exists(stopping):
        raise ScriptStopped(f"{script} not started: the sweep is stopping")
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.time()
    with (
        open(log_path, "w") as log,
        subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT) as process,
    ):
        try:
            asked_to_stop = False
            while process.poll() is None:
                if not asked_to_stop and os.path.exists(stopping):
                    process.send_signal(signal.SIGTERM)
                    asked_to_stop = True
                time.sleep(0.5)
        except BaseException:  # the worker is being torn down: the script must not outlive it
            process.kill()
            raise
    if asked_to_stop and process.returncode == -signal.SIGTERM:  # stopped before it could save anything
        raise ScriptStopped(f"{script} stopped while starting")
    if process.returncode < 0:
        raise ScriptKilled(f"{script} was killed by signal {-process.returncode}; log: {log_path}")
    if process.returncode != 0:
        with open(log_path) as log:
            last_line = next((line.strip() for line in reversed(log.readlines()) if line.strip()), "")
        if process.returncode in STOP_EXIT_CODES:  # stopped by us or by hand: start no more runs
            open(stopping, "a").close()
            raise ScriptStopped(f"{script} {last_line}")
        raise ScriptFailed(f"{script} exited with {process.returncode}: {last_line} (log: {log_path})")
    record = {"host": socket.gethostname(), "wall_seconds": time.time() - started, "command": argv}
    with open(log_path.removesuffix(".log") + ".json", "w") as file:
        json.dump(record, file)


def prepare_dataset(env: str) -> float:
    """Download or collect the dataset once, before the seeds' ensembles all want it at the same time;
    returns the mean normalised score of its own episodes (its behaviour policy), for the report."""
    try:
        data = load_dataset(env)
    except DatasetError as e:
        raise ScriptFailed(f"dataset {env}: {e}") from None
    return float(normalized_score(data.family, data.episode_returns()).mean())


def train_dynamics(
    env: str, seed: int, path: str, flags: list[str], sweep_dir: str, threads: int, _dataset_ready: str
) -> str:
    if not os.path.isfile(path):  # dynamics.py saves atomically: a file here is a whole ensemble
        log = os.path.join(sweep_dir, "logs", "dynamics__" + os.path.basename(path).removesuffix(".pt") + ".log")
        run_script(
            [os.path.join(HERE, "dynamics.py"), "--env", env, "--seed", str(seed), "--out", path, *flags],
            sweep_dir,
            log,
            threads,
        )
    return path


def train_run(run: Run, flags: list[str], sweep_dir: str, threads: int, dynamics_path: str) -> str:
    """drop.py for one run, resumed or started over as its checkpoint says (also on a retry)."""
    run_dir = os.path.join("runs", run.name)
    carry_on = resume_flags(os.path.join(sweep_dir, run_dir), run.epochs)
    if carry_on is not None:
        if not carry_on:  # start over: no trace of an earlier attempt may mix into this one
            shutil.rmtree(os.path.join(sweep_dir, run_dir), ignore_errors=True)
        argv = [
            os.path.join(HERE, "drop.py"), "--env", run.env, "--seed", str(run.seed), "--penalty", run.penalty, "--eta", str(run.eta),
            "--run-name", run.name, "--dynamics-path", dynamics_path, *flags, *run.flags, *carry_on,
        ]  # fmt: skip
        run_script(argv, sweep_dir, os.path.join(sweep_dir, "logs", f"{run.name}.log"), threads)
    return run.name


# ---------------------------------------------------------------------------------------------
# Results


def read_progress(run_dir: str) -> list[dict[str, float]]:
    """drop.py's evaluations of a run (runs/RUN/progress.csv), oldest first; [] before the first."""
    path = os.path.join(run_dir, "progress.csv")
    if not os.path.isfile(path):
        return []
    with open(path) as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


def result_row(run: Run, sweep_dir: str) -> dict:
    """The run's line of results.csv; the score is its final checkpoint's."""
    run_dir = os.path.join(sweep_dir, "runs", run.name)
    checkpoint = read_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    record_path = os.path.join(sweep_dir, "logs", f"{run.name}.json")
    record = {"host": "", "wall_seconds": float("nan")}
    if os.path.isfile(record_path):
        with open(record_path) as file:
            record = json.load(file)
    return {
        "dataset": run.env, "penalty": run.penalty, "eta": run.eta, "seed": run.seed,
        "epochs": checkpoint["epoch"] + 1, "normalized_score": checkpoint["normalized_score"],
        "wall_seconds": round(checkpoint.get("wall_seconds", record["wall_seconds"]), 1),  # the run's own clock counts every resumed part
        "host": record["host"], "run_dir": os.path.relpath(run_dir, sweep_dir),
        **critic_columns(checkpoint.get("critic_health")),
    }  # fmt: skip


def kept_rows(sweep_dir: str, runs: list[Run]) -> dict[Run, dict]:
    """The rows that the sweep's last results.csv holds for these runs. A run folder does not outlive
    its machine, results.csv does: copied back beside the folders that are left, it keeps the lost runs in the report."""
    path = os.path.join(sweep_dir, "results.csv")
    if not os.path.isfile(path):
        return {}
    with open(path) as file:
        recorded = {row["run_dir"]: row for row in csv.DictReader(file)}
    as_number = lambda key, value: (
        value
        if key in ("dataset", "penalty", "host", "run_dir")
        else int(value)
        if key in ("seed", "epochs")
        else float(value)
    )
    kept = {}
    for run in runs:
        if (run_dir := os.path.join("runs", run.name)) in recorded:
            row = {key: as_number(key, value) for key, value in recorded[run_dir].items()}
            # a column added since that results.csv was written: unknown for the lost run
            unknown = {key: value for key, value in critic_columns(None).items() if key not in row}
            kept[run] = row | unknown
    return kept


def critic_columns(health: dict | None) -> dict:
    """SAC's largest epoch-mean critic loss and alpha, and the epochs (1-based) since which the critic's mean Q
    stayed above the return bound (over-estimating) and above 3 times it (diverging); 0: never. NaN for checkpoints
    from before drop.py kept them."""
    health = health or {}
    since = lambda key: float("nan") if key not in health else 0 if health[key] is None else health[key] + 1
    return {
        "max_critic_loss": health.get("max_critic_loss", float("nan")),
        "max_alpha": health.get("max_alpha", float("nan")),
        "overestimating_since": since("overestimating_since"),
        "diverging_since": since("diverging_since"),
    }


def write_atomically(path: str, text: str):
    with open(path + ".tmp", "w") as file:
        file.write(text)
    os.replace(path + ".tmp", path)


def write_csv(path: str, rows: list[dict]):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, out.getvalue())


def scores_by_cell(rows: dict[Run, dict]) -> dict[tuple[str, str], np.ndarray]:
    """(dataset, column) -> final scores over seeds."""
    cells = {}
    for run, row in rows.items():
        cells.setdefault((run.env, run.column), []).append(row["normalized_score"])
    return {key: np.array(values) for key, values in cells.items()}


def format_table(title: str, runs: list[Run], rows: dict[Run, dict], failed: list[str], reps: int) -> str:
    envs = list(dict.fromkeys(run.env for run in runs))
    columns = list(dict.fromkeys(run.column for run in runs))
    tasks = {run.env: run.task for run in runs}
    cells = scores_by_cell(rows)
    lines = [
        title,
        "",
        "Final normalised score (D4RL scale, last evaluation): mean ± sample std over seeds (number of seeds).",
        "",
        "| dataset | " + " | ".join(columns) + " | paper DROP | paper MOPO | paper MBPO |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for env in envs:
        scores = [cells.get((env, column)) for column in columns]
        ours = [
            "—"
            if s is None
            else f"{s.mean():.1f} ± {s.std(ddof=1):.1f} ({len(s)})"
            if len(s) > 1
            else f"{s[0]:.1f} (1)"
            for s in scores
        ]
        mark = "†" if env.startswith("builtin-") or "/" in env else ""
        paper = [f"{value}{mark}" for value in PAPER_TABLE1[tasks[env]]] if tasks[env] in PAPER_TABLE1 else ["—"] * 3
        lines.append(f"| {env} | " + " | ".join(ours + paper) + " |")
    lines += [
        "",
        "Paper: Table 1 of the DROP paper (D4RL datasets; DROP and MOPO over six seeds). "
        "† This project's own data (built-in or Minari), not D4RL's: the paper's number is for the D4RL dataset of the same task, for orientation only.",
    ]

    per_column = {column: [cells[(env, column)] for env in envs if (env, column) in cells] for column in columns}
    complete = [column for column in columns if len(per_column[column]) == len(envs)]
    lines += [
        "",
        f"Aggregate over the {len(envs)} datasets (Agarwal et al. 2021): interquartile mean of all runs with a 95% "
        f"stratified-bootstrap percentile interval ({reps} resamples of the seeds within each dataset).",
        "",
        "| penalty | IQM | 95% CI | runs |",
        "|---|---|---|---|",
    ]
    for column in complete:
        value, (low, high) = iqm_with_ci(per_column[column], reps)
        lines.append(f"| {column} | {value:.1f} | [{low:.1f}, {high:.1f}] | {sum(map(len, per_column[column]))} |")
    if len(complete) < len(columns):
        lines += [
            "",
            f"Not aggregated, for lack of a score on every dataset: {', '.join(c for c in columns if c not in complete)}.",
        ]
    drops = [c for c in complete if c.startswith("drop")]
    others = [c for c in complete if not c.startswith("drop")]
    if drops and others:
        lines += [
            "",
            "Probability of improvement P(X > Y): the chance that a run of X scores higher than a run of Y on the same dataset, averaged over datasets, with its 95% interval.",
            "",
            "| X | Y | P(X > Y) | 95% CI |",
            "|---|---|---|---|",
        ]
        for x, y in itertools.product(drops, others):
            value, (low, high) = improvement_with_ci(per_column[x], per_column[y], reps)
            lines.append(f"| {x} | {y} | {value:.2f} | [{low:.2f}, {high:.2f}] |")
    lines += [
        "",
        "Every run's critic: SAC's largest epoch-mean critic loss and alpha, and the epochs since which its mean Q stayed above"
        " the return bound (over-estimating) and above 3 times it (diverging), as drop.py warns.",
        "",
        "| run | epochs | score | largest critic loss | largest alpha | over-estimating since | diverging since |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, row in rows.items():
        lines.append(
            f"| {run.name} | {row['epochs']} | {row['normalized_score']:.1f} | {row['max_critic_loss']:.3g} | {row['max_alpha']:.3g}"
            f" | {since_epoch(row['overestimating_since'])} | {since_epoch(row['diverging_since'])} |"
        )
    if failed:
        lines += ["", f"Failed runs ({len(failed)}), left out above:", *[f"- {line}" for line in failed]]
    return "\n".join(lines) + "\n"


def since_epoch(epoch: float) -> str:
    """A critic column's epoch as the table shows it: 0 is never, NaN (a run from before drop.py kept it) a dash."""
    return "—" if math.isnan(epoch) else "never" if epoch == 0 else f"epoch {epoch:.0f}"


def record_data_scores(sweep_dir: str, scores: dict[str, float]) -> dict[str, float]:
    """Add this invocation's datasets to the sweep's record of their own scores; returns the whole record.

    The report reads the record, so that drawing it never loads (or downloads) a dataset again."""
    path = os.path.join(sweep_dir, "data_scores.json")
    recorded = {}
    if os.path.isfile(path):
        with open(path) as file:
            recorded = json.load(file)
    recorded |= scores
    if scores:
        write_atomically(path, json.dumps(recorded, indent=1, sort_keys=True))
    return recorded


def plot_curves(path: str, runs: list[Run], sweep_dir: str, behaviour_scores: dict[str, float]):
    """Normalised score against epoch: one panel per dataset, one line per column, the mean over
    seeds with a band from the lowest to the highest seed, and a dashed line at the data's own score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(run.env for run in runs))
    columns = list(dict.fromkeys(run.column for run in runs))
    ncols = min(len(envs), 3)
    nrows = -(-len(envs) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(6.5 * ncols, 3.2 * nrows), squeeze=False
    )  # room for the legend beside each panel
    from matplotlib.colors import to_hex

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = [color for color in cycle if to_hex(color) != "#7f7f7f"]  # gray is the data's line
    for ax, env in zip(axes.flat, envs):
        for color, column in zip(colors * 4, columns):
            curves = [
                read_progress(os.path.join(sweep_dir, "runs", run.name))
                for run in runs
                if (run.env, run.column) == (env, column)
            ]
            curves = [curve for curve in curves if curve]
            if not curves:
                continue
            length = min(map(len, curves))  # a cut-off seed shortens the band rather than bending it
            epochs = np.array([row["epoch"] + 1 for row in curves[0][:length]])
            scores = np.array([[row["normalized_score"] for row in curve[:length]] for curve in curves])
            ax.plot(
                epochs,
                scores.mean(0),
                color=color,
                label=f"{column} ({len(curves)} seed{'s' if len(curves) > 1 else ''})",
            )
            ax.fill_between(epochs, scores.min(0), scores.max(0), color=color, alpha=0.2)
        if env in behaviour_scores:
            ax.axhline(
                behaviour_scores[env],
                color="gray",
                linestyle="--",
                linewidth=1,
                label=f"the data ({behaviour_scores[env]:.0f})",
            )
        ax.set(title=env, xlabel="epoch", ylabel="normalised score")
        if ax.lines:  # no lines before drop.py writes progress.csv
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    for ax in list(axes.flat)[len(envs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=80)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ---------------------------------------------------------------------------------------------
# Main


def start_ray(address: str | None, num_cpus: int | None):
    """Connect to a cluster, or start a local Ray (unless this process already has one)."""
    if ray.is_initialized():
        return
    local = {"num_cpus": num_cpus, "include_dashboard": False} if address is None else {}
    # Workers import this file's tasks by module name; the runs' output goes to logs/, not to this console.
    python_path = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    try:
        ray.init(
            address=address,
            log_to_driver=False,
            logging_level="WARNING",
            runtime_env={"env_vars": {"PYTHONPATH": python_path}},
            **local,
        )
    except ConnectionError as e:
        raise SystemExit(
            f"error: no Ray cluster at --address {address} ({' '.join(str(e).split())}); start one with `ray start --head`, or leave out --address for a local Ray"
        ) from None


@contextlib.contextmanager
def interrupt_message(bar):
    """A second Ctrl-C ends the sweep at once with one line instead of a traceback from inside Ray; Ray
    kills the runs, which lose what they did since their last checkpoint."""
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit(
            f"interrupted after {bar.n} of {bar.total} runs; the same command carries on from there"
        ) from None


def run_grid(
    args: Args, passthrough: list[str], runs: list[Run], sweep_dir: str
) -> tuple[dict[Run, dict], list[str], list[str], dict[str, float]]:
    """Every run of the grid that is not finished, on Ray: each run's results row, the failed runs,
    the stopped runs, and the own score of each dataset prepared.

    Ctrl-C or SIGTERM stops the sweep cleanly: every running script saves its state and stops, no
    new one starts, and the same command carries on from there. So does a run's drop.py stopped by hand."""
    from tqdm import tqdm

    dynamics_flags = [
        token
        for group in split_flags(passthrough)
        if group[0].startswith(("--dynamics.", "--device"))
        for token in group
    ]
    finished = {run for run in runs if resume_flags(os.path.join(sweep_dir, "runs", run.name), run.epochs) is None}
    if len(finished) < len(runs):
        start_ray(args.address, args.num_cpus)
        for sub in ("runs", "dynamics", "logs"):
            os.makedirs(os.path.join(sweep_dir, sub), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # the last command's stop: this one carries on
            os.remove(stop_file(sweep_dir))
    resources = {"num_cpus": args.cpus_per_run, "num_gpus": args.gpus_per_run}
    retry = {"max_retries": args.max_retries, "retry_exceptions": [ScriptKilled]}
    data_task = ray.remote(prepare_dataset).options(num_cpus=1, **retry)
    dynamics_task = ray.remote(train_dynamics).options(**resources, **retry)
    run_task = ray.remote(train_run).options(**resources, **retry)
    pending, ensembles, datasets_ready = {}, {}, {}
    for run in runs:
        if run in finished:
            continue
        if run.env not in datasets_ready:
            datasets_ready[run.env] = data_task.remote(run.env)
        if (run.env, run.seed) not in ensembles:
            path = dynamics_path(sweep_dir, run.env, run.seed)
            ensembles[run.env, run.seed] = dynamics_task.remote(
                run.env, run.seed, path, dynamics_flags, sweep_dir, args.cpus_per_run, datasets_ready[run.env]
            )
        pending[run_task.remote(run, passthrough, sweep_dir, args.cpus_per_run, ensembles[run.env, run.seed])] = run

    to_train = sum(not os.path.isfile(dynamics_path(sweep_dir, env, seed)) for env, seed in ensembles)
    print(f"sweep {args.name}: {len(runs)} runs, {len(finished)} already finished, {len(pending)} to run, "
          f"{to_train} dynamics ensembles to train; {args.cpus_per_run} CPU(s) per run; output in {sweep_dir}")  # fmt: skip
    rows = {run: result_row(run, sweep_dir) for run in finished}
    failed, stopped = [], []
    with (
        tqdm(total=len(runs), initial=len(finished), desc=f"sweep {args.name}", unit="run") as bar,
        interrupt_message(bar),
        StopOnSignal("sweep's running scripts save their state; no new run starts") as stop,
    ):
        while pending:
            if stop.requested and not os.path.exists(stop_file(sweep_dir)):
                open(stop_file(sweep_dir), "a").close()  # the scripts' tasks see it and pass the signal on
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)  # a timeout, to see a stop soon
            if not done:
                continue
            run = pending.pop(done[0])
            try:
                ray.get(done[0])
            except ray.exceptions.RayError as e:  # after Ray's retries
                reason = getattr(e, "cause", None) or e
                if isinstance(reason, ScriptStopped):
                    stopped.append(run.name)
                    bar.write(f"stopped {run.name}: {' '.join(str(reason).split())}")
                else:
                    failed.append(f"{run.name}: {' '.join(str(reason).split())}")
                    bar.write(f"FAILED {failed[-1]}")
            else:
                rows[run] = row = result_row(run, sweep_dir)
                bar.write(
                    f"{run.name}: score {row['normalized_score']:.1f} after {row['epochs']} epochs, {row['wall_seconds']:.0f} s on {row['host']}"
                )
            bar.update()

    prepared = {}
    for env, ref in datasets_ready.items():
        try:
            prepared[env] = ray.get(ref)
        except ray.exceptions.RayError:  # its runs failed and are listed; the figure draws no data line for it
            pass
    return rows, failed, stopped, prepared


def main(args: Args, passthrough: list[str]) -> list[dict]:
    if args.address is not None and args.num_cpus is not None:
        raise SystemExit("error: --num-cpus sizes a local Ray; a cluster at --address has its own CPUs")
    drop_flags_checked(passthrough)
    shared_flags, ratio_flags = ratio_flags_apart(passthrough)
    drop_args = drop_flags_checked(shared_flags)
    runs = plan(args, drop_args, tuple(ratio_flags))
    sweep_dir = os.path.abspath(os.path.join("sweeps", args.name))
    refuse_changed_settings(sweep_dir, runs, drop_args)
    if args.report_only:
        if not os.path.isdir(sweep_dir):
            raise SystemExit(
                f"error: --report-only: there is no sweep {args.name!r} here ({sweep_dir}); run it first without --report-only"
            )
        rows = {
            run: result_row(run, sweep_dir)
            for run in runs
            if os.path.isfile(os.path.join(sweep_dir, "runs", run.name, "checkpoint.pt"))
        }
        kept = {
            run: row for run, row in kept_rows(sweep_dir, runs).items() if run not in rows
        }  # a run's own folder wins
        rows |= kept
        failed, stopped, prepared = [], [], {}
    else:
        (rows, failed, stopped, prepared), kept = run_grid(args, shared_flags, runs, sweep_dir), {}

    rows = {run: rows[run] for run in runs if run in rows}  # in grid order
    if rows:
        write_csv(os.path.join(sweep_dir, "results.csv"), list(rows.values()))
    title = f"Sweep `{args.name}`" + (f", drop.py flags `{' '.join(passthrough)}`" if passthrough else "")
    if args.report_only:
        title += " (`--report-only`: the runs as they stand; each run's epochs are below)"
        if kept:
            title += f"; {len(kept)} of them from the last results.csv, their folders not here ({', '.join(run.name for run in kept)})"
    table = format_table(title, runs, rows, failed, args.bootstrap_resamples)
    write_atomically(os.path.join(sweep_dir, "table.md"), table)
    plot_curves(os.path.join(sweep_dir, "curves.png"), runs, sweep_dir, record_data_scores(sweep_dir, prepared))
    print(table)
    if stopped:
        raise SystemExit(
            f"stopped: {len(stopped)} of {len(runs)} runs saved their state or did not start; the same command carries on from there"
        )
    if failed:
        raise SystemExit(
            f"error: {len(failed)} of {len(runs)} runs failed (listed in {sweep_dir}/table.md); run the same command again to retry them"
        )
    return list(rows.values())


if __name__ == "__main__":
    main(*tyro.cli(Args, return_unknown_args=True))
