"""Draws docs/figures/curves-external.png from the progress files beside this script, with sweep.py's plot.
Run from the repository's root: python results/external-policies/draw_curves.py"""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.getcwd())
import sweep  # noqa: E402

PROGRESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "progress")
# panel: (dataset, run-name suffix of the horizon, the data's score)
PANELS = {
    "hopper_online_5, h 5": ("hopper-medium-v2", "", 42.6),
    "hopper_online_5, h 20": ("hopper-medium-v2", "-h20", 42.6),
    "walker_online_5, h 5": ("walker2d-medium-v2", "", 74.5),
}
METHODS = {"DROP, authors' settings": "drop", "DROP, checked preset": "drop-checked", "MOPO": "mopo", "MBPO": "none"}
ETAS = {"hopper": {"drop": 5, "mopo": 5, "none": 0}, "walker2d": {"drop": 0.1, "mopo": 5, "none": 0}}

with tempfile.TemporaryDirectory() as sweep_dir:
    runs = []
    for panel, (env, horizon, _) in PANELS.items():
        for column, method in METHODS.items():
            penalty = method.split("-")[0]
            eta = ETAS[env.split("-")[0]][penalty]
            for seed in range(10):
                progress = os.path.join(PROGRESS, f"{env}__{method}{horizon}__eta{eta:g}__seed{seed}.csv")
                if os.path.isfile(progress):
                    run = sweep.Run(panel, env, penalty, eta, seed, 0, column, variant=method + horizon)
                    os.makedirs(os.path.join(sweep_dir, "runs", run.name))
                    shutil.copy(progress, os.path.join(sweep_dir, "runs", run.name, "progress.csv"))
                    runs.append(run)
    data_scores = {panel: score for panel, (_, _, score) in PANELS.items()}
    sweep.plot_curves("docs/figures/curves-external.png", runs, sweep_dir, data_scores)
print(f"docs/figures/curves-external.png: {len(runs)} runs")
