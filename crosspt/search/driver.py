"""The product's main job: Ray Tune + Optuna (TPE) + ASHA over the CrossPT design factors.

The driver owns what happens exactly once per search, in this order: check every input (the space was
validated when loaded; here the data, the backbone, the tracking store, the drills), claim the search's
saved state (`crosspt.search.state`), pre-train or reuse the source bank and resolve `models:/` banks to
files, open the parent run (or reopen the killed driver's, reconciled: `crosspt.search.reconcile`), run
Tune with the Optuna searcher and ASHA (`crosspt.search.optuna_glue`) over the trainable
(`crosspt.search.trainable`), then the parent run's record and summary (`crosspt.search.summary`), the
design-factor report and, on request, the promotion.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from crosspt.config.schema import RunConfig
from crosspt.config.space import SearchSpace
from crosspt.errors import ConfigError
from crosspt.registry import experiments, provenance, run_log, store, ui_view
from crosspt.run.faults import check_drills, kill_point
from crosspt.search.state import SearchPaths, claim_state, release_claim, search_paths
from crosspt.search.summary import NOTE_TAG, log_parent, parent_note

CHECKPOINTS_KEPT = 2      # per trial in Tune's storage: the latest (resume) and the one before it


@dataclass
class SearchRun:
    """What the driver resolved once for one search, and every trial and the final bookkeeping need."""
    space: SearchSpace          # source banks resolved to local files
    base: RunConfig
    uri: str                    # MLflow tracking URI
    experiment_id: str
    parent_run_id: str
    data_dir: str | None
    paths: SearchPaths
    family: str | None = None   # the backbone family (for the liveness table), resolved once
    shipped: dict | None = None  # the task files and banks for nodes without them (run/shipping.py)
    design: list | None = None   # the design trials (`crosspt.search.design.DesignPoint`), the study's first

    def trial_context(self) -> dict:
        """The plain dict `run_trial` gets (Tune pickles it into every trial)."""
        return {"space": self.space.model_dump(mode="json"), "tracking_uri": self.uri,
                "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id,
                "data_dir": self.data_dir, "train_storage": f"{self.paths.root}/_train",
                "train_max_failures": self.space.resources.max_retries, "shipped": self.shipped,
                "design": [{"params": d.params, "strata": d.strata} for d in self.design or []]}


def run_search(space: SearchSpace, *, experiment: str | None = None, data_dir: str | None = None,
               tracking_uri: str | None = None, storage_path: str | None = None, resume: bool = False,
               overwrite: bool = False, verbose: int = 1, promote: str | None = None,
               promote_model: str | None = None, promote_force: bool = False) -> dict:
    """Run (or resume) a search to the end: its source bank first when the space asks to pre-train one,
    then the trials, the report, and (`promote`: an alias) the best FINISHED trial promoted as a version
    of `promote_model` (default: the space's name). Returns a summary with the best trial. The parent run
    ends FINISHED, or FAILED with the error."""
    import ray

    from crosspt.run.trainer import init_ray

    t0 = time.time()
    base, uri, data_dir, splits = _checked_inputs(space, data_dir, tracking_uri)
    exp_name = experiment or (base.tracking.experiment if base.tracking.experiment != "crosspt" else space.name)
    paths = search_paths(space, storage_path, uri, exp_name)
    # a connection this search made is its own, closed at the end: the next search in this process then
    # connects with its own runtime_env (tracking URI, forwarded drills and credentials). Connected before
    # anything is claimed or created: a store the cluster's other nodes cannot reach is refused first
    connected = init_ray(runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": uri,
                                                   **({"CROSSPT_DATA_DIR": data_dir} if data_dir else {})}})
    try:
        store.check_store_reaches_nodes(uri, alive_nodes(), base.tracking.shared_store)
        state = claim_state(paths, space.name, exp_name, resume, overwrite)
        space, bank = _pretrained_bank(space, uri, data_dir, paths)
        from crosspt.registry.models import resolve_space_banks     # models:/ source banks -> local files, once, here
        trial_space = resolve_space_banks(space, uri, dest_dir=paths.banks_dir())

        experiment_id = experiments.ensure_experiment(uri, exp_name)
        c = store.client(uri)
        if resume:
            parent_run_id = _reopen_parent(c, uri, experiment_id, state["parent_run_id"], paths)
        else:
            parent_run_id = _open_parent(c, space, base, experiment_id, paths, splits,
                                         {"experiment_id": experiment_id, "tracking_uri": uri,
                                          "optuna": paths.optuna_url, "experiment": exp_name})
        restore = resume and paths.has_tune_state()
        if resume and not restore:
            # the driver died before Tune saved any trial: the trials start afresh under the same parent run,
            # and the study the dead driver may have asked from starts again with them
            from crosspt.search.optuna_glue import delete_study

            delete_study(paths.optuna_url, paths.study_name)
        kill_point("before_ray")
        from crosspt.config.liveness import family_of

        from crosspt.search.design import make_design

        family = family_of(base)
        run = SearchRun(trial_space, base, uri, experiment_id, parent_run_id, data_dir, paths,
                        family=family, shipped=ship_inputs(trial_space, base, data_dir, splits),
                        design=make_design(trial_space, family=family))
        try:
            summary = _tune(run, restore, verbose)
        except BaseException as e:
            c.set_tag(parent_run_id, "error", f"{type(e).__name__}: {e}"[:5000])
            c.set_terminated(parent_run_id, "FAILED" if not isinstance(e, KeyboardInterrupt) else "KILLED")
            raise
    finally:
        release_claim(paths)
        if connected and ray.is_initialized():
            ray.shutdown()
    summary.update({"wall_s": time.time() - t0, "tracking_uri": uri, "experiment": exp_name,
                    "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                    "storage": paths.root, "search": space.name})
    log_parent(c, parent_run_id, summary, space)
    c.set_terminated(parent_run_id, "FINISHED")
    summary["report"] = _report(c, uri, parent_run_id, paths)
    if bank:
        summary["source_bank"] = bank
    if promote:
        from crosspt.registry.models import promote as promote_best

        summary["promoted"] = promote_best(model_name=promote_model or space.name, alias=promote,
                                           experiment=exp_name, metric=space.objective.metric,
                                           mode=space.objective.mode, parent_run_id=parent_run_id,
                                           tracking_uri=uri, force=promote_force)
    return summary


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive now."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def _checked_inputs(space: SearchSpace, data_dir: str | None, tracking_uri: str | None):
    """Everything a search needs that can be wrong, checked before Ray starts or a run is created:
    `(base config, tracking URI, data folder, the base config's k-shot splits)`."""
    from crosspt.run.trainer import preflight
    from crosspt.tasks.data import resolve_data_dir

    base = space.base_config()
    data_dir = resolve_data_dir(data_dir or base.data.data_dir)
    if data_dir:
        data_dir = str(Path(data_dir).expanduser().resolve())
        base.data.data_dir = data_dir
    splits = preflight(base)                    # unknown task/backbone/missing data or bank: fail now
    from crosspt.config.space import check_repeats

    check_repeats(space, base)
    uri = store.resolve_tracking_uri(tracking_uri or base.tracking.tracking_uri)
    store.check_reachable(uri)
    try:
        check_drills()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return base, uri, data_dir, splits


def _pretrained_bank(space: SearchSpace, uri: str, data_dir: str | None,
                     paths: SearchPaths) -> tuple[SearchSpace, dict | None]:
    """A space with `source_bank: {pretrain: ...}` gets its bank first: the registered version of the same
    spec, else one pre-trained now; the space then names that version (`models:/NAME/VERSION`, pinned:
    the alias may move later). Other spaces pass through."""
    p = space.source_pretrain()
    if p is None:
        return space, None
    from crosspt.registry.sources import ensure_source_bank

    bank = ensure_source_bank(space.source_pretrain_config(), tracking_uri=uri, model_name=p.model_name,
                              alias=p.alias, data_dir=data_dir, output_dir=paths.banks_dir() / f"{space.name}-pretrain")
    print(f"source bank: {'reused' if bank['reused'] else 'pre-trained'} {bank['model_uri']} (spec {bank['spec']})")
    return space.with_source_bank(bank["model_uri"]), bank


# keys that change a trial's k-shot splits (`crosspt.run.shipping.split_key`): a space that searches one has
# trials whose splits the driver cannot draw in advance, so it ships the task files for them to draw their own
_SPLIT_FACTORS = ("tasks", "seed", "data.")


def ship_inputs(space: SearchSpace, base: RunConfig, data_dir: str | None, splits: dict | None = None):
    """What every trial reads, in Ray's object store once: the k-shot splits of the base config (`splits`,
    drawn by the preflight) and of each repeat's seed, drawn here once for all trials; the task files only
    when the space searches a key the splits depend on; local source banks (a node that lacks the driver's
    paths writes the files to its own cache, see run/shipping.py)."""
    import ray

    from crosspt.config.schema import RANDOM_BANK
    from crosspt.run.shipping import draw_splits, manifest, pack_search_inputs
    from crosspt.search.repeats import repeat_configs
    from crosspt.tasks.data import task_files
    from crosspt.tasks.specs import resolve_tasks

    cfgs = repeat_configs(base, space.budget.repeats)
    drawn = draw_splits([(c, splits if i == 0 else None) for i, c in enumerate(cfgs)])
    searched = any(k == f or (f.endswith(".") and k.startswith(f)) for k in space.space for f in _SPLIT_FACTORS)
    files = [f for t in resolve_tasks(base.tasks) for f in task_files(t, data_dir)] if searched else []
    bank_factor = space.space.get("prompt.source_bank")
    banks = [b for b in [base.prompt.source_bank, *((bank_factor.values or []) if bank_factor else [])]
             if isinstance(b, str) and not b.startswith("models:/") and b != RANDOM_BANK]
    packed = pack_search_inputs(files, data_dir, banks)
    return manifest(packed, ray.put(packed), drawn, ray.put(drawn))


def _tune(run: SearchRun, restore: bool, verbose: int) -> dict:
    from ray import tune

    from crosspt.run._ray_compat import tolerate_deleted_checkpoints
    from crosspt.search.optuna_glue import fail_stale_trials, make_scheduler, make_searcher, trial_dirname
    from crosspt.search.reconcile import reconcile_child_runs, status_callback, tune_trials, unfinished_trial_ids
    from crosspt.search.resources import derive_concurrency, trial_resources
    from crosspt.search.summary import summarize
    from crosspt.search.trainable import run_trial

    space, paths = run.space, run.paths
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=run.trial_context()),
                                    trial_resources(run.base))
    if restore:
        tolerate_deleted_checkpoints()
        tuner = tune.Tuner.restore(paths.root, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # Optuna trials the dead driver asked for that Tune never recorded stay RUNNING for ever, and
        # constant_liar would count them as pending for the whole resumed search
        fail_stale_trials(paths.optuna_url, paths.study_name, keep=unfinished_trial_ids(tune_trials(paths.root)))
    else:
        kill_point("before_tuner")
        searcher = make_searcher(space, paths.optuna_url, paths.study_name, run.family, run.design or [])
        tuner = tune.Tuner(
            trainable,
            # one name per trial (`trial003`: Optuna's trial number) in Tune, MLflow and Optuna; the folder
            # keeps Tune's trial id too, which `tune_trials` and the summary match on
            tune_config=tune.TuneConfig(search_alg=searcher, trial_name_creator=searcher.trial_name,
                                        trial_dirname_creator=trial_dirname,
                                        scheduler=make_scheduler(space, run.base.train.epochs,
                                                                 len(run.design or []), run.uri),
                                        num_samples=space.budget.num_samples,
                                        max_concurrent_trials=derive_concurrency(space, run.base),
                                        time_budget_s=space.budget.time_budget_s,
                                        # a trial that ends hands its process to the next one (same resources):
                                        # no new actor, no second import of torch and transformers per trial
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=paths.study_name, storage_path=paths.storage,
                                      callbacks=[status_callback(run.uri, run.experiment_id, run.parent_run_id)],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                                      failure_config=tune.FailureConfig(max_failures=space.resources.max_retries),
                                      verbose=verbose),
        )
    results = tuner.fit()
    trials = tune_trials(paths.root)
    kill_point("reconcile")
    reconcile_child_runs(run.uri, run.experiment_id, run.parent_run_id, trials, search_ended=True)
    fail_stale_trials(paths.optuna_url, paths.study_name)
    return summarize(results, space, trials)


def _reopen_parent(c, uri: str, experiment_id: str, parent_run_id: str, paths: SearchPaths) -> str:
    """The killed driver's parent run, RUNNING again; its child runs reconciled with Tune's state."""
    from crosspt.search.reconcile import reconcile_child_runs, tune_trials

    c.update_run(parent_run_id, status="RUNNING")
    c.set_tag(parent_run_id, "crosspt.resumes", str(int(c.get_run(parent_run_id).data.tags.get("crosspt.resumes", "0")) + 1))
    # child runs a killed driver left RUNNING: trials Tune never recorded are orphans (closed now);
    # trials it recorded as unfinished are resumed below and continue their own child run
    reconcile_child_runs(uri, experiment_id, parent_run_id, tune_trials(paths.root))
    return parent_run_id


def _open_parent(c, space: SearchSpace, base: RunConfig, experiment_id: str, paths: SearchPaths,
                 splits: dict, state: dict) -> str:
    """A new search's parent run (description, params, space, the base config's dataset inputs); the saved
    state names it."""
    search_name = space.name
    parent = c.create_run(experiment_id, run_name=f"search-{search_name}",
                          tags={experiments.SEARCH_TAG: search_name, "crosspt.storage": paths.root,
                                NOTE_TAG: parent_note(space), **provenance.provenance_tags(base.data.data_dir)})
    parent_run_id = parent.info.run_id
    if not c.get_experiment(experiment_id).tags.get(NOTE_TAG):   # the experiments list shows this line
        c.set_experiment_tag(experiment_id, NOTE_TAG, f"crosspt search `{search_name}`"
                             + (f": {space.description}" if space.description else ""))
    # the runs table opens with its factors and scores through the summary's link (summary.runs_page)
    ui_view.save_search_view(c, experiment_id, search_name, list(space.space), space.objective.metric,
                             space.objective.mode)
    # at once: from here on a killed driver leaves a search that --resume can continue
    paths.write_state({"parent_run_id": parent_run_id, **state})
    run_log.log_params(c, parent_run_id, {"search.name": search_name, "search.seed": space.search.seed,
                                          "search.algorithm": space.search.algorithm,
                                          "search.design": space.design_count(),
                                          "search.num_samples": space.budget.num_samples,
                                          "search.scheduler": space.scheduler.type,
                                          "objective.metric": space.objective.metric,
                                          "objective.mode": space.objective.mode,
                                          "space.keys": ",".join(space.space)})
    c.log_text(parent_run_id, run_log.redact(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False)),
               "search_space.yaml")
    c.log_inputs(parent_run_id, datasets=provenance.split_datasets(splits, base.data.data_dir))
    return parent_run_id


def _report(c, uri: str, parent_run_id: str, paths: SearchPaths) -> dict:
    """The design-factor report of the finished search, beside its Tune folder (in the working directory
    for a storage URI) and on the parent run. A report that cannot be drawn is noted on the parent run and
    in the summary: the search's results are in MLflow already and stay valid."""
    from crosspt.search.report import format_table, report_failed, report_search

    out = paths.local_base / f"{paths.study_name}_report"
    try:
        rep, md = report_search(uri, parent_run_id=parent_run_id, out=out, optuna_url=paths.optuna_url,
                                study_name=paths.study_name)
    # any failure, stated: the trials are in MLflow already and stay valid, so the search ends with the
    # report's failure as its last line (`crosspt search` exits 1), on the parent run, and in the summary
    except Exception as e:
        c.set_tag(parent_run_id, "crosspt.report", f"failed: {type(e).__name__}: {e}"[:500])
        line = report_failed(e, parent_run_id, uri)
        return {"dir": str(out), "table": f"report: failed ({type(e).__name__}: {e})", "error": line}
    return {"dir": str(md.parent), "table": format_table(rep)}
