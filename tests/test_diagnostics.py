"""diagnostics.py measures what it says: the true model error comes from MuJoCo itself, the
penalties are training's own, the correlations are the textbook ones, and a trained run gets its
figures and JSON, while a broken run gets one line and no half-written output.

Ground truth is recorded Gymnasium steps (test_dynamics.collect): the env's own observations and
the simulator state before each step. The tiny trained runs are test_drop's."""

import json
import math
import shutil
import subprocess
import sys
from types import SimpleNamespace

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
from scipy import stats
from test_drop import ROOT, hopper_file, runs  # noqa: F401 (fixtures)
from test_dynamics import collect

import datasets
import diagnostics
from dice import penalty
from dynamics import ProbabilisticEnsemble
from sac import Actor
from tasks import TaskDefaults

torch.set_num_threads(1)
REPLAY_TOL = 1e-9  # rebuilt vs recorded next observation, float64 round-off (measured <= 3e-12)
FLOAT32_TOL = 1e-5  # a float32 prediction of a next observation of size ~10


# ---------------------------------------------------------------------------------------------
# The true dynamics


@pytest.mark.parametrize("env_id", ["Hopper-v4", "Walker2d-v4", "HalfCheetah-v4"])
def test_rebuilt_state_steps_to_the_envs_own_next_observation(env_id):
    """From an unclipped observation alone (x position set to 0), one MuJoCo step gives the
    observation the env itself gave, on real steps whose true x is far from 0."""
    data = collect(env_id, 1500, seed=0)
    env = gym.make(env_id)
    nq = env.unwrapped.model.nq
    family = env_id.split("-")[0].lower()
    clipped = diagnostics.at_velocity_clip(data["obs"], nq, family)
    keep = ~clipped
    assert keep.sum() >= 100
    assert np.abs(data["qpos"][keep, 0]).max() > 0.1  # the x position the rebuild drops did vary
    qpos, qvel = diagnostics.rebuild_states(data["obs"][keep], nq)
    rebuilt_next = diagnostics.simulate(env, qpos, qvel, data["act"][keep])
    np.testing.assert_allclose(rebuilt_next, data["next_obs"][keep], rtol=0, atol=REPLAY_TOL)
    if (
        family == "walker2d"
    ):  # random actions drive its joints to the clip (1207 of 1500 steps): there the rebuild is wrong
        assert clipped.sum() > 100
        qpos, qvel = diagnostics.rebuild_states(data["obs"][clipped], nq)
        wrong = (
            np.abs(diagnostics.simulate(env, qpos, qvel, data["act"][clipped]) - data["next_obs"][clipped]).max(1)
            > 1e-3
        )
        assert wrong.mean() > 0.5


def test_velocity_clip_rule():
    """Hopper and walker2d skip a sample when any velocity is at or past +-10; halfcheetah never."""
    obs = np.zeros((4, 11))
    obs[1, 5], obs[2, 10], obs[3, 4] = 10.0, -10.0, 10.0  # obs[4] is a joint angle (nq - 1 = 5), not a velocity
    np.testing.assert_array_equal(diagnostics.at_velocity_clip(obs, 6, "hopper"), [False, True, True, False])
    assert not diagnostics.at_velocity_clip(np.full((2, 17), 50.0), 9, "halfcheetah").any()


def test_simulator_states_are_read_from_the_file_or_reported_missing(hopper_file, tmp_path):  # noqa: F811
    """The stored states are the file's infos/qpos and infos/qvel row for row; a file without them gives None."""
    data = datasets.load_dataset("hopper-medium-v2", hopper_file)
    qpos, qvel = datasets.simulator_states(data)
    with h5py.File(hopper_file, "r") as file:
        np.testing.assert_array_equal(qpos, file["infos/qpos"][()])
        np.testing.assert_array_equal(qvel, file["infos/qvel"][()])
        arrays = {key: file[key][()] for key in datasets.REQUIRED_KEYS}
    bare = tmp_path / "bare.hdf5"
    datasets.write_hdf5_atomically(bare, arrays, {})
    assert datasets.simulator_states(datasets.load_dataset("hopper-medium-v2", str(bare))) is None


class OffsetModel:
    """A stand-in ensemble of 3 elites: each predicts the true next observation, plus a known
    offset from elites 1 and 2 on the samples whose row in the table is even."""

    OFFSETS = torch.tensor([[0.0, 0.0], [0.3, 0.4], [0.0, 1.2]])  # on observation dims 0 and 5: norms 0, 0.5, 1.2

    def __init__(self, obs: np.ndarray, next_obs: np.ndarray):
        self.elites = torch.arange(3)
        self.row = {o.tobytes(): i for i, o in enumerate(obs.astype(np.float32))}
        self.next_obs = torch.as_tensor(next_obs, dtype=torch.float32)

    def elite_mean_next_obs(self, obs, act):
        rows = torch.tensor([self.row[o.tobytes()] for o in obs.numpy()])
        predicted = self.next_obs[rows].expand(3, -1, -1).clone()
        on_subset = (rows % 2 == 0).float()[None, :, None]
        predicted[..., [0, 5]] += self.OFFSETS[:, None, :] * on_subset
        return predicted

    def __call__(self, obs, act, members=None):  # MOPO's input: unit variances
        shape = (3 if members is None else len(members), len(obs), obs.shape[1] + 1)
        return torch.zeros(shape), torch.zeros(shape)

    mopo_penalty = ProbabilisticEnsemble.mopo_penalty


def test_model_error_is_the_distance_of_the_drawn_elite_from_mujoco():
    """With stored simulator states, the error is exactly the drawn elite's offset on the offset
    samples and zero elsewhere; every elite is drawn."""
    data = collect("Hopper-v4", 600, seed=3)
    model = OffsetModel(data["obs"], data["next_obs"])
    run = SimpleNamespace(
        env=gym.make("Hopper-v4"), data=SimpleNamespace(family="hopper"), dynamics=model, penalty=None
    )
    obs = data["obs"].astype(np.float32)
    result = diagnostics.evaluate_set(run, obs, data["act"].astype(np.float32), (data["qpos"], data["qvel"]), "test")
    rows = np.array([model.row[o.tobytes()] for o in result["obs"]])
    expected = np.where(rows % 2 == 0, OffsetModel.OFFSETS.norm(dim=1)[result["elite"]].numpy(), 0.0)
    assert result["skipped"] == 0 and len(result["error"]) == len(obs)
    assert set(result["elite"].tolist()) == {0, 1, 2}
    np.testing.assert_allclose(result["error"], expected, rtol=0, atol=FLOAT32_TOL)
    np.testing.assert_allclose(result["penalties"]["mopo"]["penalty"], math.sqrt(12))  # ||std|| of 12 unit outputs


class ReplayActor:
    """Plays the recorded action of the recorded observation nearest to the one it is given."""

    def __init__(self, obs: np.ndarray, act: np.ndarray):
        self.obs, self.act_table = obs, act

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.act_table[np.abs(self.obs - obs).sum(1).argmin()]


class StillModel:
    """A stand-in ensemble of 3 elites that predict no change, with rewards 1, 2 and 3."""

    elites = torch.arange(3)

    def __call__(self, obs, act, members=None):
        mean = torch.zeros(3 if members is None else len(members), len(obs), obs.shape[1] + 1)
        mean[..., -1] = torch.tensor([1.0, 2.0, 3.0])[:, None]
        return mean, torch.zeros_like(mean)

    mopo_penalty = ProbabilisticEnsemble.mopo_penalty


def test_drift_replays_recorded_episodes_to_their_end():
    """Started at the first state of recorded episodes and playing the recorded actions, the drift's
    true rewards are the recorded ones, its errors those of "no change", and it stops where the
    episode terminated (Hopper falls within 40 steps under random actions)."""
    data = collect("Hopper-v4", 300, seed=3)
    first = np.flatnonzero(np.r_[True, data["terminated"][:-1]])[:3]
    run = SimpleNamespace(
        env=gym.make("Hopper-v4"), actor=ReplayActor(data["obs"], data["act"]), dynamics=StillModel(), penalty=None
    )
    drift = diagnostics.real_drift(run, data["qpos"][first], data["qvel"][first], steps=40)
    for row, start in enumerate(first):
        length = np.flatnonzero(data["terminated"][start:])[0] + 1
        episode = slice(start, start + length)
        np.testing.assert_allclose(drift["true_reward"][row, :length], data["rew"][episode], rtol=0, atol=1e-9)
        np.testing.assert_allclose(
            drift["error"][row, :length],
            np.linalg.norm(data["obs"][episode] - data["next_obs"][episode], axis=1),
            rtol=1e-5,
            atol=1e-5,
        )
        np.testing.assert_allclose(drift["model_reward"][row, :length], 2.0)
        np.testing.assert_allclose(drift["mopo_penalty"][row, :length], math.sqrt(12))  # ||std|| of 12 unit outputs
        for values in drift.values():
            assert np.isnan(values[row, length:]).all()


def test_drift_starts_from_any_row_or_from_the_first_rows_of_the_episodes():
    """episode-starts draws only first rows of finished episodes, each once; dataset draws any rows as before.
    Catches: episode ends taken for starts, the unfinished tail taken, a different draw for the default."""
    terminals, timeouts = np.zeros(50, dtype=bool), np.zeros(50, dtype=bool)
    terminals[[9, 24]], timeouts[39] = True, True  # episodes 0-9, 10-24, 25-39; rows 40-49 unfinished
    zeros = np.zeros((50, 3), dtype=np.float32)
    data = datasets.OfflineDataset(
        zeros,
        zeros,
        np.zeros(50),
        zeros,
        terminals,
        timeouts,
        "toy",
        "hopper-medium",
        "hopper",
        "Hopper-v4",
        "file",
        "toy.hdf5",
    )
    starts = diagnostics.drift_start_rows(data, "episode-starts", 10, np.random.default_rng(0))
    assert sorted(starts.tolist()) == [0, 10, 25]
    rows = diagnostics.drift_start_rows(data, "dataset", 7, np.random.default_rng(1))
    assert rows.tolist() == np.random.default_rng(1).choice(50, 7, replace=False).tolist()


def test_drift_summary_averages_over_the_starts_still_running():
    true_reward = np.array([[1.0] * 12, [3.0] * 2 + [np.nan] * 10])
    summary = diagnostics.drift_summary(
        {"true_reward": true_reward, "model_reward": true_reward + 1, "error": true_reward * 0}, 4.5
    )
    assert summary["true_reward_first_10"] == pytest.approx((10 * 1 + 2 * 3) / 12)
    assert summary["true_reward_all"] == pytest.approx((12 + 6) / 14)
    assert summary["by_step"]["true_reward"] == [2.0, 2.0] + [1.0] * 10
    assert (summary["starts"], summary["steps"], summary["running_at_end"], summary["data_reward_mean"]) == (
        2,
        12,
        0.5,
        4.5,
    )


# ---------------------------------------------------------------------------------------------
# Statistics


def test_correlations_on_constructed_cases():
    rng = np.random.default_rng(0)
    error = rng.exponential(size=10_000)
    same = diagnostics.correlations(error, error)
    assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    shuffled = diagnostics.correlations(rng.permutation(error), error)
    assert abs(shuffled["pearson"]) < 0.05 and abs(shuffled["spearman"]) < 0.05
    monotone = diagnostics.correlations(np.exp(error), error)  # ranks agree, values do not
    assert monotone["spearman"] == pytest.approx(1.0) and monotone["pearson"] < 0.9
    # By hand: ranks with ties averaged are [1, 2.5, 2.5, 4] vs [1, 2, 3, 4], so rho = 4.5 / sqrt(4.5 * 5).
    tied = diagnostics.correlations(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert tied["spearman"] == pytest.approx(math.sqrt(0.9))
    assert diagnostics.correlations(np.array([1.0, 3.0, 2.0]), np.array([1.0, 2.0, 3.0]))["pearson"] == pytest.approx(
        0.5
    )


def test_penalty_by_tenth_of_the_error_follows_the_error_order_not_the_sample_order():
    """20 samples in shuffled order: each tenth holds the 2 samples of the next-larger errors."""
    rng = np.random.default_rng(0)
    order = rng.permutation(20)
    error = order.astype(float)  # sample i has the error rank order[i]
    tenths = diagnostics.by_error_tenth(10.0 * error, error)
    assert tenths == pytest.approx([10.0 * (2 * k + 0.5) for k in range(10)])
    assert diagnostics.by_error_tenth(np.ones(20), error) == pytest.approx([1.0] * 10)  # a constant penalty is flat
    assert diagnostics.by_error_tenth(np.array([3.0, 1.0, 2.0]), np.array([0.3, 0.1, 0.2])) == [
        1.0,
        2.0,
        3.0,
    ]  # fewer than 10: one part each
    assert diagnostics.by_error_tenth(np.array([1.0, 3.0, 2.0]), np.array([0.3, 0.1, 0.2])) == [
        3.0,
        2.0,
        1.0,
    ]  # ordered by the error, not the penalty


def test_drop_summary_counts_tau_against_the_clip():
    """Correlations on the clipped penalty values (clipped samples tie); fractions of tau
    strictly below s1 and above s2; a log penalty below zero raises the reward."""
    hp = TaskDefaults(
        horizon=5, eta=5.0, dice_steps=1, dice_lr=1e-4, dice_lambda=0.1, clip=(0.01, 10.0), transform="log", epochs=1
    )
    tau = np.array([0.005, 0.001, 0.5, 11.0, 1.0, 20.0, 3.0, 0.01])
    error = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    values = {"penalty": penalty(torch.as_tensor(tau), "log", hp.clip).numpy(), "tau": tau}
    summary = diagnostics.summary("drop", values, error, hp)
    clipped = np.log(np.clip(tau, 0.01, 10.0))
    assert summary["tau_below_clip"] == 2 / 8 and summary["tau_above_clip"] == 2 / 8
    assert summary["raises_reward"] == 4 / 8
    assert summary["mean"] == pytest.approx(clipped.mean())
    assert summary["spearman"] == pytest.approx(stats.spearmanr(clipped, error)[0])
    assert summary["pearson"] == pytest.approx(np.corrcoef(clipped, error)[0, 1])
    assert summary["pearson"] != pytest.approx(np.corrcoef(np.log(tau), error)[0, 1])  # not the unclipped log


# ---------------------------------------------------------------------------------------------
# The command on a tiny trained run


def assert_finite_numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            assert_finite_numbers(v)
    elif isinstance(value, float):
        assert math.isfinite(value)


def assert_figures_and_json(folder, penalties: list[str]) -> dict:
    import matplotlib.image

    for name in ("fig2.png", "fig3.png", "drift.png"):
        image = matplotlib.image.imread(str(folder / name))
        assert image.ndim == 3 and min(image.shape[:2]) > 200
    result = json.loads((folder / "diagnostics.json").read_text())
    for set_name in ("dataset", "rollout"):
        s = result[set_name]
        assert s["n"] > 0 and s["skipped"] >= 0 and set(penalties) <= set(s)
        for name in penalties:
            assert {"pearson", "spearman", "mean"} <= set(s[name])
        if "drop" in penalties:
            assert {"tau_below_clip", "tau_above_clip"} <= set(s["drop"])
    assert_finite_numbers(result)
    # The JSON's statistics, recomputed from the saved samples with plain numpy and scipy.
    samples = np.load(folder / "samples.npz")
    for set_name in ("dataset", "rollout"):
        error = samples[f"{set_name}/error"]
        assert len(error) == result[set_name]["n"] == len(samples[f"{set_name}/elite"])
        for name in penalties:
            values, reported = samples[f"{set_name}/{name}_penalty"], result[set_name][name]
            assert reported["pearson"] == pytest.approx(np.corrcoef(values, error)[0, 1])
            assert reported["spearman"] == pytest.approx(stats.spearmanr(values, error)[0])
            assert reported["mean"] == pytest.approx(values.mean())
            assert reported["by_error_tenth"][-1] == pytest.approx(
                values[np.argsort(error)[-(len(error) // 10) :]].mean()
            )
    for name in ("true_reward", "model_reward", "error", *(f"{kind}_penalty" for kind in penalties)):
        assert result["drift"][f"{name}_all"] == pytest.approx(np.nanmean(samples[f"drift/{name}"]))
    separated = result["separation"]
    assert list(separated["classifiers"]) == [
        "state and action",
        "state only",
        "action only",
    ]  # fresh ones only: neither run has classifier heads
    assert all(
        0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["rollout_above_clip"] <= 1.0
        for row in separated["classifiers"].values()
    )
    assert (
        0
        < separated["held_out"]
        <= min(result["dataset"]["n"] + result["dataset"]["skipped"], separated["rollout_samples"] // 2)
    )
    return result


def test_command_writes_figures_and_json(runs):
    result = subprocess.run(
        [sys.executable, f"{ROOT}/diagnostics.py", "runs/drop", "--samples", "200", "--separation-steps", "50"],
        cwd=runs,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = runs / "runs" / "drop" / "diagnostics"
    stats = assert_figures_and_json(out, ["drop", "mopo"])
    assert (
        stats["dataset"]["states"] == "stored infos/qpos, infos/qvel"
        and stats["rollout"]["states"] == "rebuilt from observations"
    )
    assert stats["dataset"]["n"] + stats["dataset"]["skipped"] == 200
    assert "times:" in result.stdout and "rollout  drop" in result.stdout and "separation, " in result.stdout
    assert not list((runs / "runs" / "drop").glob(".diagnostics-*"))


def test_mopo_run_shows_only_mopo_and_says_so(runs, monkeypatch, capsys):
    monkeypatch.chdir(runs)  # its --dynamics-path is relative to where it was trained
    diagnostics.main(diagnostics.Args("runs/mopo", samples=100, separation_steps=50))
    result = assert_figures_and_json(runs / "runs" / "mopo" / "diagnostics", ["mopo"])
    assert "drop" not in result["dataset"] and "only MOPO" in result["notes"][0]
    assert "only MOPO" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Bad runs: one line, nothing written


def broken_copy(runs, tmp_path, change) -> str:
    """A copy of the tiny drop run with one thing broken by `change(folder, checkpoint)`."""
    folder = tmp_path / "run"
    shutil.copytree(runs / "runs" / "drop", folder, ignore=shutil.ignore_patterns("diagnostics"))
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    change(folder, checkpoint)
    torch.save(checkpoint, folder / "checkpoint.pt")
    return str(folder)


def walker_checkpoint(folder, checkpoint, tmp_path):
    """The checkpoint of a walker2d run, dropped into the hopper run's folder."""
    walker = tmp_path / "walker.hdf5"
    datasets.collect("Walker2d-v4", "random", 300, seed=0, out=walker)
    checkpoint.update(
        family="walker2d", obs_dim=17, act_dim=6, eval_env_id="Walker2d-v4", actor=Actor(17, 6, 32).state_dict()
    )
    checkpoint["args"].update(env="walker2d-medium-v2", dataset=str(walker))


@pytest.mark.parametrize("case, words", [
    ("not a run", ["no checkpoint", "drop.py"]),
    ("dataset gone", ["dataset", "gone.hdf5", "not found"]),
    ("dynamics gone", ["dynamics", "dynamics.pt", "gone"]),
    ("another robot", ["hopper", "walker2d"]),
])  # fmt: skip
def test_broken_run_ends_in_one_line_and_writes_nothing(runs, tmp_path, case, words):
    if case == "not a run":
        folder = str(tmp_path)
    elif case == "dataset gone":
        folder = broken_copy(runs, tmp_path, lambda f, c: c["args"].update(dataset=str(tmp_path / "gone.hdf5")))
    elif case == "dynamics gone":
        folder = broken_copy(
            runs, tmp_path, lambda f, c: c.update(dynamics_path=str(f / "dynamics.pt"))
        )  # a file that is not there
    else:
        folder = broken_copy(runs, tmp_path, lambda f, c: walker_checkpoint(f, c, tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        diagnostics.main(diagnostics.Args(folder, samples=100))
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for word in words:
        assert word in message, message
    assert not list(tmp_path.rglob("*diagnostics*"))


def test_late_failure_leaves_nothing_behind(runs, tmp_path, monkeypatch):
    """A failure after Fig. 2 is drawn (here: in the UMAP) leaves no diagnostics folder and no temporary files."""
    folder = broken_copy(runs, tmp_path, lambda f, c: None)

    def failing_umap(*args):
        raise RuntimeError("UMAP failed")

    monkeypatch.setattr(diagnostics, "umap_embeddings", failing_umap)
    with pytest.raises(RuntimeError, match="UMAP failed"):
        diagnostics.main(diagnostics.Args(folder, samples=50))
    assert not list(tmp_path.rglob("*diagnostics*"))


@pytest.mark.parametrize("settings, words", [
    ({"samples": 5}, "--samples 5"),
    ({"drift_steps": 0}, "--drift-steps 0"),
    ({"separation_steps": -1}, "--separation-steps -1"),
])  # fmt: skip
def test_impossible_settings_are_refused_in_one_line_before_anything_loads(settings, words, tmp_path):
    with pytest.raises(SystemExit, match="^error: ") as error:
        diagnostics.main(diagnostics.Args(str(tmp_path / "no-run"), **settings))
    assert words in str(error.value) and "\n" not in str(error.value)


def test_figures_skipped_are_not_computed_and_no_stale_one_stays(runs, tmp_path, monkeypatch):
    """--no-fig3 never runs the UMAP, and --no-fig3 --drift-starts 0 leaves no fig3.png or drift.png of an earlier command."""
    folder = broken_copy(runs, tmp_path, lambda f, c: None)
    earlier = tmp_path / "run" / "diagnostics"
    earlier.mkdir()
    for name in ("fig3.png", "drift.png", "fig2.png"):
        (earlier / name).write_bytes(b"an earlier command's figure")

    def failing_umap(*args):
        raise AssertionError("the UMAP ran under --no-fig3")

    monkeypatch.setattr(diagnostics, "umap_embeddings", failing_umap)
    diagnostics.main(diagnostics.Args(folder, samples=50, fig3=False, drift_starts=0, separation_steps=0))
    assert sorted(p.name for p in earlier.iterdir()) == ["diagnostics.json", "fig2.png", "samples.npz"]
    assert (earlier / "fig2.png").read_bytes().startswith(b"\x89PNG")
    assert "fig3" not in json.loads((earlier / "diagnostics.json").read_text())["times_s"]
