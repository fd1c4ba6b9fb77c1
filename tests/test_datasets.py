"""Tests for datasets.py. Small files are collected from real Hopper-v4 steps; nothing touches the network."""

import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

import datasets
from datasets import REQUIRED_KEYS, DatasetError, TanhGaussianPolicy, load_dataset

# The band for policies/hopper-medium.npz, D4RL-normalised (D4RL's hopper-medium policy scores about 45).
# D4RL-normalised; D4RL's own medium datasets score about 44 (hopper), 41 (halfcheetah) and 62 (walker2d).
MEDIUM_BANDS = {"hopper": (35.0, 55.0), "halfcheetah": (35.0, 55.0), "walker2d": (55.0, 80.0)}
# 20: walker2d's policy falls early in some episodes (the first of seed 0 at once), as its data does.
MEDIUM_EPISODES = 20

TIME_LIMIT = 40  # short, so that the small test file has truncated episodes as well as terminated ones
NUM_TRANSITIONS = 2000


def write_random_policy(path: Path, seed: int, obs_dim: int = 11, act_dim: int = 3) -> Path:
    np.savez(path, **TanhGaussianPolicy.random_init(obs_dim, act_dim, np.random.default_rng(seed)).params)
    return path


def read_raw(path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    with h5py.File(path, "r") as file:
        file.visititems(lambda key, item: arrays.update({key: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return arrays


def write_raw(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as file:
        for key, array in arrays.items():
            file.create_dataset(key, data=array)
    return path


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory) -> Path:
    """A D4RL-format file of 2000 Hopper-v4 steps from an untrained actor with a 40-step time limit."""
    path = tmp_path_factory.mktemp("d4rl") / "hopper-small.hdf5"
    datasets.collect("Hopper-v4", "random", NUM_TRANSITIONS, seed=0, out=path, max_episode_steps=TIME_LIMIT)
    raw = read_raw(path)
    assert raw["terminals"].any() and (raw["timeouts"] & ~raw["terminals"]).any(), "need both kinds of episode end"
    return path


@pytest.fixture
def caches(tmp_path, monkeypatch) -> Path:
    """Empty D4RL and built-in caches, so no test sees (or fills) the user's."""
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("DROP_DATA_DIR", str(tmp_path / "drop"))
    return tmp_path / "d4rl"


def hopper_is_healthy(observation: np.ndarray) -> bool:
    """Hopper-v4's own health test, read off an observation (obs[0] is the height, obs[1] the angle)."""
    height, angle = observation[0], observation[1]
    return height > 0.7 and abs(angle) < 0.2 and bool(np.all(np.abs(observation[1:]) < 100))


# ---------------------------------------------------------------------------------------------
# D4RL files


def test_d4rl_file_terminals_timeouts_and_next_observations(hopper_file):
    data = load_dataset("hopper-medium-v2", dataset_path=str(hopper_file))
    assert (data.source, data.family, data.task, data.eval_env_id) == ("file", "hopper", "hopper-medium", "Hopper-v4")
    assert data.observations.dtype == np.float32 and data.terminals.dtype == bool

    # Terminals are exactly the steps that left the hopper unhealthy ...
    unhealthy = np.array([not hopper_is_healthy(obs) for obs in data.next_observations])
    np.testing.assert_array_equal(data.terminals, unhealthy)
    # ... and timeouts the steps that hit the time limit (or the end of the collection budget).
    step_in_episode = np.zeros(len(data), dtype=int)
    for episode in data.episode_slices():
        step_in_episode[episode] = np.arange(episode.stop - episode.start)
    expected_timeouts = step_in_episode == TIME_LIMIT - 1
    expected_timeouts[-1] = True
    np.testing.assert_array_equal(data.timeouts, expected_timeouts)

    # Inside an episode s' is the next row's s; at a boundary it is the file's, not the next episode's start.
    boundaries = np.flatnonzero(data.terminals | data.timeouts)[:-1]
    inside = np.setdiff1d(np.arange(len(data) - 1), boundaries)
    np.testing.assert_array_equal(data.next_observations[inside], data.observations[inside + 1])
    np.testing.assert_array_equal(data.next_observations, read_raw(hopper_file)["next_observations"])
    assert not np.any(np.all(data.next_observations[boundaries] == data.observations[boundaries + 1], axis=1))


def test_d4rl_file_keeps_modified_next_observations(hopper_file, tmp_path):
    raw = read_raw(hopper_file)
    raw["next_observations"][5] = 42.0
    data = load_dataset("hopper-medium-v2", dataset_path=str(write_raw(tmp_path / "edited.hdf5", raw)))
    np.testing.assert_array_equal(data.next_observations[5], np.full(11, 42.0, np.float32))


def test_old_file_without_timeouts_loads_as_never_truncated(hopper_file, tmp_path):
    raw = read_raw(hopper_file)
    del raw["timeouts"]
    data = load_dataset("hopper-medium-v0", dataset_path=str(write_raw(tmp_path / "v0.hdf5", raw)))
    assert not data.timeouts.any() and data.terminals.any()


def test_official_d4rl_urls_and_cache_names(monkeypatch):
    monkeypatch.delenv("DROP_D4RL_BASE_URL", raising=False)
    monkeypatch.setenv("D4RL_DATASET_DIR", "/cache")
    base = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
    assert datasets.d4rl_url("hopper-medium-v2") == f"{base}/gym_mujoco_v2/hopper_medium-v2.hdf5"
    assert datasets.d4rl_url("walker2d-medium-expert-v1") == f"{base}/gym_mujoco_v1/walker2d_medium_expert-v1.hdf5"
    assert datasets.d4rl_url("hopper-medium-replay-v0") == f"{base}/gym_mujoco/hopper_mixed.hdf5"
    assert datasets.d4rl_url("walker2d-medium-replay-v0") == f"{base}/gym_mujoco/walker_mixed.hdf5"
    assert datasets.d4rl_cache_path("walker2d-medium-replay-v2") == Path("/cache/walker2d_medium_replay-v2.hdf5")


def test_d4rl_cache_hit_by_official_file_name(hopper_file, caches, monkeypatch):
    caches.mkdir()
    shutil.copy(hopper_file, caches / "hopper_medium-v2.hdf5")

    def no_network(url, dest):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(datasets, "download", no_network)
    data = load_dataset("hopper-medium-v2")
    assert data.path == str(caches / "hopper_medium-v2.hdf5")
    assert (data.name, data.source, data.task) == ("hopper-medium-v2", "d4rl", "hopper-medium")
    assert len(data) == NUM_TRANSITIONS
    env = datasets.make_eval_env(data, seed=0)
    assert env.spec.id == "Hopper-v4"
    env.close()


# ---------------------------------------------------------------------------------------------
# Downloads, from a local server


@pytest.fixture(scope="module")
def file_server(hopper_file):
    """Serves the valid file, one that breaks off half-way, and one that is not HDF5."""
    valid = hopper_file.read_bytes()
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            payload, sent = {
                "/gym_mujoco_v2/hopper_medium-v2.hdf5": (valid, len(valid)),
                "/gym_mujoco_v2/hopper_expert-v2.hdf5": (valid, len(valid) // 2),  # then hang up
                "/gym_mujoco_v2/hopper_random-v2.hdf5": (b"<html>rate limited</html>", None),
            }.get(self.path, (None, None))
            if payload is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[:sent])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def test_download_lands_in_cache_and_is_reused(file_server, caches, monkeypatch):
    base_url, requests = file_server
    monkeypatch.setenv("DROP_D4RL_BASE_URL", base_url)
    requests.clear()
    data = load_dataset("hopper-medium-v2")
    assert data.path == str(caches / "hopper_medium-v2.hdf5") and len(data) == NUM_TRANSITIONS
    assert sorted(p.name for p in caches.iterdir()) == ["hopper_medium-v2.hdf5"]
    load_dataset("hopper-medium-v2")
    assert requests == ["/gym_mujoco_v2/hopper_medium-v2.hdf5"]


@pytest.mark.parametrize("name, problem", [("hopper-expert-v2", "broke off"), ("hopper-random-v2", "signature")])
def test_broken_download_leaves_nothing_behind(file_server, caches, monkeypatch, name, problem):
    monkeypatch.setenv("DROP_D4RL_BASE_URL", file_server[0])
    with pytest.raises(DatasetError, match=problem) as error:
        load_dataset(name)
    assert "\n" not in str(error.value)
    assert list(caches.iterdir()) == []


def test_no_network_says_where_to_put_the_file(caches, monkeypatch):
    monkeypatch.setenv("DROP_D4RL_BASE_URL", "http://127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(DatasetError) as error:
        load_dataset("hopper-medium-replay-v2")
    message = str(error.value)
    assert "http://127.0.0.1:1/gym_mujoco_v2/hopper_medium_replay-v2.hdf5" in message
    assert str(caches / "hopper_medium_replay-v2.hdf5") in message
    assert "--env builtin-hopper-medium" in message and "\n" not in message
    assert list(caches.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Minari


def make_minari_dataset(dataset_id: str, num_episodes: int = 4, time_limit: int = 15) -> list[dict]:
    """A small local Minari dataset of random Hopper-v5 episodes; returns the episodes written.

    Built from episode buffers: minari.DataCollector needs jax (minari[create]), which is not installed.
    """
    minari = pytest.importorskip("minari")
    from minari.data_collector import EpisodeBuffer

    env = gym.make("Hopper-v5", max_episode_steps=time_limit)
    env.action_space.seed(0)
    episodes = []
    for seed in range(num_episodes):
        observation, _ = env.reset(seed=seed)
        episode = {"observations": [observation], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        done = False
        while not done:
            action = env.action_space.sample()
            observation, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(episode, (observation, action, reward, terminated, truncated)):
                episode[key].append(value)
            done = terminated or truncated
        episodes.append({key: np.array(values) for key, values in episode.items()})
    buffers = [EpisodeBuffer(id=i, seed=i, infos={}, **episode) for i, episode in enumerate(episodes)]
    with pytest.warns(UserWarning):  # minari asks for author and description metadata
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env, eval_env="Hopper-v5", algorithm_name="random")
    return episodes


def test_minari_dataset_is_flattened_within_episodes(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    episodes = make_minari_dataset("mujoco/hopper/medium-v0")
    terminations = np.concatenate([e["terminations"] for e in episodes])
    truncations = np.concatenate([e["truncations"] for e in episodes])
    assert terminations.any() and truncations.any(), "need both kinds of episode end"

    data = load_dataset("mujoco/hopper/medium-v0")
    assert (data.source, data.family, data.task, data.eval_env_id) == ("minari", "hopper", "hopper-medium", "Hopper-v5")
    assert len(data) == sum(len(e["actions"]) for e in episodes)
    np.testing.assert_array_equal(data.terminals, terminations)
    np.testing.assert_array_equal(data.timeouts, truncations)
    row = 0
    for episode in episodes:
        steps = len(episode["actions"])
        np.testing.assert_allclose(data.observations[row : row + steps], episode["observations"][:-1], rtol=1e-6)
        np.testing.assert_allclose(data.next_observations[row : row + steps], episode["observations"][1:], rtol=1e-6)
        row += steps
    assert [s.stop - s.start for s in data.episode_slices()] == [len(e["actions"]) for e in episodes]
    assert data.episode_starts().tolist() == np.cumsum([0] + [len(e["actions"]) for e in episodes[:-1]]).tolist()
    env = datasets.make_eval_env(data, seed=0)
    assert env.spec.id == "Hopper-v5"
    env.close()


def test_minari_id_that_is_not_available(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))

    def offline(dataset_id, *args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(minari.storage.hosting, "download_dataset", offline)
    with pytest.raises(DatasetError, match="mujoco/hopper/expert-v0 is not available.*unreachable"):
        load_dataset("mujoco/hopper/expert-v0")


# ---------------------------------------------------------------------------------------------
# The collector and the built-in datasets


def test_collector_is_reproducible_and_records_the_state_before_each_step(tmp_path):
    policy = str(write_random_policy(tmp_path / "policy.npz", seed=7))
    paths = {}
    for label, seed in [("a", 3), ("b", 3), ("c", 4)]:
        paths[label] = tmp_path / f"{label}.hdf5"
        datasets.collect("Hopper-v4", policy, 300, seed=seed, out=paths[label])
    a, b, c = (read_raw(paths[label]) for label in "abc")
    assert a.keys() == b.keys() == set(REQUIRED_KEYS) | {"infos/qpos", "infos/qvel"}
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    assert not np.array_equal(a["observations"], c["observations"])
    with h5py.File(paths["a"], "r") as file:
        assert file.attrs["seed"] == 3 and file.attrs["policy_sha256"] == datasets._sha256(Path(policy))

    # Restoring the recorded state and replaying the action reproduces the recorded step.
    env = datasets.make_gym_env("Hopper-v4")
    env.reset(seed=0)
    for row in (0, 57, 299):
        env.unwrapped.set_state(a["infos/qpos"][row], a["infos/qvel"][row])
        next_observation, reward, *_ = env.step(a["actions"][row])
        np.testing.assert_allclose(next_observation, a["next_observations"][row], rtol=1e-5, atol=1e-5)
        assert reward == pytest.approx(a["rewards"][row], rel=1e-5)
    env.close()


@pytest.fixture
def hopper_policies(tmp_path, caches, monkeypatch):
    """Stand-in hopper medium and expert policies, and built-in levels of 200 transitions."""
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    write_random_policy(policy_dir / "hopper-medium.npz", seed=1)
    write_random_policy(policy_dir / "hopper-expert.npz", seed=2)
    monkeypatch.setattr(datasets, "POLICY_DIR", policy_dir)
    monkeypatch.setattr(datasets, "BUILTIN_TRANSITIONS", 200)


def test_builtin_datasets_are_collected_once_and_concatenated(tmp_path, hopper_policies, monkeypatch):
    data = load_dataset("builtin-hopper-medium-expert")
    assert (data.source, data.task, data.eval_env_id) == ("builtin", "hopper-medium-expert", "Hopper-v4")
    assert len(data) == 400
    assert data.timeouts[199] or data.terminals[199], "the medium part must end its last episode"
    assert data.provenance["expert.seed"] == "2"
    assert len(list((tmp_path / "drop").iterdir())) == 2

    def no_collecting(*args, **kwargs):
        raise AssertionError("collected again instead of using the cache")

    monkeypatch.setattr(datasets, "collect", no_collecting)
    again = load_dataset("builtin-hopper-medium")
    np.testing.assert_array_equal(again.observations, data.observations[:200])

    assert "builtin-hopper-medium" in datasets.available_builtin_names()
    assert "builtin-walker2d-medium" not in datasets.available_builtin_names()
    with pytest.raises(DatasetError, match="walker2d-medium.npz, which does not exist"):
        load_dataset("builtin-walker2d-medium")


def test_builtin_1m_starts_with_the_200k_dataset(hopper_policies):
    small, large = load_dataset("builtin-hopper-medium"), load_dataset("builtin-hopper-medium-1m")
    assert (large.task, len(large), large.name) == ("hopper-medium", 1000, "builtin-hopper-medium-1m")
    for key in ("observations", "actions", "rewards", "next_observations", "terminals"):
        np.testing.assert_array_equal(getattr(large, key)[:200], getattr(small, key), err_msg=key)
    # Only the cut that ends the small dataset differs: there it is a truncation, here the episode goes on.
    np.testing.assert_array_equal(large.timeouts[:199], small.timeouts[:199])
    assert len(load_dataset("builtin-hopper-medium-expert-1m")) == 2000


def test_builtin_random_needs_no_policy_file(tmp_path, caches, monkeypatch):
    monkeypatch.setattr(datasets, "POLICY_DIR", tmp_path / "no-policies")
    monkeypatch.setattr(datasets, "BUILTIN_TRANSITIONS", 100)
    data = load_dataset("builtin-hopper-random")
    assert (data.task, len(data)) == ("hopper-random", 100)


@pytest.mark.parametrize("family", ["hopper", "halfcheetah", "walker2d"])
def test_builtin_medium_policy_scores_in_band(family):
    policy_file = datasets.POLICY_DIR / f"{family}-medium.npz"
    if not policy_file.exists():
        pytest.skip(f"{policy_file} does not exist yet (train it with sac.py)")
    policy = TanhGaussianPolicy.load(policy_file)
    returns = datasets.evaluate_policy(policy, datasets.FAMILY_ENV_IDS[family], MEDIUM_EPISODES, seed=0)
    score = datasets.normalized_score(family, returns).mean()
    low, high = MEDIUM_BANDS[family]
    assert low <= score <= high, f"{family}-medium policy scores {score:.1f}, outside [{low}, {high}]"


@pytest.mark.parametrize(
    "family, random_return, expert_return",
    [("hopper", -20.272305, 3234.3), ("halfcheetah", -280.178953, 12135.0), ("walker2d", 1.629008, 4592.3)],
)
def test_normalized_score(family, random_return, expert_return):
    """D4RL's reference returns (d4rl/infos.py): the random policy scores 0, the expert 100, linear between."""
    midway = (random_return + expert_return) / 2
    np.testing.assert_allclose(
        datasets.normalized_score(family, [random_return, midway, expert_return]), [0.0, 50.0, 100.0]
    )
    with pytest.raises(DatasetError, match="ant"):
        datasets.normalized_score("ant", [0.0])


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line that names the problem


def truncate(source: Path, path: Path) -> None:
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])


def write_csv(source: Path, path: Path) -> None:
    path.write_text("observations,actions\n1,2\n")


def editing(edit):
    """A file maker that writes a copy of the source with `edit` applied to its arrays."""

    def make(source: Path, path: Path) -> None:
        raw = read_raw(source)
        edit(raw)
        write_raw(path, raw)

    return make


def drop_next_observations(raw):
    del raw["next_observations"]


def shorten_rewards(raw):
    raw["rewards"] = raw["rewards"][:-1]


def put_nan(raw):
    raw["observations"][7, 2] = np.nan


@pytest.mark.parametrize(
    "env, make_file, expected",
    [
        ("hopper-medium-v2", truncate, r"bad\.hdf5: it is not a complete HDF5 file"),
        ("hopper-medium-v2", write_csv, r"bad\.hdf5: it is not a complete HDF5 file"),
        ("hopper-medium-v2", editing(drop_next_observations), r"bad\.hdf5: missing key 'next_observations'"),
        (
            "hopper-medium-v2",
            editing(shorten_rewards),
            r"bad\.hdf5: key 'rewards' has 1999 rows but 'observations' has 2000",
        ),
        ("hopper-medium-v2", editing(put_nan), r"bad\.hdf5: key 'observations' contains NaN or inf \(first at row 7\)"),
        (
            "walker2d-medium-v2",
            shutil.copy,
            r"bad\.hdf5: key 'observations' has shape \(2000, 11\) but walker2d needs \(2000, 17\)",
        ),
        ("hopper-medium-v2", None, r"dataset file not found: .*bad\.hdf5"),
    ],
)
def test_bad_files(hopper_file, tmp_path, env, make_file, expected):
    path = tmp_path / "bad.hdf5"
    if make_file is not None:
        make_file(hopper_file, path)
    with pytest.raises(DatasetError, match=expected) as error:
        load_dataset(env, dataset_path=str(path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            "hopper-medium-v3",
            r"unknown dataset 'hopper-medium-v3': use a D4RL name \(hopper-random-v2, .*"
            r"a built-in name \(.*\), or a Minari id like mujoco/hopper/medium-v0",
        ),
        ("builtin-hopper-medium-replay", "unknown dataset 'builtin-hopper-medium-replay'"),
        ("builtin-hopper-medium-2m", r"unknown dataset 'builtin-hopper-medium-2m'.*add -1m for 1M transitions"),
        ("mujoco/ant/medium-v0", "unsupported Minari id 'mujoco/ant/medium-v0'"),
        ("mujoco/hopper/replay-v0", "unsupported Minari id 'mujoco/hopper/replay-v0'"),
    ],
)
def test_bad_names(env, expected):
    with pytest.raises(DatasetError, match=expected) as error:
        load_dataset(env)
    assert "\n" not in str(error.value)


def test_bad_policy_file(tmp_path):
    policy = tmp_path / "walker.npz"
    write_random_policy(policy, seed=0, obs_dim=17, act_dim=6)
    with pytest.raises(DatasetError, match="maps 17 observations to 6 actions, but Hopper-v4 has 11 and 3"):
        datasets.collect("Hopper-v4", str(policy), 10, seed=0, out=tmp_path / "out.hdf5")
    np.savez(policy, w0=np.zeros((256, 11), np.float32))
    with pytest.raises(DatasetError, match="policy file lacks b0"):
        TanhGaussianPolicy.load(policy)
    assert not (tmp_path / "out.hdf5").exists()


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(Path(datasets.__file__)), "info", "--dataset", "missing.hdf5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["error: dataset file not found: missing.hdf5"]
    assert "Traceback" not in result.stderr


def test_cli_collect_then_info(tmp_path, capsys):
    out = tmp_path / "cli.hdf5"
    datasets.main(["collect", "--out", str(out), "--num-transitions", "150", "--seed", "5"])
    datasets.main(["info", "hopper-expert-v2", "--dataset", str(out)])
    printed = capsys.readouterr().out
    assert "transitions: 150 (obs 11, act 3)" in printed
    assert "task:        hopper-expert" in printed
    assert "D4RL-normalised, eval env Hopper-v4" in printed
    assert "seed: 5" in printed
    assert f"sha256:      {datasets.load_dataset('hopper-expert-v2', str(out)).transitions_sha256()} " in printed


def test_concat_joins_files_row_by_row_with_infos_and_cuts_between_them(tmp_path, capsys):
    """Equal parts of two files, every key (infos/qpos too), and no episode running from one part into the next."""
    first, second, joined = tmp_path / "a.hdf5", tmp_path / "b.hdf5", tmp_path / "ab.hdf5"
    datasets.collect("Hopper-v4", "random", 300, seed=1, out=first)
    datasets.collect("Hopper-v4", "random", 200, seed=2, out=second)
    datasets.main(["concat", "--out", str(joined), str(first), str(second), "--rows-each", "120"])
    assert "wrote 240 rows" in capsys.readouterr().out
    a, b, ab = read_raw(first), read_raw(second), read_raw(joined)
    for key in (*REQUIRED_KEYS, "infos/qpos", "infos/qvel"):
        np.testing.assert_array_equal(
            ab[key], np.concatenate([a[key][:120], b[key][:120]]) if key != "timeouts" else ab[key]
        )
    cut = ab["timeouts"] | ab["terminals"]
    assert cut[119] and cut[239]
    assert (ab["timeouts"][:119] == a["timeouts"][:119]).all()
    with pytest.raises(SystemExit, match="fewer than --rows-each"):
        datasets.main(
            ["concat", "--out", str(tmp_path / "too-many.hdf5"), str(first), str(second), "--rows-each", "250"]
        )
    assert not (tmp_path / "too-many.hdf5").exists()
