"""Optuna under Ray Tune, told the truth: the searcher of `python -m tune_bir.sweep`.

Stock `OptunaSearch` reports a trial that ASHA stopped early as COMPLETE with its truncated score;
in class-IL the accuracy after one or two tasks is high, so TPE would chase configs that were
stopped for being bad (docs/ray-optuna-mlflow.md "Optuna under Ray Tune"). Here every result is an
intermediate value, a trial that trained every task is COMPLETE, one stopped early or diverged is
PRUNED (Optuna then ranks it by its last intermediate value), and an errored one is FAIL. Each Optuna
trial carries the Tune trial id and the status in its user attributes.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search_spaces import EXAGGERATION_OFF, SearchSpace
from tune_bir.sweep.status import COMPLETED, ERRORED, is_finite_number, trial_status

log = logging.getLogger(__name__)

BASELINE_ATTR = "tune_bir_baseline"


class OptunaSpace:
    """Define-by-run space of a `SearchSpace`; the enqueued baseline trial samples nothing."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        if trial.user_attrs.get(BASELINE_ATTR):
            # no parameters: TPE learns nothing from the baseline about values it never used
            return {**EXAGGERATION_OFF, "baseline": True}
        return {**self.space.sample(trial), "baseline": False}


class TruthfulOptunaSearch(OptunaSearch):
    """OptunaSearch that reports ASHA-stopped trials PRUNED (with intermediate values), errors FAIL."""

    def __init__(self, space: SearchSpace, *, metric: str, mode: str, sampler: Any, n_tasks: int,
                 storage: Any = None, study_name: str | None = None):
        super().__init__(space=OptunaSpace(space), metric=metric, mode=mode, sampler=sampler, storage=storage,
                         study_name=study_name)
        self.n_tasks = n_tasks

    @property
    def study(self):
        return self._ot_study

    def enqueue_baseline(self) -> None:
        """The first trial: the base config with every exaggeration off."""
        self._ot_study.enqueue_trial({}, user_attrs={BASELINE_ATTR: True})

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is not None:
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return config

    def restore(self, checkpoint_path: str) -> None:
        """The searcher state Tune saved last; with a database storage, trials the study began after that save (the
        driver died before the next) were never run by Tune, so they are told FAIL instead of staying RUNNING."""
        super().restore(checkpoint_path)
        known = {t.number for t in self._ot_trials.values()}
        for orphan in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if orphan.number not in known:
                self._ot_study._storage.set_trial_user_attr(orphan._trial_id, "trial_status", "never_run")
                self._ot_study.tell(orphan.number, state=TrialState.FAIL)

    def _finished_in_study(self, trial_id: str) -> bool:
        """The study (a database) has this trial finished already: told before the driver died, after Tune's last
        save; Tune runs it again from its checkpoint, and the study keeps what it was told first."""
        ot_trial = self._ot_trials[trial_id]
        return self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def _report(self, trial_id: str, result: dict | None) -> None:
        value = (result or {}).get(self.metric)
        if not is_finite_number(value) or "training_iteration" not in result or self._finished_in_study(trial_id):
            return
        with warnings.catch_warnings():
            # a trial restored from a checkpoint may report a step again: Optuna keeps the first value
            warnings.simplefilter("ignore", UserWarning)
            self._ot_trials[trial_id].report(float(value), int(result["training_iteration"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        # Tune does not pass the result on which a scheduler stopped a trial to on_trial_result:
        # without it, a pruned trial would be ranked by its score one rung earlier
        self._report(trial_id, result)
        if self._finished_in_study(trial_id):
            self._completed_trials.add(trial_id)
            return
        ot_trial = self._ot_trials[trial_id]
        status = trial_status(result, error, self.n_tasks)
        ot_trial.set_user_attr("trial_status", status)
        value = (result or {}).get(self.metric)
        if status == COMPLETED and is_finite_number(value):
            self._ot_study.tell(ot_trial, float(value), state=TrialState.COMPLETE)
        elif status == ERRORED:
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
        else:
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)
