"""The Optuna side of a search: the sampler, the Tune searcher that keeps the study truthful, the ASHA
scheduler over the same metric, and the study's clean-up after a crash.

Imported by the driver only when a search runs (it imports Ray Tune at module level).
"""
from __future__ import annotations

import optuna
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from crosspt.config.space import OptunaDefineByRun, SearchSpace
from crosspt.run._ray_compat import (asha_before_last_step, asha_uncount_stop, completed_trials, optuna_study,
                                     optuna_trials)
from crosspt.search.design import DESIGN, OPTIMISER, PHASE_TAG, STRATUM_TAG, DesignPoint

TUNE_TRIAL_ATTR = "tune_trial_id"        # Optuna user attribute: the Tune trial an Optuna trial belongs to
TRIAL_NAME_ATTR = "trial_name"           # ... its name (`trial_name`): the MLflow run name, Tune's trial name
MLFLOW_RUN_ATTR = "mlflow_run_id"        # ... and its MLflow child run
SQLITE_TIMEOUT_S = 60                    # several searches share one optuna.db: wait for its write lock


def trial_name(number: int) -> str:
    """The one name of a trial: `trial003` is the study's trial number 3 (what Optuna's dashboard shows), the
    MLflow child run's name, Tune's trial name, the report's and the summary's trial."""
    return f"trial{number:03d}"


def trial_dirname(trial) -> str:
    """Tune's `trial_dirname_creator`: `<trial name>_<Tune trial id>` (the id is what the summary and the
    reconciliation match a folder on)."""
    return f"{trial}_{trial.trial_id}"


def rdb_storage(optuna_url: str) -> optuna.storages.RDBStorage:
    """The Optuna storage of a search. A new sqlite file is created (tables, alembic version) under a file
    lock beside it: two searches that open the same new `optuna.db` at once otherwise race through the
    table creation and one dies (`UNIQUE constraint failed: alembic_version.version_num`)."""
    from crosspt.registry.store import file_lock, sqlite_path

    db = sqlite_path(optuna_url)
    if db is None:
        return optuna.storages.RDBStorage(optuna_url)
    with file_lock(db.with_name(db.name + ".lock")):
        return optuna.storages.RDBStorage(optuna_url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}})


class ResumableOptunaSearch(OptunaSearch):
    """`OptunaSearch` that tells the study how each trial really ended, and survives a restore.

    Tune hands every ending trial's last result to `on_trial_complete`, the ones ASHA stopped too, and
    Ray's `OptunaSearch` would then mark a stopped trial COMPLETE with its partial value: TPE would learn
    from it as if it were a full run and the importances would count it. Here only a trial that ran its
    last epoch (`final_epoch`) is COMPLETE; a stopped one is PRUNED at its last step (TPE ranks pruned
    trials by how far they got), a failed one FAIL.

    Restores: Optuna's sqlite study is written at once, Tune's experiment state only every few seconds, so
    a restored trial may already be finished in the study (its driver told Optuna, then died before Tune
    saved). Optuna refuses to update such a trial (`UpdateFinishedTrialError`, and only that error is
    caught): its result is dropped, its value is in the study already. Every trial carries its Tune trial id
    as a user attribute, so a resumed search can fail the trials a dead driver asked for and Tune never
    recorded (`fail_stale_trials`), and its name and MLflow run id (reported by the trial with its first
    result), so the dashboard leads to the run.

    Names: Tune asks `trial_name` (its `trial_name_creator`) for the name of a trial it has just asked this
    searcher for: `trial003` for the study's trial number 3."""

    def suggest(self, trial_id: str):
        params = super().suggest(trial_id)
        ot_trial = optuna_trials(self).get(trial_id)
        if ot_trial is not None:
            if TUNE_TRIAL_ATTR not in ot_trial.user_attrs:
                ot_trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
                ot_trial.set_user_attr(TRIAL_NAME_ATTR, trial_name(ot_trial.number))
        return params

    def trial_name(self, trial) -> str:
        """Tune's `trial_name_creator`: the name of the Optuna trial this searcher suggested for `trial`; for a
        trial Tune restores (a resumed search, whose searcher does not hold it), the study's trial carrying
        its Tune trial id."""
        ot_trial = optuna_trials(self).get(trial.trial_id)
        if ot_trial is not None:
            return trial_name(ot_trial.number)
        study = optuna_study(self)
        if study is not None:
            for t in study.get_trials(deepcopy=False):
                if t.user_attrs.get(TUNE_TRIAL_ATTR) == trial.trial_id:
                    return trial_name(t.number)
        return f"trial_{trial.trial_id}"

    def _record_run(self, trial_id: str, result: dict | None) -> None:
        """The trial's MLflow child run id (each result carries it) as a user attribute, once."""
        ot_trial = optuna_trials(self).get(trial_id)
        run_id = (result or {}).get(MLFLOW_RUN_ATTR)
        if ot_trial is not None and run_id and ot_trial.user_attrs.get(MLFLOW_RUN_ATTR) != run_id:
            try:
                ot_trial.set_user_attr(MLFLOW_RUN_ATTR, run_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass

    def _steps(self, trial_id: str) -> set[int]:
        """The steps the study holds an intermediate value of for `trial_id`'s Optuna trial: read from the
        study once per trial (a restored trial reported some before the crash), then kept here."""
        steps = self.__dict__.setdefault("_reported_steps", {})      # absent on a searcher restored from older state
        if trial_id not in steps:
            number = optuna_trials(self)[trial_id].number
            frozen = next((t for t in optuna_study(self).get_trials(deepcopy=False) if t.number == number), None)
            steps[trial_id] = set(frozen.intermediate_values) if frozen else set()
        return steps[trial_id]

    def on_trial_result(self, trial_id: str, result: dict):
        self._record_run(trial_id, result)
        step = result.get("training_iteration")
        # a step the study holds already (a restored trial replaying its logged epochs) is not reported
        # again: Optuna would ignore it with a warning in the search's output
        if (trial_id in optuna_trials(self) and trial_id not in completed_trials(self)
                and step in self._steps(trial_id)):
            return
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            completed_trials(self).add(trial_id)      # its value is in the study already
            return
        if trial_id in optuna_trials(self) and isinstance(step, int):
            self._steps(trial_id).add(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        # a trial ASHA stops at its first result reaches the searcher here only, not in on_trial_result
        self._record_run(trial_id, result)
        try:
            if error or not result or trial_id in completed_trials(self):
                super().on_trial_complete(trial_id, None, error)      # FAIL, or PRUNED without a value
                return
            self._report_last(trial_id, result)
            if result.get("final_epoch"):
                super().on_trial_complete(trial_id, result)           # COMPLETE with its value
            else:
                optuna_study(self).tell(optuna_trials(self)[trial_id], state=optuna.trial.TrialState.PRUNED)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        completed_trials(self).add(trial_id)

    def _report_last(self, trial_id: str, result: dict) -> None:
        """The result a trial ended on: the one ASHA stopped it at reaches `on_trial_complete` only, and its
        intermediate value is reported here; a trial that ran to its end had its last result through
        `on_trial_result` already, and that step is not reported twice (Optuna would ignore it with the
        warning "The reported value is ignored because this `step` is already reported")."""
        value, step = result.get(self.metric), result.get("training_iteration")
        if isinstance(value, (int, float)) and isinstance(step, int) and step not in self._steps(trial_id):
            optuna_trials(self)[trial_id].report(float(value), step)
            self._steps(trial_id).add(step)


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The study's sampler for `search.algorithm`.

    TPE is Optuna's default (in Optuna 5: multivariate for a single objective, one model over the factors a
    trial shares with the history, no grouping) unless `search.tpe_group` (Optuna's `multivariate=True,
    group=True`: one joint model per set of co-occurring factors, meant for conditional spaces). Grouping
    stays off because it did worse where it was measured: on two synthetic objectives over a CrossPT-shaped
    conditional space, 20 seeds each, it reached the optimum later than the default
    (`jobs/search_signal_bench.py`, `benchmarks/search_signal.md`). `random` and `qmc` are the design
    modes: their samples do not depend on the scores, so the report's level means are not confounded by
    where the sampler chose to look."""
    s = space.search
    if s.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.algorithm == "qmc":
        # scrambled Sobol points; a factor a trial lacks (inactive) is drawn by the independent sampler
        return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=s.seed,
                                          independent_sampler=optuna.samplers.RandomSampler(seed=s.seed),
                                          warn_independent_sampling=False)
    grouped = {"multivariate": True, "group": True} if s.tpe_group else {}
    return optuna.samplers.TPESampler(seed=s.seed, constant_liar=s.constant_liar,
                                      n_startup_trials=s.n_startup_trials, warn_independent_sampling=False,
                                      **grouped)


def make_searcher(space: SearchSpace, optuna_url: str, study_name: str, family: str | None = None,
                  design: list[DesignPoint] = ()):
    """Every algorithm is an Optuna study over the same define-by-run space, persisted in sqlite: PRUNED/FAIL
    states, resume and the importances work for all of them. `family`: the backbone family, resolved once
    by the driver for the liveness table.

    The design trials (`crosspt.search.design`) are enqueued first, then `search.points`: Optuna hands
    enqueued trials out before sampling, in order, so the design is the study's trials 0..n-1, tagged
    `crosspt.phase` (a user attribute) for the dashboard, and the sampler learns from them once they
    complete. Enqueued here rather than through `OptunaSearch(points_to_evaluate=...)`, which enqueues
    params only: the design's order and attributes must be ours."""
    obj = space.objective
    searcher = ResumableOptunaSearch(OptunaDefineByRun(space, family), metric=obj.metric, mode=obj.mode,
                                     sampler=make_sampler(space), storage=rdb_storage(optuna_url),
                                     study_name=study_name)
    for point in design:
        optuna_study(searcher).enqueue_trial(point.params, user_attrs={PHASE_TAG: DESIGN, **{
            STRATUM_TAG + k: v for k, v in point.strata.items()}}, skip_if_exists=False)
    for point in space.search.points:
        optuna_study(searcher).enqueue_trial(dict(point), user_attrs={PHASE_TAG: OPTIMISER})
    # the dashboard and the study's own plots name the objective instead of "Objective 0" (the searcher has
    # created the study: a failure here is the storage's, and a search that cannot write its study stops)
    optuna.load_study(study_name=study_name, storage=rdb_storage(optuna_url)).set_metric_names([obj.metric])
    return searcher


def design_number(trial) -> int | None:
    """The study trial number of a Tune trial from its name (`trial003`, `trial_name`), None when unnamed."""
    name = getattr(trial, "custom_trial_name", None) or ""
    return int(name[5:]) if name.startswith("trial") and name[5:].isdigit() else None


def make_scheduler(space: SearchSpace, epochs: int, n_design: int = 0, tracking_uri: str | None = None):
    """ASHA over the objective's own metric and mode (`SearchSpace.scheduler_metric`): a rung decides on
    the number the search selects on, reported every epoch. It never stops one of the `n_design` design
    trials, and with `tracking_uri` each of its stop decisions is written on the trial's child run
    (`DesignASHA`)."""
    from ray.tune.schedulers import FIFOScheduler

    sch = space.scheduler
    if sch.type == "fifo":
        return FIFOScheduler()
    return DesignASHA(n_design, tracking_uri, metric=space.scheduler_metric, mode=space.objective.mode,
                      time_attr="training_iteration", max_t=epochs, grace_period=min(sch.grace_period, epochs),
                      reduction_factor=sch.reduction_factor)


class DesignASHA(ASHAScheduler):
    """ASHA that acts on the optimiser's trials only, and says which trials it stopped.

    A design trial's results still enter the rungs (they are honest measurements and make the cut-offs
    better), but its decision is always CONTINUE until its last epoch: the report's tests stand on every
    design trial finishing, whatever it scored early. Hand-rolled because no Tune scheduler has a notion of
    trials exempt from stopping; the exemption reads the trial's name, which Tune sets from the searcher
    (`ResumableOptunaSearch.trial_name`) when it creates the trial, whatever then runs it (in-process loop,
    repeats, a Train worker group).

    With `tracking_uri`, each trial it stops before its last epoch gets the tag `crosspt.stopped_by=scheduler`
    on its child run before Tune stops the trial: the trial, the driver's callback and the reconciliation then
    record that stop as pruned by ASHA, and any other early end (time budget, a stopped search) as the
    search's."""

    def __init__(self, n_design: int = 0, tracking_uri: str | None = None, **kw):
        super().__init__(**kw)
        self.n_design = n_design
        self._tracking_uri = tracking_uri

    def exempt(self, trial) -> bool:
        number = design_number(trial)
        return number is not None and number < self.n_design

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if (decision == TrialScheduler.STOP and self.exempt(trial)
                and asha_before_last_step(self, result)):
            asha_uncount_stop(self)
            return TrialScheduler.CONTINUE
        run_id = result.get(MLFLOW_RUN_ATTR)
        # a replayed result (`trainable.replay_result`) keeps the record of who stopped it the first time
        if (decision == TrialScheduler.STOP and self._tracking_uri and run_id and not result.get("final_epoch")
                and not result.get("replayed")):
            from crosspt.registry import best_run, store

            store.client(self._tracking_uri).set_tag(run_id, best_run.STOPPED_BY_TAG, best_run.STOPPED_BY_SCHEDULER)
        return decision


def delete_study(optuna_url: str, study_name: str) -> None:
    try:
        optuna.delete_study(study_name=study_name, storage=rdb_storage(optuna_url))
    except KeyError:
        pass


def fail_stale_trials(optuna_url: str, study_name: str, keep: set[str] = frozenset()) -> int:
    """FAIL the study's RUNNING trials except those of the Tune trials in `keep` (the ones a restored Tune
    continues): a dead driver asked Optuna for them and no trial will ever report. Right after a restore,
    so that `constant_liar` does not count them as pending for the rest of the search, and at the end.
    Returns how many it failed."""
    try:
        storage = rdb_storage(optuna_url)
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:        # no study yet
        return 0
    study_id, n = storage.get_study_id_from_name(study_name), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get(TUNE_TRIAL_ATTR) in keep:
            continue
        storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, t.number),
                                       optuna.trial.TrialState.FAIL)
        n += 1
    return n
