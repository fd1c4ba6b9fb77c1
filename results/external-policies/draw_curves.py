"""Draws docs/figures/curves-external.png from the progress files beside this script, with sweep.py's plot,
and the reference's evaluations (OfflineRL-Kit's MOPO through ../shared/reference/peer_mopo.py) beside them.
Run from the repository's root: python results/external-policies/draw_curves.py"""

import csv
import os
import shutil
import sys
import tempfile
from dataclasses import replace

sys.path.insert(0, os.getcwd())
import sweep  # noqa: E402
from checkpoint import write_progress  # noqa: E402
from tasks import task_defaults  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRESS, REFERENCE = os.path.join(HERE, "progress"), os.path.join(HERE, "reference")
# panel: (dataset, the horizon's part of the run names, the data's score, the seeds drawn)
PANELS = {
    "hopper_online_5, h 5": ("hopper-medium-v2", "", 42.6, (0, 1)),
    "hopper_online_5, h 20": ("hopper-medium-v2", "h20", 42.6, (0, 1)),
    "hopper_online_5, h 20, seed 0 alone": ("hopper-medium-v2", "h20", 42.6, (0,)),  # its runs went on to 200 epochs
    "walker_online_5, h 5": ("walker2d-medium-v2", "", 74.5, (0, 1)),
}
# column: (penalty, run-name variant beside the horizon's)
METHODS = {
    "DROP, authors' settings": ("drop", ""),
    "DROP, checked preset": ("drop", "checked"),
    "MOPO": ("mopo", ""),
    "MBPO": ("none", ""),
    "MOPO, the reference's SAC settings": ("mopo", "refsac"),  # h 20, seed 0 only: docs/learning.md
    "MOPO, lr 1e-4 for actor and alpha": ("mopo", "lr1e-4"),  # h 20, seed 0 only
}
# the reference's columns: their files' names in reference/ (lambda 5 unless named)
REFERENCES = {
    "reference: OfflineRL-Kit MOPO": "offlinerl-kit-mopo",
    "reference: OfflineRL-Kit MOPO, lambda 0.5": "offlinerl-kit-mopo-lambda0.5",  # its own walker2d-medium setting
    "reference: OfflineRL-Kit, no penalty": "offlinerl-kit-mbpo",
}


def progress_file(sweep_dir: str, run: sweep.Run) -> str:
    """Where plot_curves reads the run's evaluations: runs/RUN/progress.csv of the sweep folder, made here."""
    os.makedirs(os.path.join(sweep_dir, "runs", run.name))
    return os.path.join(sweep_dir, "runs", run.name, "progress.csv")


with tempfile.TemporaryDirectory() as sweep_dir:
    runs = []
    for panel, (env, horizon, _, seeds) in PANELS.items():
        task = env.removesuffix("-v2")
        for column, (penalty, variant) in METHODS.items():
            eta = task_defaults(task, penalty).eta  # as each run was named: with its table's eta
            variant = "-".join(filter(None, (variant, horizon)))  # e.g. checked-h20
            for seed in seeds:
                recorded = sweep.Run(env, task, penalty, eta, seed, 0, column, variant)  # named as a sweep names it
                progress = os.path.join(PROGRESS, f"{recorded.name}.csv")
                if os.path.isfile(progress):
                    run = replace(recorded, env=panel)  # one panel per (data, horizon)
                    shutil.copy(progress, progress_file(sweep_dir, run))
                    runs.append(run)
        # The reference writes 1-based epochs and "score"; drop.py 0-based epochs and "normalized_score".
        for column, stem in REFERENCES.items():
            reference_name = "-".join(filter(None, (stem, horizon)))  # as the runs: no suffix at h 5
            reference = os.path.join(REFERENCE, f"{env}__{reference_name}__seed0.csv")
            if not os.path.isfile(reference):
                continue
            run = sweep.Run(panel, task, "mopo", 5.0, 0, 0, column, stem)
            with open(reference) as source:
                rows = [
                    {"epoch": int(row["epoch"]) - 1, "normalized_score": row["score"]} for row in csv.DictReader(source)
                ]
            write_progress(progress_file(sweep_dir, run), rows)  # drop.py's own format, the other columns left NaN
            runs.append(run)
    data_scores = {panel: score for panel, (_, _, score, _) in PANELS.items()}
    sweep.plot_curves("docs/figures/curves-external.png", runs, sweep_dir, data_scores)
print(f"docs/figures/curves-external.png: {len(runs)} runs")
