"""The per-dataset settings: the DROP authors' configs and MOPO's.

drop.py puts its flags on top of these; dice.py's known-answer command reads the DICE part.
Datasets with no config of their own (expert data) take their family's medium entry.
"""

from dataclasses import dataclass, replace
from typing import Literal

Transform = Literal["log", "tanh-shift", "tanh-offset"]
Penalty = Literal["drop", "mopo", "none"]
FAMILIES = ("halfcheetah", "hopper", "walker2d")


@dataclass(frozen=True)
class TaskDefaults:
    horizon: int
    eta: float
    dice_steps: int
    dice_lr: float
    dice_lambda: float
    clip: tuple[float, float] | None
    transform: Transform
    epochs: int
    source: str = ""


# The authors' per-dataset configs (github.com/cmciris/DROP, config/d4rl/*.py). Where they differ
# from the paper's text (which states one DICE lr, 1e-4), the configs win.
LOG_10, LOG_50 = (0.01, 10.0), (0.01, 50.0)
TASK_DEFAULTS = {
    "halfcheetah-random": TaskDefaults(5, 0.5, 400, 1e-4, 0.1, LOG_10, "log", 500),
    "halfcheetah-medium": TaskDefaults(5, 1.0, 400, 1e-4, 0.1, LOG_10, "log", 500),
    "halfcheetah-medium-replay": TaskDefaults(5, 1.0, 400, 1e-4, 1.0, LOG_10, "log", 500),
    "halfcheetah-medium-expert": TaskDefaults(5, 0.1, 200, 1e-4, 0.5, LOG_50, "log", 500),
    "hopper-random": TaskDefaults(5, 1.0, 400, 1e-4, 0.1, None, "tanh-shift", 1500),
    "hopper-medium": TaskDefaults(5, 5.0, 400, 1e-4, 0.1, LOG_10, "log", 1500),
    "hopper-medium-replay": TaskDefaults(5, 1.0, 400, 1e-4, 0.1, LOG_10, "log", 1500),
    "hopper-medium-expert": TaskDefaults(5, 5.0, 400, 1e-4, 0.1, LOG_10, "log", 1500),
    "walker2d-random": TaskDefaults(1, 1.0, 600, 1e-3, 0.1, LOG_50, "log", 3000),
    "walker2d-medium": TaskDefaults(5, 0.1, 400, 1e-4, 0.1, None, "tanh-offset", 3000),
    "walker2d-medium-replay": TaskDefaults(1, 2.0, 600, 1e-4, 0.1, LOG_50, "log", 3000),
    "walker2d-medium-expert": TaskDefaults(1, 5.0, 500, 1e-4, 0.1, None, "tanh-offset", 3000),
}

# MOPO's published rollout length h and penalty coefficient lambda per D4RL dataset
# (github.com/tianheyu927/mopo, examples/config/d4rl/*.py; tuned there on the -v0 datasets,
# "mixed" being medium-replay). MBPO (--penalty none) rolls out as long as MOPO does.
MOPO_DEFAULTS = {
    "halfcheetah-random": (5, 0.5),
    "halfcheetah-medium": (1, 1.0),
    "halfcheetah-medium-replay": (5, 1.0),
    "halfcheetah-medium-expert": (5, 5.0),
    "hopper-random": (5, 1.0),
    "hopper-medium": (5, 5.0),
    "hopper-medium-replay": (5, 1.0),
    "hopper-medium-expert": (5, 1.0),
    "walker2d-random": (1, 1.0),
    "walker2d-medium": (5, 5.0),
    "walker2d-medium-replay": (1, 1.0),
    "walker2d-medium-expert": (1, 2.0),
}


def config_task(task: str, table: dict) -> str:
    """The table's key for `task`: its own entry, else its family's medium one."""
    family = task.split("-")[0]
    if family not in FAMILIES:
        raise ValueError(f"no settings for {task}: the tables cover {', '.join(FAMILIES)}")
    return task if task in table else f"{family}-medium"


def task_defaults(task: str, penalty: Penalty = "drop") -> TaskDefaults:
    """The settings a run of `penalty` on `task` starts from, naming where they come from.

    MOPO and MBPO take MOPO's h (and MOPO its lambda; MBPO has no penalty, eta 0); the epoch count
    stays DROP's, so that every penalty of a comparison trains equally long.
    """
    key = config_task(task, TASK_DEFAULTS)
    defaults = replace(TASK_DEFAULTS[key], source=f"DROP authors' config for {key}")
    if penalty == "drop":
        return defaults
    key = config_task(task, MOPO_DEFAULTS)
    horizon, eta = MOPO_DEFAULTS[key]
    if penalty == "none":
        return replace(defaults, horizon=horizon, eta=0.0, source=f"MBPO with MOPO's rollout length for {key}")
    return replace(defaults, horizon=horizon, eta=eta, source=f"MOPO's config for {key}")
