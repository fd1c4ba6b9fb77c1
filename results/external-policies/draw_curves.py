"""Draws docs/figures/curves-external.png from the progress files beside this script, with sweep.py's plot.
Run from the repository's root: python results/external-policies/draw_curves.py"""

import os
import shutil
import sys
import tempfile
from dataclasses import replace

sys.path.insert(0, os.getcwd())
import sweep  # noqa: E402
from tasks import task_defaults  # noqa: E402

PROGRESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "progress")
# panel: (dataset, the horizon's part of the run names, the data's score)
PANELS = {
    "hopper_online_5, h 5": ("hopper-medium-v2", "", 42.6),
    "hopper_online_5, h 20": ("hopper-medium-v2", "h20", 42.6),
    "walker_online_5, h 5": ("walker2d-medium-v2", "", 74.5),
}
# column: (penalty, run-name variant beside the horizon's)
METHODS = {
    "DROP, authors' settings": ("drop", ""),
    "DROP, checked preset": ("drop", "checked"),
    "MOPO": ("mopo", ""),
    "MBPO": ("none", ""),
}

with tempfile.TemporaryDirectory() as sweep_dir:
    runs = []
    for panel, (env, horizon, _) in PANELS.items():
        task = env.removesuffix("-v2")
        for column, (penalty, variant) in METHODS.items():
            eta = task_defaults(task, penalty).eta  # as each run was named: with its table's eta
            variant = "-".join(filter(None, (variant, horizon)))  # e.g. checked-h20
            for seed in range(10):
                recorded = sweep.Run(env, task, penalty, eta, seed, 0, column, variant)  # named as a sweep names it
                progress = os.path.join(PROGRESS, f"{recorded.name}.csv")
                if os.path.isfile(progress):
                    run = replace(recorded, env=panel)  # one panel per (data, horizon)
                    os.makedirs(os.path.join(sweep_dir, "runs", run.name))
                    shutil.copy(progress, os.path.join(sweep_dir, "runs", run.name, "progress.csv"))
                    runs.append(run)
    data_scores = {panel: score for panel, (_, _, score) in PANELS.items()}
    sweep.plot_curves("docs/figures/curves-external.png", runs, sweep_dir, data_scores)
print(f"docs/figures/curves-external.png: {len(runs)} runs")
