"""End to end: drop.py trains with each penalty on a small D4RL-format file of real Hopper-v4
steps, writes a checkpoint and TensorBoard logs with finite losses, and eval.py scores the result.
Bad input ends in one clear line, never a traceback."""

import glob
import math
import os
import subprocess
import sys

import pytest
import torch
import tyro

import datasets
import drop
from checkpoint import PROGRESS_COLUMNS, write_progress

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the scripts under test
# A run small enough for CI: tiny networks, a few updates, two epochs; a DROP run adds TINY_DICE (MOPO and MBPO refuse it).
TINY_ANY = [
    "--epochs", "2", "--steps-per-epoch", "20", "--rollout-freq", "10", "--rollout-batch-size", "200",
    "--eval-every", "1", "--eval-episodes", "1", "--sac.hidden", "32", "--sac.batch-size", "64",
    "--dynamics.num-members", "3", "--dynamics.num-elites", "2", "--dynamics.hidden", "32", "--dynamics.max-epochs", "2",
]  # fmt: skip
TINY_DICE = ["--dice-steps", "5", "--dice.pretrain-steps", "5"]
TINY = [*TINY_ANY, *TINY_DICE]


def tiny(penalty: str) -> list[str]:
    return TINY if penalty == "drop" else TINY_ANY


def run_script(*argv: str, cwd: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env_extra or {})
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "hopper-small.hdf5"
    datasets.collect("Hopper-v4", "random", 2000, seed=0, out=path)
    return str(path)


@pytest.fixture(scope="module")
def runs(hopper_file, tmp_path_factory):
    """One tiny run per penalty in one working folder; the first trains the dynamics the others reuse from the cache."""
    workdir = tmp_path_factory.mktemp("work")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for penalty in ("drop", "mopo", "none"):
            argv = ["--env", "hopper-medium-v2", "--dataset", hopper_file, *tiny(penalty), "--penalty", penalty]
            drop.main(tyro.cli(drop.Args, args=[*argv, "--run-name", penalty]))
    finally:
        os.chdir(cwd)
    return workdir


def logged_scalars(run_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("penalty", ["drop", "mopo", "none"])
def test_each_penalty_trains_and_logs_finite_values(runs, penalty):
    run_dir = runs / "runs" / penalty
    assert (run_dir / "checkpoint.pt").is_file()
    assert glob.glob(str(run_dir / "events.out.tfevents.*"))
    scalars = logged_scalars(str(run_dir))
    for tag in ("sac/critic_loss", "sac/actor_loss", "sac/q_mean", "sac/q_bound", "eval/normalized_score"):
        assert len(scalars[tag]) == 2, tag  # one value per epoch
    for tag in ("rollout/reward_mean", "rollout/length_mean"):
        assert len(scalars[tag]) == 2, tag  # the mean of the epoch's two rollouts
    if penalty == "drop":
        assert len(scalars["penalty/objective"]) == 2 and "rollout/tau_mean" in scalars
    for tag, values in scalars.items():
        assert all(math.isfinite(v) for v in values), (tag, values)


@pytest.mark.parametrize("penalty", ["drop", "mopo", "none"])
def test_progress_csv_has_one_row_per_evaluation_matching_the_logs(runs, penalty):
    """progress.csv (what sweeps read) agrees with the checkpoint and TensorBoard; the penalty's health is logged."""
    import csv

    with open(runs / "runs" / penalty / "progress.csv") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == PROGRESS_COLUMNS and [int(row["epoch"]) for row in rows] == [0, 1]
    scalars = logged_scalars(str(runs / "runs" / penalty))
    assert [float(row["normalized_score"]) for row in rows] == pytest.approx(scalars["eval/normalized_score"])
    assert (
        float(rows[-1]["normalized_score"])
        == torch.load(runs / "runs" / penalty / "checkpoint.pt", weights_only=True)["normalized_score"]
    )
    assert float(rows[-1]["penalty_mean"]) == pytest.approx(scalars["rollout/penalty_mean"][-1])
    assert all(0 <= v <= 1 for v in scalars["rollout/bonus_fraction"])
    if penalty == "drop":
        assert float(rows[-1]["rollout_tau_mean"]) == pytest.approx(scalars["rollout/tau_mean"][-1])
        assert float(rows[-1]["rollout_tau_median"]) == pytest.approx(scalars["rollout/tau_median"][-1])
        assert len(scalars["penalty/tau_data_mean"]) == 2
        assert all(0 <= v <= 1 for tag in ("rollout/tau_below_clip", "rollout/tau_above_clip") for v in scalars[tag])
    else:
        assert (
            math.isnan(float(rows[-1]["rollout_tau_mean"]))
            and math.isnan(float(rows[-1]["rollout_tau_median"]))
            and "penalty/tau_data_mean" not in scalars
        )
    if penalty == "none":
        assert scalars["rollout/bonus_fraction"] == [0.0] * 2  # one value per epoch (the mean of its rollouts)


def test_progress_of_a_run_saved_before_a_column_existed_reads_nan_there(tmp_path):
    """A resumed run rewrites progress.csv from its saved evaluations, which may lack the newer columns (rollout_tau_median)."""
    import sweep

    old = {
        "epoch": 9,
        "normalized_score": 40.0,
        "normalized_score_std": 1.0,
        "return": 5000.0,
        "wall_seconds": 9.0,
        "penalty_mean": 0.5,
        "rollout_tau_mean": 2.0,
    }
    write_progress(str(tmp_path / "progress.csv"), [old, old | {"epoch": 19, "rollout_tau_median": 1.5}])
    rows = sweep.read_progress(str(tmp_path))
    assert math.isnan(rows[0]["rollout_tau_median"]) and rows[1]["rollout_tau_median"] == 1.5 and rows[1]["epoch"] == 19


def test_penalties_differ(runs):
    """The three runs penalise differently: none has zero penalty, mopo and drop do not."""
    means = {p: logged_scalars(str(runs / "runs" / p))["rollout/penalty_mean"][-1] for p in ("drop", "mopo", "none")}
    assert means["none"] == 0.0
    assert means["mopo"] > 0.0 and means["drop"] != 0.0


def test_checkpoint_loads_weights_only(runs):
    checkpoint = torch.load(runs / "runs" / "drop" / "checkpoint.pt", weights_only=True)
    assert checkpoint["family"] == "hopper" and checkpoint["penalty"]["net"] is not None
    assert checkpoint["args"]["penalty"] == "drop"


def test_eval_prints_normalized_score(runs):
    result = run_script(os.path.join(ROOT, "eval.py"), "runs/drop", "--episodes", "2", cwd=runs)
    assert result.returncode == 0, result.stderr
    line = [row for row in result.stdout.splitlines() if row.startswith("normalized score:")]
    assert line and "±" in line[0], result.stdout
    mean, std = (float(x) for x in line[0].removeprefix("normalized score:").split("±"))
    assert math.isfinite(mean) and std >= 0


def test_eval_refuses_checkpoint_for_another_env(runs):
    result = run_script(os.path.join(ROOT, "eval.py"), "runs/drop", "--env", "Walker2d-v4", cwd=runs)
    assert_one_line_error(result, "hopper", "Walker2d-v4")


def test_dynamics_from_another_env_is_refused(runs, tmp_path):
    walker = tmp_path / "walker.hdf5"
    datasets.collect("Walker2d-v4", "random", 300, seed=0, out=walker)
    hopper_dynamics = torch.load(runs / "runs" / "drop" / "checkpoint.pt", weights_only=True)["dynamics_path"]
    result = run_script(
        os.path.join(ROOT, "drop.py"),
        "--env",
        "walker2d-medium-v2",
        "--dataset",
        str(walker),
        "--dynamics-path",
        hopper_dynamics,
        *TINY,
        cwd=tmp_path,
    )
    assert_one_line_error(result, "hopper", "walker2d")


def test_dynamics_trained_on_other_transitions_are_used_with_a_warning(runs, tmp_path):
    """The same robot, other data (a built-in dataset collected on another machine can differ): the run goes on and says so."""
    other = tmp_path / "other.hdf5"
    datasets.collect("Hopper-v4", "random", 300, seed=1, out=other)
    hopper_dynamics = torch.load(runs / "runs" / "drop" / "checkpoint.pt", weights_only=True)["dynamics_path"]
    result = run_script(
        os.path.join(ROOT, "drop.py"),
        "--env",
        "hopper-medium-v2",
        "--dataset",
        str(other),
        "--dynamics-path",
        hopper_dynamics,
        *TINY,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "other transitions" in line and hopper_dynamics in line]


def test_unknown_env_lists_valid_names(tmp_path):
    result = run_script(os.path.join(ROOT, "drop.py"), "--env", "hopper-mediocre-v2", cwd=tmp_path)
    assert_one_line_error(result, "hopper-mediocre-v2", "hopper-medium-v2", "builtin-hopper-random")


def test_dataset_with_wrong_observation_size_is_refused(tmp_path):
    walker = tmp_path / "walker.hdf5"
    datasets.collect("Walker2d-v4", "random", 100, seed=0, out=walker)
    result = run_script(
        os.path.join(ROOT, "drop.py"), "--env", "hopper-medium-v2", "--dataset", str(walker), cwd=tmp_path
    )
    assert_one_line_error(result, str(walker), "observations")
    assert not os.path.exists(tmp_path / "runs")


def test_help_explains_every_flag():
    result = run_script(os.path.join(ROOT, "drop.py"), "--help", cwd=ROOT)
    assert result.returncode == 0
    for flag, words in [
        ("--eta", "penalty coefficient"),
        ("--dynamics-path", "reuse an ensemble"),
        ("--sac.polyak", "target-critic"),
    ]:
        assert flag in result.stdout and words in result.stdout, flag


def test_table_defaults_and_flag_overrides():
    """Unset flags take the authors' per-dataset config; any flag given wins."""
    hp = drop.settings(tyro.cli(drop.Args, args=[]), "walker2d-random")[0]
    assert (hp.horizon, hp.eta, hp.dice_steps, hp.dice_lr, hp.clip, hp.epochs) == (
        1,
        1.0,
        600,
        1e-3,
        (0.01, 50.0),
        3000,
    )
    hp = drop.settings(
        tyro.cli(drop.Args, args=["--eta", "0.5", "--horizon", "3", "--transform", "tanh-shift", "--no-clip"]),
        "walker2d-random",
    )[0]
    assert (hp.eta, hp.horizon, hp.transform, hp.clip) == (0.5, 3, "tanh-shift", None)


@pytest.mark.parametrize("argv", [["--no-clip"], ["--clip", "0", "10"]])
def test_log_transform_needs_a_positive_clip(argv):
    with pytest.raises(SystemExit, match="positive lower bound"):
        drop.settings(tyro.cli(drop.Args, args=argv), "hopper-medium")


@pytest.mark.parametrize("penalty, horizon, eta, source", [
    ("drop", 5, 1.0, "DROP authors' config for halfcheetah-medium"),
    ("mopo", 1, 1.0, "MOPO's config for halfcheetah-medium"),
    ("none", 1, 0.0, "MBPO with MOPO's rollout length for halfcheetah-medium"),
])  # fmt: skip
def test_each_penalty_takes_its_own_table(penalty, horizon, eta, source):
    """MOPO's baseline runs at MOPO's published h and lambda (not DROP's eta), MBPO at MOPO's h; the source is named."""
    hp, from_where = drop.settings(tyro.cli(drop.Args, args=["--penalty", penalty]), "halfcheetah-medium")
    assert (hp.horizon, hp.eta, hp.epochs, from_where) == (horizon, eta, 500, source)
    hp, from_where = drop.settings(
        tyro.cli(drop.Args, args=["--penalty", penalty, "--horizon", "3", "--eta", "0.5"]), "hopper-medium"
    )
    assert (hp.horizon, hp.eta) == (3, 0.5) and "--horizon, --eta from the command line" in from_where


def test_mopo_table_is_mopos_configs():
    """A few entries of MOPO's examples/config/d4rl, and the family fallback for datasets it has no config for."""
    mopo = lambda task: drop.settings(tyro.cli(drop.Args, args=["--penalty", "mopo"]), task)
    assert (mopo("hopper-medium")[0].horizon, mopo("hopper-medium")[0].eta) == (5, 5.0)
    assert (mopo("walker2d-medium-expert")[0].horizon, mopo("walker2d-medium-expert")[0].eta) == (1, 2.0)
    assert mopo("hopper-expert")[1] == "MOPO's config for hopper-medium"


@pytest.mark.parametrize("argv, words", [
    (["--horizon", "0"], "--horizon 0 (at least 1)"), (["--epochs", "0"], "--epochs 0 (at least 1)"), (["--eta", "-1"], "--eta -1.0 (at least 0)"),
    (["--dice-steps", "-2"], "--dice-steps -2"), (["--dice-lr", "0"], "--dice-lr 0.0"), (["--clip", "5", "1"], "--clip 5.0 1.0"),
    (["--halt-margin", "-0.1"], "--halt-margin -0.1"),
])  # fmt: skip
def test_impossible_values_are_refused_in_one_line(argv, words):
    with pytest.raises(SystemExit, match="impossible") as error:
        drop.settings(tyro.cli(drop.Args, args=argv), "hopper-medium")
    assert words in str(error.value)


def test_impossible_values_are_refused_before_any_data_is_collected(tmp_path):
    """`python drop.py --eta -1` on a fresh machine: one line at once, not after collecting 200k transitions."""
    for argv, words in [
        (["--eta", "-1"], "--eta -1.0 (at least 0)"),
        (["--epochs", "0"], "--epochs 0 (at least 1)"),
        (["--penalty", "mopo", "--ratio", "classifier"], "--ratio classifier is DROP's ratio estimator"),
    ]:
        result = run_script(
            os.path.join(ROOT, "drop.py"), *argv, cwd=tmp_path, env_extra={"DROP_DATA_DIR": str(tmp_path / "data")}
        )
        assert_one_line_error(result, words)
        assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_the_old_dice_lambda_flag_names_the_new_one(tmp_path):
    result = run_script(os.path.join(ROOT, "drop.py"), "--dice.lam", "0.5", cwd=tmp_path)
    assert_one_line_error(result, "--dice.lam is now --dice-lambda")


def test_one_flag_sets_dices_lambda_over_the_preset_over_the_table():
    lam = lambda *argv: drop.settings(tyro.cli(drop.Args, args=list(argv)), "hopper-medium")[0].dice_lambda
    assert (lam(), lam("--dice.preset", "checked"), lam("--dice.preset", "checked", "--dice-lambda", "0.3")) == (
        0.1,
        1.0,
        0.3,
    )


def test_a_task_outside_the_tables_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no settings for antmaze-umaze"):
        drop.settings(tyro.cli(drop.Args, args=[]), "antmaze-umaze")


def test_the_run_reports_its_largest_critic_loss_and_alpha(runs):
    """The checkpoint keeps them (sweep.py's table reads them there), equal to the largest logged epoch means."""
    for penalty in ("drop", "mopo", "none"):
        health = torch.load(runs / "runs" / penalty / "checkpoint.pt", weights_only=True)["critic_health"]
        scalars = logged_scalars(str(runs / "runs" / penalty))
        assert health["max_critic_loss"] == pytest.approx(max(scalars["sac/critic_loss"]))
        assert health["max_alpha"] == pytest.approx(max(scalars["sac/alpha"]))
        assert max(scalars["sac/q_bound"]) > 0


def test_eval_rebuilds_the_actor_with_the_log_std_floor_it_was_trained_with(runs, tmp_path):
    from eval import load_policy

    checkpoint = torch.load(runs / "runs" / "mopo" / "checkpoint.pt", weights_only=True)
    assert load_policy(str(runs / "runs" / "mopo" / "checkpoint.pt"), None)[0].log_std_min == -20.0
    checkpoint["args"]["sac"]["log_std_min"] = -5.0
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    assert load_policy(str(tmp_path / "checkpoint.pt"), None)[0].log_std_min == -5.0
