"""Offline datasets for DROP: D4RL files, Minari datasets, and built-in datasets collected here.

Whatever the source, the rest of the project sees one `OfflineDataset` of flat transitions
(s, a, r, s', terminal, timeout), in the D4RL conventions:

* `terminals` marks a true environment termination (the hopper fell): no bootstrapping past it.
* `timeouts` marks a time-limit truncation: the episode ends but the state is not terminal.
* `next_observations` always comes from the data itself, never from observations[t + 1], which at
  an episode boundary is the first observation of the *next* episode.

Sources, chosen by the name given to `load_dataset`:

* D4RL names ("hopper-medium-v2"): read from the d4rl cache ($D4RL_DATASET_DIR, default
  ~/.d4rl/datasets, under the official file name, so an existing d4rl cache is reused), else
  downloaded from the official URL ($DROP_D4RL_BASE_URL replaces its base, e.g. with a mirror).
  No d4rl, gym or mujoco_py needed.
* Built-in names ("builtin-hopper-medium"): collected here on first use in Gymnasium's
  Hopper-v4 / Walker2d-v4 / HalfCheetah-v4 from the behaviour policies in policies/, then cached
  in $DROP_DATA_DIR (default ~/.cache/drop/datasets). They work offline. 200k transitions per
  behaviour level; with "-1m" ("builtin-hopper-medium-1m") D4RL's 1M, whose first 200k are the same.
* Minari ids ("mujoco/hopper/medium-v0"): loaded with the optional `minari` package.

Run `python datasets.py --help` for the command line (info, collect, evaluate-policy).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import tempfile
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, NamedTuple

import gymnasium as gym
import h5py
import numpy as np
import tyro
from tqdm import tqdm


class DatasetError(Exception):
    """A problem with the user's dataset or its name; the message is one line that says how to fix it."""


# D4RL's reference returns of a random and an expert policy, for the normalised score.
REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
FAMILY_ENV_IDS = {"hopper": "Hopper-v4", "walker2d": "Walker2d-v4", "halfcheetah": "HalfCheetah-v4"}
OBS_ACT_DIMS = {"hopper": (11, 3), "walker2d": (17, 6), "halfcheetah": (17, 6)}
KINDS = ("random", "medium", "medium-replay", "medium-expert", "expert")
# What `python drop.py` trains on with no flags: the built-in dataset on which DROP at its defaults ends above the data.
DEFAULT_ENV = "builtin-halfcheetah-medium"

# Minari's MuJoCo datasets come in three kinds. "simple" is a single, partly trained policy, like
# D4RL's "medium", so it shares medium's hyperparameters.
MINARI_KINDS = {"simple": "medium", "medium": "medium", "expert": "expert"}
# Minari's MuJoCo datasets are collected in the v5 environments.
MINARI_ENV_IDS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}

REQUIRED_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


def normalized_score(family: str, returns) -> np.ndarray:
    """D4RL's normalised score, elementwise: 0 is a random policy, 100 an expert."""
    if family not in REF_SCORES:
        raise DatasetError(f"no reference scores for '{family}': use one of {', '.join(REF_SCORES)}")
    random_return, expert_return = REF_SCORES[family]
    return 100.0 * (np.asarray(returns, dtype=np.float64) - random_return) / (expert_return - random_return)


@dataclass
class OfflineDataset:
    """Flat transitions plus what the rest of DROP needs to know about where they came from."""

    observations: np.ndarray  # float32 [N, obs_dim]
    actions: np.ndarray  # float32 [N, act_dim]
    rewards: np.ndarray  # float32 [N]
    next_observations: np.ndarray  # float32 [N, obs_dim]
    terminals: np.ndarray  # bool [N]
    timeouts: np.ndarray  # bool [N]
    name: str  # canonical name, or the file name for --dataset
    task: str  # "<family>-<kind>", the key of the per-dataset hyperparameter table
    family: str  # "hopper" | "walker2d" | "halfcheetah"
    eval_env_id: str  # the Gymnasium env to evaluate policies in
    source: str  # "d4rl" | "minari" | "builtin" | "file"
    path: str  # the file the data came from, or the Minari dataset id
    provenance: dict[str, str] = field(default_factory=dict)  # how the file was made (HDF5 attrs)

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    def episode_slices(self) -> list[slice]:
        """Row ranges of the episodes that end in a termination or a timeout.

        A trailing run of rows with neither flag is an unfinished episode and is left out.
        """
        ends = np.flatnonzero(self.terminals | self.timeouts) + 1
        starts = np.concatenate([[0], ends[:-1]])
        return [slice(int(start), int(end)) for start, end in zip(starts, ends)]

    def episode_starts(self) -> np.ndarray:
        """First row of each episode that ends in a termination or a timeout."""
        return np.array([episode.start for episode in self.episode_slices()], dtype=np.int64)

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of each finished episode."""
        return np.array([self.rewards[episode].sum(dtype=np.float64) for episode in self.episode_slices()])

    def transitions_sha256(self) -> str:
        """Fingerprint of the transitions the dynamics learn from: the same bytes give the same ensemble."""
        digest = hashlib.sha256()
        for array in (self.observations, self.actions, self.next_observations, self.rewards):
            digest.update(np.ascontiguousarray(array, dtype=np.float32).data)
        return digest.hexdigest()


def _one_line(error: BaseException) -> str:
    """A library's error text squeezed onto one line, for our one-line messages."""
    return " ".join(str(error).split()) or type(error).__name__


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------
# D4RL-format HDF5 files


def _require_keys(file: h5py.File, label: str) -> None:
    for key in REQUIRED_KEYS:
        # Old -v0 files have no timeouts; _read_arrays then treats every step as not truncated.
        if key not in file and key != "timeouts":
            raise DatasetError(
                f"{label}: missing key '{key}' (a D4RL-format HDF5 needs {', '.join(REQUIRED_KEYS)}; "
                "old D4RL -v0 files lack next_observations, so use the -v2 dataset)"
            )


def _read_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The transition arrays and the attributes of a D4RL-format HDF5, unvalidated."""
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    try:
        with h5py.File(path, "r") as file:
            _require_keys(file, str(path))
            arrays = {key: file[key][()] for key in REQUIRED_KEYS if key in file}
            provenance = {key: str(value) for key, value in file.attrs.items()}
    except OSError as error:
        raise DatasetError(
            f"cannot read {path}: it is not a complete HDF5 file ({_one_line(error)}); download or generate it again"
        ) from None
    if "timeouts" not in arrays:
        arrays["timeouts"] = np.zeros(len(arrays["rewards"]), dtype=bool)
    return arrays, provenance


def _validated(arrays: dict[str, np.ndarray], label: str, family: str) -> dict[str, np.ndarray]:
    """Arrays checked against the family's sizes and each other, in the dtypes OfflineDataset promises."""
    obs_dim, act_dim = OBS_ACT_DIMS[family]
    num_rows = len(arrays["observations"])
    if num_rows == 0:
        raise DatasetError(f"{label}: the dataset is empty")
    expected = {  # key: (shape of one row, dtype)
        "observations": ((obs_dim,), np.float32),
        "actions": ((act_dim,), np.float32),
        "rewards": ((), np.float32),
        "next_observations": ((obs_dim,), np.float32),
        "terminals": ((), bool),
        "timeouts": ((), bool),
    }
    checked = {}
    for key, (row_shape, dtype) in expected.items():
        array = np.asarray(arrays[key])
        if row_shape == () and array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]  # some writers store per-step scalars as [N, 1]
        if len(array) != num_rows:
            raise DatasetError(f"{label}: key '{key}' has {len(array)} rows but 'observations' has {num_rows}")
        if array.shape[1:] != row_shape:
            raise DatasetError(
                f"{label}: key '{key}' has shape {array.shape} but {family} needs {(num_rows, *row_shape)}; "
                f"is this a {family} dataset?"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            first_bad_row = np.argwhere(~np.isfinite(array))[0][0]
            raise DatasetError(f"{label}: key '{key}' contains NaN or inf (first at row {first_bad_row})")
        checked[key] = array.astype(dtype)
    return checked


def _temporary_sibling(dest: Path) -> Path:
    """A new empty file next to dest, to be os.replace'd onto it: same filesystem, so the swap is atomic."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(handle)
    os.chmod(name, 0o644)  # mkstemp makes it private; the final file should read like any other
    return Path(name)


def write_hdf5_atomically(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, str | int]) -> None:
    """Write arrays and attributes to path so that readers see the whole file or none of it."""
    temporary = _temporary_sibling(path)
    try:
        with h5py.File(temporary, "w") as file:
            for key, array in arrays.items():
                file.create_dataset(key, data=array)
            file.attrs.update(attrs)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# D4RL

# Official location, as in d4rl/infos.py; DROP_D4RL_BASE_URL points elsewhere (a mirror, or a test server).
D4RL_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
DOWNLOAD_TIMEOUT_S = 30


def _d4rl_files() -> dict[str, str]:
    """Official file of every D4RL MuJoCo dataset, relative to the base URL (as in d4rl/infos.py)."""
    files = {}
    for family in OBS_ACT_DIMS:
        for kind in KINDS:
            stem = f"{family}_{kind.replace('-', '_')}"
            files[f"{family}-{kind}-v1"] = f"gym_mujoco_v1/{stem}-v1.hdf5"
            files[f"{family}-{kind}-v2"] = f"gym_mujoco_v2/{stem}-v2.hdf5"
            # v0 had no version suffix and called medium-replay "mixed" (walker2d's file: "walker_mixed").
            if kind == "medium-replay":
                stem = ("walker" if family == "walker2d" else family) + "_mixed"
            files[f"{family}-{kind}-v0"] = f"gym_mujoco/{stem}.hdf5"
    return files


D4RL_FILES = _d4rl_files()


def d4rl_url(name: str) -> str:
    return f"{os.environ.get('DROP_D4RL_BASE_URL', D4RL_BASE_URL).rstrip('/')}/{D4RL_FILES[name]}"


def d4rl_cache_path(name: str) -> Path:
    """Where d4rl itself keeps the file: its URL's basename in $D4RL_DATASET_DIR."""
    cache_dir = Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()
    return cache_dir / PurePosixPath(D4RL_FILES[name]).name


def download(url: str, dest: Path) -> None:
    """Fetch a D4RL-format HDF5 from url to dest; a partial or broken download never appears at dest."""
    temporary = _temporary_sibling(dest)
    try:
        with open(temporary, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            expected_bytes = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=expected_bytes, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as progress:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    progress.update(len(chunk))
                received_bytes = progress.n
        # urllib returns a short body without complaint when the server hangs up early.
        if expected_bytes is not None and received_bytes < expected_bytes:
            raise DatasetError(f"download of {url} broke off after {received_bytes} of {expected_bytes} bytes")
        with h5py.File(temporary, "r") as file:
            _require_keys(file, f"downloaded {url}")
        os.replace(temporary, dest)
    except (OSError, http.client.HTTPException) as error:  # URLError is an OSError; so is h5py's "not HDF5"
        raise DatasetError(f"could not download {url}: {_one_line(error)}") from None
    finally:
        temporary.unlink(missing_ok=True)


def _d4rl_path(name: str, family: str, kind: str) -> Path:
    """The cached D4RL file, downloaded first if need be."""
    path = d4rl_cache_path(name)
    if not path.exists():
        try:
            download(d4rl_url(name), path)
        except DatasetError as error:
            # The same robot's built-in data at this level, else at medium, else the default.
            choices = [f"builtin-{family}-{kind}", f"builtin-{family}-medium", DEFAULT_ENV]
            offline = next(name for name in choices if name in available_builtin_names() or name == DEFAULT_ENV)
            raise DatasetError(
                f"{error}; put {name}'s file at {path} yourself (e.g. when offline), "
                f"or use the offline built-in data: --env {offline}"
            ) from None
    return path


# ---------------------------------------------------------------------------------------------
# Minari


def _minari_family_kind(dataset_id: str) -> tuple[str, str]:
    match = re.fullmatch(r"mujoco/(\w+)/([\w-]+)-v\d+", dataset_id)
    if not match or match[1] not in OBS_ACT_DIMS or match[2] not in MINARI_KINDS:
        raise DatasetError(
            f"unsupported Minari id '{dataset_id}': DROP reads mujoco/<family>/<kind>-v<N> with family in "
            f"{', '.join(OBS_ACT_DIMS)} and kind in {', '.join(MINARI_KINDS)}, e.g. mujoco/hopper/medium-v0"
        )
    return match[1], MINARI_KINDS[match[2]]


def _minari_dataset(dataset_id: str):
    try:
        import minari
    except ImportError:
        raise DatasetError(f"{dataset_id} is a Minari dataset: install minari (pip install 'minari[hf]')") from None
    # The Hugging Face client behind minari logs each failed request too; our one line says it all.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    try:
        return minari.load_dataset(dataset_id, download=True)  # local copy first, else the Minari server
    # minari raises whatever its storage backends raise; all of it means "not available".
    except Exception as error:
        raise DatasetError(f"Minari dataset {dataset_id} is not available: {_one_line(error)}") from None


def _load_minari(dataset_id: str, family: str, kind: str) -> OfflineDataset:
    dataset = _minari_dataset(dataset_id)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in REQUIRED_KEYS}
    for episode in dataset.iterate_episodes():
        if not isinstance(episode.observations, np.ndarray):
            raise DatasetError(f"Minari dataset {dataset_id} has structured observations; DROP needs flat vectors")
        # An episode of T steps holds T + 1 observations: step t goes from row t to row t + 1.
        parts["observations"].append(episode.observations[:-1])
        parts["next_observations"].append(episode.observations[1:])
        parts["actions"].append(episode.actions)
        parts["rewards"].append(episode.rewards)
        parts["terminals"].append(episode.terminations)
        parts["timeouts"].append(episode.truncations)
    if not parts["rewards"]:
        raise DatasetError(f"Minari dataset {dataset_id} has no episodes")
    arrays = _validated({key: np.concatenate(chunks) for key, chunks in parts.items()}, dataset_id, family)
    eval_env = dataset.recover_environment(eval_env=True)
    eval_env_id = eval_env.spec.id
    eval_env.close()
    return OfflineDataset(
        **arrays,
        name=dataset_id,
        task=f"{family}-{kind}",
        family=family,
        eval_env_id=eval_env_id,
        source="minari",
        path=dataset_id,
    )


# ---------------------------------------------------------------------------------------------
# Behaviour policies and the collector

POLICY_KEYS = ("w0", "b0", "w1", "b1", "w_mean", "b_mean", "w_logstd", "b_logstd")
HIDDEN_UNITS = 256


@dataclass
class TanhGaussianPolicy:
    """The format of policies/*.npz: a tanh-Gaussian MLP with two ReLU hidden layers.

    h = relu(w0 @ obs + b0); h = relu(w1 @ h + b1); mean = w_mean @ h + b_mean;
    log_std = clip(w_logstd @ h + b_logstd, -20, 2); action = tanh(mean [+ exp(log_std) * noise]).
    """

    params: dict[str, np.ndarray]

    @property
    def obs_dim(self) -> int:
        return self.params["w0"].shape[1]

    @property
    def act_dim(self) -> int:
        return self.params["w_mean"].shape[0]

    @classmethod
    def load(cls, path: Path) -> TanhGaussianPolicy:
        if not path.is_file():
            raise DatasetError(f"policy file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as file:
                missing = [key for key in POLICY_KEYS if key not in file.files]
                if missing:
                    raise DatasetError(
                        f"{path}: policy file lacks {', '.join(missing)} (needs {', '.join(POLICY_KEYS)})"
                    )
                params = {key: file[key].astype(np.float32) for key in POLICY_KEYS}
        except (OSError, ValueError) as error:
            raise DatasetError(f"cannot read policy {path} as an .npz of arrays: {_one_line(error)}") from None
        if params["w0"].ndim != 2 or params["w_mean"].ndim != 2:
            raise DatasetError(f"{path}: policy arrays w0 and w_mean must be matrices")
        hidden, obs_dim = params["w0"].shape
        act_dim = params["w_mean"].shape[0]
        expected = {
            "w0": (hidden, obs_dim),
            "b0": (hidden,),
            "w1": (hidden, hidden),
            "b1": (hidden,),
            "w_mean": (act_dim, hidden),
            "b_mean": (act_dim,),
            "w_logstd": (act_dim, hidden),
            "b_logstd": (act_dim,),
        }
        for key, shape in expected.items():
            if params[key].shape != shape:
                raise DatasetError(f"{path}: policy array '{key}' has shape {params[key].shape}, expected {shape}")
        return cls(params)

    @classmethod
    def random_init(cls, obs_dim: int, act_dim: int, rng: np.random.Generator) -> TanhGaussianPolicy:
        """An untrained actor, like the randomly initialised SAC policy behind D4RL's random datasets.

        Weights follow PyTorch's default nn.Linear initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        """

        def layer(fan_out: int, fan_in: int) -> tuple[np.ndarray, np.ndarray]:
            bound = 1.0 / np.sqrt(fan_in)
            weight = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
            return weight, rng.uniform(-bound, bound, fan_out).astype(np.float32)

        params = {}
        for prefix, (fan_out, fan_in) in {
            "0": (HIDDEN_UNITS, obs_dim),
            "1": (HIDDEN_UNITS, HIDDEN_UNITS),
            "_mean": (act_dim, HIDDEN_UNITS),
            "_logstd": (act_dim, HIDDEN_UNITS),
        }.items():
            params[f"w{prefix}"], params[f"b{prefix}"] = layer(fan_out, fan_in)
        return cls(params)

    def act(self, observation: np.ndarray, noise_rng: np.random.Generator | None = None) -> np.ndarray:
        """The deterministic action tanh(mean), or a sampled one when noise_rng is given."""
        p = self.params
        hidden = np.maximum(p["w0"] @ observation.astype(np.float32) + p["b0"], 0.0)
        hidden = np.maximum(p["w1"] @ hidden + p["b1"], 0.0)
        mean = p["w_mean"] @ hidden + p["b_mean"]
        if noise_rng is None:
            return np.tanh(mean)
        log_std = np.clip(p["w_logstd"] @ hidden + p["b_logstd"], -20.0, 2.0)
        noise = noise_rng.standard_normal(mean.shape).astype(np.float32)
        return np.tanh(mean + np.exp(log_std) * noise)


class Step(NamedTuple):
    qpos: np.ndarray  # simulator state before the step
    qvel: np.ndarray
    observation: np.ndarray
    action: np.ndarray
    reward: float
    next_observation: np.ndarray
    terminated: bool
    truncated: bool


def make_gym_env(env_id: str, max_episode_steps: int | None = None) -> gym.Env:
    """gym.make, with one-line errors; the v4 MuJoCo envs are chosen on purpose, so no 'out of date' warning."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is out of date.*")
            return gym.make(env_id, max_episode_steps=max_episode_steps)
    except gym.error.Error as error:
        raise DatasetError(f"cannot make Gymnasium env '{env_id}': {_one_line(error)}") from None


def run_episode(
    env: gym.Env, policy: TanhGaussianPolicy, reset_seed: int, noise_rng: np.random.Generator | None = None
) -> Iterator[Step]:
    """Yield the steps of one episode; the policy samples its actions when noise_rng is given."""
    observation, _ = env.reset(seed=reset_seed)
    while True:
        data = env.unwrapped.data
        qpos, qvel = data.qpos.copy(), data.qvel.copy()
        action = policy.act(observation, noise_rng)
        next_observation, reward, terminated, truncated, _ = env.step(action)
        yield Step(qpos, qvel, observation, action, float(reward), next_observation, terminated, truncated)
        if terminated or truncated:
            return
        observation = next_observation


def _policy_for(env: gym.Env, policy: str, rng: np.random.Generator) -> tuple[TanhGaussianPolicy, dict[str, str]]:
    """The behaviour policy named by `policy` (a .npz path or "random") and how to record it."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if policy == "random":
        return TanhGaussianPolicy.random_init(obs_dim, act_dim, rng), {"policy": "random (initialised from the seed)"}
    actor = TanhGaussianPolicy.load(Path(policy))
    if (actor.obs_dim, actor.act_dim) != (obs_dim, act_dim):
        raise DatasetError(
            f"policy {policy} maps {actor.obs_dim} observations to {actor.act_dim} actions, "
            f"but {env.spec.id} has {obs_dim} and {act_dim}"
        )
    return actor, {"policy": str(policy), "policy_sha256": _sha256(Path(policy))}


def collect(
    env_id: str, policy: str, num_transitions: int, seed: int, out: Path, max_episode_steps: int | None = None
) -> None:
    """Roll out a stochastic behaviour policy and write a D4RL-format HDF5, reproducibly from the seed.

    One numpy Generator seeded with `seed` draws the random actor (if any), each episode's reset
    seed and the action noise, so the same arguments give the same arrays. infos/qpos and
    infos/qvel hold the simulator state before each step, for env.unwrapped.set_state.
    """
    if num_transitions < 1:
        raise DatasetError(f"--num-transitions must be at least 1, got {num_transitions}")
    env = make_gym_env(env_id, max_episode_steps)
    rng = np.random.default_rng(seed)
    actor, provenance = _policy_for(env, policy, rng)
    data = env.unwrapped.data
    obs_dim, act_dim = actor.obs_dim, actor.act_dim
    arrays = {
        "observations": np.empty((num_transitions, obs_dim), np.float32),
        "actions": np.empty((num_transitions, act_dim), np.float32),
        "rewards": np.empty(num_transitions, np.float32),
        "next_observations": np.empty((num_transitions, obs_dim), np.float32),
        "terminals": np.empty(num_transitions, bool),
        "timeouts": np.empty(num_transitions, bool),
        "infos/qpos": np.empty((num_transitions, data.qpos.size), np.float64),
        "infos/qvel": np.empty((num_transitions, data.qvel.size), np.float64),
    }
    row = 0
    with tqdm(total=num_transitions, desc=f"collecting {env_id}", unit="step") as progress:
        while row < num_transitions:
            for step in run_episode(env, actor, int(rng.integers(2**31)), rng):
                arrays["observations"][row] = step.observation
                arrays["actions"][row] = step.action
                arrays["rewards"][row] = step.reward
                arrays["next_observations"][row] = step.next_observation
                arrays["terminals"][row] = step.terminated
                arrays["timeouts"][row] = step.truncated
                arrays["infos/qpos"][row] = step.qpos
                arrays["infos/qvel"][row] = step.qvel
                row += 1
                progress.update()
                if row == num_transitions:
                    break
    env.close()
    # The budget cuts the last episode short, which is a truncation like a time limit; marking it
    # keeps that episode from running into the next file's first one when datasets are concatenated.
    arrays["timeouts"][-1] |= not arrays["terminals"][-1]
    attrs = {"env_id": env_id, "seed": seed, "num_transitions": num_transitions, "actions": "stochastic", **provenance}
    if max_episode_steps is not None:
        attrs["max_episode_steps"] = max_episode_steps
    write_hdf5_atomically(out, arrays, attrs)


def evaluate_policy(policy: TanhGaussianPolicy, env_id: str, episodes: int, seed: int) -> np.ndarray:
    """Returns of deterministic episodes; episode i resets with seed + i."""
    if episodes < 1:
        raise DatasetError(f"--episodes must be at least 1, got {episodes}")
    env = make_gym_env(env_id)
    returns = np.array([sum(step.reward for step in run_episode(env, policy, seed + i)) for i in range(episodes)])
    env.close()
    return returns


# ---------------------------------------------------------------------------------------------
# Built-in datasets

POLICY_DIR = Path(__file__).resolve().parent / "policies"
BUILTIN_KINDS = ("random", "medium", "expert", "medium-expert")
BUILTIN_TRANSITIONS = 200_000  # per behaviour level; medium-expert has twice as many
# The suffix for D4RL's size (1M transitions, 1,000 episodes, per level). The same seed draws the
# same episodes first, so the 200k dataset is the start of the 1M one: a test of more data alone.
BUILTIN_LARGE_SUFFIX, BUILTIN_LARGE_FACTOR = "-1m", 5
# A different seed per level, so that the levels do not start their episodes from the same states.
BUILTIN_SEEDS = {"random": 0, "medium": 1, "expert": 2}


def _builtin_policy_file(family: str, level: str) -> Path | None:
    """The policy file behind a behaviour level; random needs none."""
    return None if level == "random" else POLICY_DIR / f"{family}-{level}.npz"


def _builtin_levels(kind: str) -> list[str]:
    return ["medium", "expert"] if kind == "medium-expert" else [kind]


def available_builtin_names() -> list[str]:
    """Built-in datasets whose policy files exist."""

    def available(family: str, kind: str) -> bool:
        files = [_builtin_policy_file(family, level) for level in _builtin_levels(kind)]
        return all(file is None or file.exists() for file in files)

    return [f"builtin-{family}-{kind}" for family in OBS_ACT_DIMS for kind in BUILTIN_KINDS if available(family, kind)]


def builtin_cache_dir() -> Path:
    return Path(os.environ.get("DROP_DATA_DIR", "~/.cache/drop/datasets")).expanduser()


def builtin_transitions(name: str) -> int:
    """Transitions per behaviour level of a built-in name."""
    return BUILTIN_TRANSITIONS * (BUILTIN_LARGE_FACTOR if name.endswith(BUILTIN_LARGE_SUFFIX) else 1)


def _builtin_level_path(family: str, level: str, transitions: int) -> Path:
    """The cached collection of one behaviour level, collected first if need be.

    The file name carries the policy's hash, so a retrained policy gets a fresh dataset.
    """
    policy_file = _builtin_policy_file(family, level)
    if policy_file is not None and not policy_file.exists():
        raise DatasetError(
            f"builtin-{family}-{level} needs the policy file {policy_file}, which does not exist; "
            f"available built-in datasets: {', '.join(available_builtin_names())}"
        )
    policy_tag = "random" if policy_file is None else _sha256(policy_file)[:12]
    seed = BUILTIN_SEEDS[level]
    path = builtin_cache_dir() / f"{family}-{level}-{policy_tag}-seed{seed}-{transitions}.hdf5"
    if not path.exists():
        print(f"collecting built-in dataset {family}-{level} into {path} (first use only)", file=sys.stderr)
        collect(FAMILY_ENV_IDS[family], str(policy_file or "random"), transitions, seed, path)
    return path


def _load_builtin(name: str, family: str, kind: str) -> OfflineDataset:
    levels, transitions = _builtin_levels(kind), builtin_transitions(name)
    paths = [_builtin_level_path(family, level, transitions) for level in levels]
    parts = [_read_arrays(path) for path in paths]
    arrays = _validated(
        {key: np.concatenate([part_arrays[key] for part_arrays, _ in parts]) for key in REQUIRED_KEYS},
        " + ".join(map(str, paths)),
        family,
    )
    provenance = {f"{level}.{key}": value for level, (_, attrs) in zip(levels, parts) for key, value in attrs.items()}
    return OfflineDataset(
        **arrays,
        name=name,
        task=f"{family}-{kind}",
        family=family,
        eval_env_id=FAMILY_ENV_IDS[family],
        source="builtin",
        path=" + ".join(map(str, paths)),
        provenance=provenance,
    )


# ---------------------------------------------------------------------------------------------
# Entry points


class _NameInfo(NamedTuple):
    """What a dataset name alone tells: where to get the data and which task it is."""

    source: str
    family: str
    kind: str
    eval_env_id: str


def _parse_name(env: str) -> _NameInfo:
    if env in D4RL_FILES:
        family, kind = re.fullmatch(r"(\w+)-(.+)-v\d", env).groups()
        return _NameInfo("d4rl", family, kind, FAMILY_ENV_IDS[family])
    builtin = re.fullmatch(rf"builtin-(\w+)-([\w-]+?)(?:{BUILTIN_LARGE_SUFFIX})?", env)
    if builtin and builtin[1] in OBS_ACT_DIMS and builtin[2] in BUILTIN_KINDS:
        return _NameInfo("builtin", builtin[1], builtin[2], FAMILY_ENV_IDS[builtin[1]])
    if "/" in env:
        family, kind = _minari_family_kind(env)
        return _NameInfo("minari", family, kind, MINARI_ENV_IDS[family])
    d4rl_v2 = [name for name in D4RL_FILES if name.endswith("-v2")]
    raise DatasetError(
        f"unknown dataset '{env}': use a D4RL name ({', '.join(d4rl_v2)}, or their -v0/-v1 versions), "
        f"a built-in name ({', '.join(available_builtin_names())}; add {BUILTIN_LARGE_SUFFIX} for 1M transitions), "
        "or a Minari id like mujoco/hopper/medium-v0"
    )


def task_of(env: str) -> str:
    """The task a dataset name stands for (hopper-medium), read from the name alone: nothing is loaded."""
    parsed = _parse_name(env)
    return f"{parsed.family}-{parsed.kind}"


def load_dataset(env: str, dataset_path: str | None = None) -> OfflineDataset:
    """Load the dataset named `env`; with dataset_path, read that D4RL-format HDF5 instead.

    In the second case `env` only fixes the family, task, evaluation env and score.
    """
    parsed = _parse_name(env)
    if parsed.source == "minari" and dataset_path is None:
        return _load_minari(env, parsed.family, parsed.kind)
    if parsed.source == "builtin" and dataset_path is None:
        return _load_builtin(env, parsed.family, parsed.kind)
    if dataset_path is None:
        path, source, name = _d4rl_path(env, parsed.family, parsed.kind), "d4rl", env
    else:
        path = Path(dataset_path).expanduser()
        source, name = "file", path.name
    arrays, provenance = _read_arrays(path)
    return OfflineDataset(
        **_validated(arrays, str(path), parsed.family),
        name=name,
        task=f"{parsed.family}-{parsed.kind}",
        family=parsed.family,
        eval_env_id=parsed.eval_env_id,
        source=source,
        path=str(path),
        provenance=provenance,
    )


def simulator_states(data: OfflineDataset) -> tuple[np.ndarray, np.ndarray] | None:
    """The MuJoCo state before each step (`infos/qpos`, `infos/qvel` of D4RL and built-in files),
    or None where the files do not store it whole (Minari, or a file without those keys)."""
    if data.source == "minari":
        return None
    qpos, qvel = [], []
    for path in data.path.split(" + "):  # a built-in medium-expert dataset joins two files
        with h5py.File(path, "r") as file:
            if "infos/qpos" not in file or "infos/qvel" not in file:
                return None
            qpos.append(file["infos/qpos"][()])
            qvel.append(file["infos/qvel"][()])
    qpos, qvel = np.concatenate(qpos).astype(np.float64), np.concatenate(qvel).astype(np.float64)
    return (qpos, qvel) if len(qpos) == len(qvel) == len(data) else None


def make_eval_env(data: OfflineDataset, seed: int | None = None) -> gym.Env:
    """The environment to evaluate policies for `data` in; for Minari data, the dataset's own spec.

    With a seed, the env is reset once with it, so later plain reset() calls are reproducible.
    """
    if data.source == "minari":
        env = _minari_dataset(data.path).recover_environment(eval_env=True)
    else:
        env = make_gym_env(data.eval_env_id)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass
class Info:
    """Print a dataset's size, episodes, returns and D4RL-normalised score."""

    name: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="NAME")] = DEFAULT_ENV
    """Dataset: a D4RL name (hopper-medium-v2), a built-in name (builtin-hopper-medium, or
    builtin-hopper-medium-1m for 1M transitions) or a Minari id (mujoco/hopper/medium-v0)."""
    dataset: Path | None = None
    """Read this D4RL-format HDF5 instead; NAME then only fixes the task, evaluation env and score."""


@dataclass
class Collect:
    """Roll out a behaviour policy in a Gymnasium MuJoCo env and write a D4RL-format HDF5."""

    out: Path
    """HDF5 file to write (replaced atomically if it exists)."""
    env: str = "Hopper-v4"
    """Gymnasium env id to collect in, e.g. Hopper-v4, Walker2d-v4, HalfCheetah-v4."""
    policy: str = "random"
    """Behaviour policy: a policies/*.npz file, or 'random' for an untrained actor initialised from the seed."""
    num_transitions: int = BUILTIN_TRANSITIONS
    """Number of transitions to collect; the last episode is cut (and marked as a timeout) to fit."""
    seed: int = 0
    """Seed of the env resets, the action noise and the random actor: the same seed gives the same file."""
    max_episode_steps: int | None = None
    """Time limit per episode; default: the env's own (1000 for the MuJoCo envs)."""


@dataclass
class Concat:
    """Join D4RL-format HDF5 files row after row into one (every key, infos/* included)."""

    out: Path
    """HDF5 file to write (replaced atomically if it exists)."""
    files: Annotated[tuple[Path, ...], tyro.conf.Positional]
    """The files to join, in order."""
    rows_each: int | None = None
    """Take only the first this many rows of each file (equal parts); default: all rows."""


def concat(files: tuple[Path, ...], out: Path, rows_each: int | None = None) -> int:
    """Write the rows of `files` one after the other to `out`; returns the number of rows written."""
    parts = []
    for path in files:
        arrays, _ = _read_arrays(path)
        with h5py.File(path, "r") as file:
            # visititems stops at the first callback that returns something, so this one returns None.
            file.visititems(
                lambda key, item: (
                    None if key in arrays or not isinstance(item, h5py.Dataset) else arrays.update({key: item[()]})
                )
            )
        if rows_each is not None and rows_each > len(arrays["rewards"]):
            raise DatasetError(f"{path} has {len(arrays['rewards'])} rows, fewer than --rows-each {rows_each}")
        parts.append({key: array[:rows_each] for key, array in arrays.items()})
    shared = set.intersection(*(set(part) for part in parts))
    joined = {key: np.concatenate([part[key] for part in parts]) for key in sorted(shared)}
    # The cut at the end of each part is a truncation, so no episode runs on into the next file.
    ends = np.cumsum([len(part["rewards"]) for part in parts]) - 1
    joined["timeouts"][ends] |= ~joined["terminals"][ends].astype(bool)
    write_hdf5_atomically(out, joined, {"joined_from": " + ".join(map(str, files)), "rows_each": rows_each or 0})
    return len(joined["rewards"])


@dataclass
class EvaluatePolicy:
    """Print the deterministic returns of a policy file and their D4RL-normalised score."""

    policy: Path
    """Policy file (.npz, the policies/ format)."""
    env: str = "Hopper-v4"
    """Gymnasium env id to evaluate in."""
    episodes: int = 5
    """Number of episodes."""
    seed: int = 0
    """Episode i resets the env with seed + i."""


def _family_of_env_id(env_id: str) -> str | None:
    return next((family for family in OBS_ACT_DIMS if env_id.lower().startswith(family)), None)


def _print_info(data: OfflineDataset) -> None:
    returns = data.episode_returns()
    scores = normalized_score(data.family, returns)
    if data.source == "builtin":
        score_label = f"(built-in, D4RL-normalised on {data.eval_env_id})"
    else:
        score_label = f"(D4RL-normalised, eval env {data.eval_env_id})"
    print(f"name:        {data.name}")
    print(f"task:        {data.task}")
    print(f"transitions: {len(data)} (obs {data.obs_dim}, act {data.act_dim})")
    truncated = data.timeouts & ~data.terminals
    print(f"episodes:    {len(returns)} ({data.terminals.sum()} terminated, {truncated.sum()} truncated)")
    if len(returns):
        print(f"return:      mean {returns.mean():.1f}, min {returns.min():.1f}, max {returns.max():.1f}")
        print(f"score:       mean {scores.mean():.1f}, min {scores.min():.1f}, max {scores.max():.1f} {score_label}")
    print(f"source:      {data.source}")
    print(f"path:        {data.path}")
    print(
        f"sha256:      {data.transitions_sha256()} (of the transitions; an ensemble file records the one it was trained on)"
    )
    for key, value in data.provenance.items():
        print(f"  {key}: {value}")


def main(argv: list[str] | None = None) -> None:
    command = tyro.extras.subcommand_cli_from_dict(
        {"info": Info, "collect": Collect, "concat": Concat, "evaluate-policy": EvaluatePolicy},
        args=argv,
        description="Offline datasets for DROP: inspect one (info), collect one (collect), join files (concat), score a policy file.",
    )
    try:
        match command:
            case Info():
                _print_info(load_dataset(command.name, None if command.dataset is None else str(command.dataset)))
            case Collect():
                collect(
                    command.env,
                    command.policy,
                    command.num_transitions,
                    command.seed,
                    command.out,
                    command.max_episode_steps,
                )
                print(f"wrote {command.num_transitions} transitions to {command.out}")
            case Concat():
                print(f"wrote {concat(command.files, command.out, command.rows_each)} rows to {command.out}")
            case EvaluatePolicy():
                returns = evaluate_policy(
                    TanhGaussianPolicy.load(command.policy), command.env, command.episodes, command.seed
                )
                print(f"returns: {', '.join(f'{r:.1f}' for r in returns)} (mean {returns.mean():.1f})")
                family = _family_of_env_id(command.env)
                if family is not None:
                    print(f"D4RL-normalised: {normalized_score(family, returns).mean():.1f}")
    except DatasetError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
