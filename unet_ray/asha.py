"""ASHA that remembers across `unet-ray tune --resume` what it saw before the interruption.

Tune saves the searcher's state with the experiment, not the scheduler's: a resumed sweep runs
with the ASHAScheduler pickled when the sweep began, its rungs empty. Without what follows, the
trials started after a resume are cut only against each other (the first to reach a rung is never
cut), and a resumed trial's first new result lands on the rung it had already passed (its epoch-5
IoU compared with other trials' epoch-3 IoU). `ResumableASHA` refills the rungs from each restored
trial's own record, runs/<trial_id>/history.jsonl, when Tune adds the trial back.

A Ray-facing module of its own: Tune pickles the scheduler into the experiment, and a resume
unpickles it by this module's name.
"""

from __future__ import annotations

import math
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler

from unet_ray.train import read_history


class ResumableASHA(ASHAScheduler):
    """ASHAScheduler (its arguments) whose rungs hold, for every trial Tune adds, the results in
    `runs_dir`/<trial_id>/history.jsonl. A new trial has no history and adds nothing."""

    def __init__(self, runs_dir: str | Path, **asha_args):
        super().__init__(**asha_args)
        self._runs_dir = str(runs_dir)  # a str pickles the same everywhere

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        for row in read_history(Path(self._runs_dir, trial.trial_id)):
            value = row.get(self._metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                # the decision returned is history: it was carried out before the interruption,
                # or the trial is being resumed now and its next result decides
                self.on_trial_result(tune_controller, trial, row)
