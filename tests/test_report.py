"""The design-factor report (crosspt/search/report.py): pure computations on plain rows, and one real
search whose report must find the factor that matters and clear the one that cannot."""
from __future__ import annotations

import random

import pytest

from crosspt.search.report import (Factor, TrialRow, bootstrap_diff_ci, bootstrap_mean_ci, build_report, importances,
                                   format_table, levels, pareto_front, strongest_interaction, verdict,
                                   write_report)

LS, EBS, LR = Factor("prompt.label_semantics"), Factor("train.eval_batch_size"), Factor("optim.prompt_lr", True, True)


def rows_with_effect(n: int = 16, gap: float = 0.1, seed: int = 0) -> list[TrialRow]:
    """`natural` beats `index` by `gap`; eval_batch_size and the lr do nothing; noise sd 0.02."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ls = "natural" if i % 2 == 0 else "index"
        score = 0.6 + (gap if ls == "natural" else 0.0) + rng.gauss(0, 0.02)
        out.append(TrialRow(f"t{i:02d}", "FINISHED", {LS.key: ls, EBS.key: [16, 64][(i // 2) % 2],
                                                      LR.key: 10 ** rng.uniform(-3, -1)},
                            objective=score, test_score=score - 0.05, trainable_params=1000 * (1 + i % 3)))
    return out


def test_bootstrap_ci_is_seeded_covers_the_mean_and_narrows_with_data():
    rng = random.Random(1)
    small = [[rng.gauss(0.5, 0.1)] for _ in range(8)]
    large = [[rng.gauss(0.5, 0.1)] for _ in range(200)]
    m, lo, hi = bootstrap_mean_ci(small)
    assert lo < m < hi and bootstrap_mean_ci(small) == (m, lo, hi)          # same seed, same interval
    _, lo2, hi2 = bootstrap_mean_ci(large)
    assert hi2 - lo2 < hi - lo and lo2 < 0.5 < hi2
    # a two-stage bootstrap: noisy repeats inside each trial widen the interval of the same trial means
    steady = [[0.5 + d] * 3 for d in (-0.02, 0.0, 0.02, 0.01)]
    noisy = [[0.5 + d - 0.2, 0.5 + d, 0.5 + d + 0.2] for d in (-0.02, 0.0, 0.02, 0.01)]
    s, n = bootstrap_mean_ci(steady), bootstrap_mean_ci(noisy)
    assert abs(s[0] - n[0]) < 1e-9 and (n[2] - n[1]) > 3 * (s[2] - s[1])
    d, lo, hi = bootstrap_diff_ci([[0.7], [0.72], [0.71]], [[0.5], [0.52], [0.49]])
    assert lo > 0 and abs(d - 0.2067) < 1e-3


def test_verdict_wording_effect_none_and_not_varied():
    rows = rows_with_effect()
    v = verdict(LS, rows)
    print("\n" + v.text)
    assert v.kind == "effect" and v.text.startswith("prompt.label_semantics: natural beats index by +")
    assert v.text.endswith(", 16 trials") and 8 < v.diff < 12 and v.lo > 0
    e = verdict(EBS, rows)
    print(e.text)
    assert e.kind == "none" and e.text.startswith("train.eval_batch_size: no detectable effect (") and e.lo <= 0 <= e.hi
    one = [TrialRow(r.trial_id, r.state, {**r.params, EBS.key: 32}, r.objective) for r in rows]
    assert verdict(EBS, one).text == "train.eval_batch_size: not varied (only 32 sampled, 16 trials)"
    # minimising: the lower level wins, worded as such
    lower = verdict(LS, rows, mode="min")
    assert lower.kind == "effect" and lower.text.startswith("prompt.label_semantics: index is lower than natural")


def test_tied_trials_give_zero_importance_not_a_failed_report():
    """Every finished trial at the same score (few shots, 1 epoch, all keep the untrained prompt): fANOVA
    alone raises "zero total variance"; the report gives 0 importance and no effect instead."""
    rows = rows_with_effect(8)
    for r in rows:
        r.objective = 0.5
    imp = importances([LS, EBS], rows)
    assert all(v["fanova"] == 0.0 and v["ped_anova"] == 0.0 for v in imp.values())
    assert verdict(LS, rows).kind == "none"


def test_a_level_seen_in_one_trial_is_never_called_an_effect():
    """Three trials, three levels: one trial each has no spread, so the bootstrap CI collapses to a point
    ([12.5, 12.5] in a real 3-trial search) and must not read as a certain effect."""
    rows = rows_with_effect(3)
    for r, lr in zip(rows, ("natural", "index", "opaque")):
        r.params[LS.key] = lr
    v = verdict(LS, rows)
    assert v.kind == "too_few" and "too few trials to tell" in v.text and "natural: 1" in v.text
    two = rows_with_effect(5)                      # natural x3, index x2: both compared
    assert verdict(LS, two).kind in ("effect", "none")


def test_inactive_values_are_left_out_per_factor_and_numeric_factors_binned():
    rows = rows_with_effect(12)
    for r in rows[:3]:
        r.params[LR.key] = "inactive"
    bins = levels(LR, rows)
    assert len(bins) == 3 and sum(len(v) for v in bins.values()) == 9, bins.keys()
    assert all(k.startswith("[") for k in bins)
    assert len(levels(LS, rows)) == 2 and sum(len(v) for v in levels(LS, rows).values()) == 12
    # importances too: the lr over its 9 active trials, the others over all 12
    rep = build_report("s", "best_val_score", "max", [LS, EBS, LR], rows, best_trial_id=None)
    assert {k: v["n"] for k, v in rep.importance.items()} == {LS.key: 12, EBS.key: 12, LR.key: 9}
    assert next(v for v in rep.verdicts if v.factor == LR.key).n == 9


def test_pruned_trials_are_counted_but_not_used():
    rows = rows_with_effect(10)
    # a pruned trial with an absurd partial score would flip the effect if it were used
    rows += [TrialRow(f"p{i}", "PRUNED", {LS.key: "index", EBS.key: 16, LR.key: 0.01}, objective=5.0) for i in range(6)]
    rows.append(TrialRow("f0", "FAILED", {LS.key: "index", EBS.key: 16, LR.key: 0.01}))
    rep = build_report("s", "best_val_score", "max", [LS, EBS, LR], rows, best_trial_id="t00")
    assert rep.counts == {"FINISHED": 10, "PRUNED": 6, "FAILED": 1, "RUNNING": 0}
    assert rep.verdicts[[v.factor for v in rep.verdicts].index(LS.key)].best == "natural"
    assert all(e.n <= 10 for f in rep.effects.values() for e in f["objective"])
    assert "6 pruned" in format_table(rep)
    running = build_report("s", "best_val_score", "max", [LS], rows + [TrialRow("r", "RUNNING", {LS.key: "index"})],
                           best_trial_id="t00", running=True)
    assert running.counts["RUNNING"] == 1 and "report so far" in format_table(running)


def test_report_ranks_the_factor_that_matters_and_writes_files(tmp_path):
    rows = rows_with_effect(16)
    rep = build_report("s", "best_val_score", "max", [EBS, LR, LS], rows, best_trial_id="t00")
    print("\n" + format_table(rep))
    assert rep.factors[0].key == LS.key
    imp = rep.importance
    assert imp[LS.key]["fanova"] > imp[EBS.key]["fanova"] and imp[LS.key]["ped_anova"] > imp[EBS.key]["ped_anova"]
    md = write_report(rep, tmp_path / "out")
    text = md.read_text()
    assert "natural beats index" in text and "## Pareto front" in text and "t00" in text
    pngs = sorted(p.name for p in md.parent.glob("*.png"))
    assert pngs == ["interaction.png", "parallel_coordinates.png", "pareto.png"]
    assert all(p.stat().st_size > 1000 for p in md.parent.glob("*.png"))


def test_fewer_than_two_finished_trials_give_a_report_that_says_so(tmp_path):
    rows = rows_with_effect(1) + [TrialRow("p", "PRUNED", {LS.key: "index", EBS.key: 16, LR.key: 0.1}, 0.3)]
    rep = build_report("s", "best_val_score", "max", [LS, EBS, LR], rows, best_trial_id="t00")
    md = write_report(rep, tmp_path / "few")
    assert "Fewer than 2 finished trials" in md.read_text()
    assert list(md.parent.glob("*.png")) == []
    assert "fewer than 2 finished trials" in format_table(rep)
    empty = write_report(build_report("s", "m", "max", [LS], [], None), tmp_path / "none")
    assert "0 trials" in empty.read_text()


def test_pareto_front_and_interaction():
    mk = lambda i, p, s, a, b: TrialRow(f"t{i}", "FINISHED", {"a": a, "b": b}, objective=s, trainable_params=p)  # noqa: E731
    rows = [mk(0, 100, 0.5, "x", "u"), mk(1, 200, 0.7, "x", "v"), mk(2, 200, 0.6, "y", "u"),
            mk(3, 300, 0.65, "y", "v"), mk(4, 50, 0.4, "x", "u")]
    assert [r.trial_id for r in pareto_front(rows)] == ["t4", "t0", "t1"]
    # a pure crossover (x good with u, y good with v) is all interaction, no main effect
    cross = [mk(i, 1, s, a, b) for i, (s, a, b) in enumerate([(0.9, "x", "u"), (0.1, "x", "v"), (0.1, "y", "u"),
                                                             (0.9, "y", "v")])]
    x = strongest_interaction([Factor("a"), Factor("b")], cross)
    assert x is not None and abs(x.strength - 0.16) < 1e-9 and x.means == [[0.9, 0.1], [0.1, 0.9]]
    additive = [mk(i, 1, s, a, b) for i, (s, a, b) in enumerate([(0.9, "x", "u"), (0.7, "x", "v"), (0.5, "y", "u"),
                                                                (0.3, "y", "v")])]
    assert strongest_interaction([Factor("a"), Factor("b")], additive).strength < 1e-12


@pytest.mark.parametrize("argv, needle", [(["--experiment", "nope"], "no MLflow experiment 'nope'"),
                                          (["--parent", "0123456789abcdef"], "'0123456789abcdef'")])
def test_report_cli_unknown_search_is_one_error_line(tmp_path, capsys, argv, needle):
    from crosspt.cli.main import main

    code = main(["report", *argv, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]    # MLflow's INFO lines aside
    assert code == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err


def label_space(name: str, num_samples: int = 12, **budget):
    """label_semantics (natural label words vs indices: ~10 points on SST-2 with MiniLM) and
    eval_batch_size (cannot change a score); the k-shot seed varies so levels carry real noise."""
    from crosspt.config.space import SearchSpace

    grid = [{"prompt.label_semantics": ls, "train.eval_batch_size": ebs}
            for ls in ("natural", "index") for ebs in (16, 64)]
    return SearchSpace.model_validate({
        "name": name,
        "base": {"tasks": ["sst2"], "seed": 0, "backbone": {"name": "minilm", "max_length": 48},
                 "data": {"shots": 8, "max_test": 100}, "prompt": {"private_len": 4},
                 "train": {"batch_size": 8, "patience": None}, "scaling": {"num_workers": 1, "in_process": True}},
        "space": {"prompt.label_semantics": {"type": "choice", "values": ["natural", "index"]},
                  "train.eval_batch_size": {"type": "choice", "values": [16, 64]},
                  "seed": {"type": "int", "low": 0, "high": 3}},
        "budget": {"num_samples": num_samples, "max_epochs": 2, **budget},
        "scheduler": {"type": "fifo"},
        "search": {"algorithm": "random", "seed": 0, "points": [{**p, "seed": i} for i, p in enumerate(grid)]},
    })


@pytest.mark.slow
def test_real_search_report_finds_label_semantics_and_clears_eval_batch_size(ray_head, minilm_path, data_dir,
                                                                              tmp_path, monkeypatch, capsys):
    from crosspt.cli.main import main
    from crosspt.registry import tracking as T
    from crosspt.search.driver import run_search

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_search(label_space("labels"), data_dir=str(data_dir), tracking_uri=uri,
                         storage_path=str(tmp_path / "ray_results"), verbose=0)
    assert summary["num_trials"] == 12 and summary["num_failed"] == 0
    print("\n" + summary["report"]["table"])
    md = (tmp_path / "ray_results" / "labels_report" / "report.md").read_text()
    print(md)
    # the search's own report, logged to the parent run: files and tables
    c = T.client(uri)
    logged = {a.path for a in c.list_artifacts(summary["parent_run_id"], "report")}
    assert {"report/report.md", "report/parallel_coordinates.png", "report/importance.json",
            "report/effects.json"} <= logged, logged
    # the CLI builds the same report from MLflow alone
    assert main(["report", "--experiment", "labels", "--tracking-uri", uri, "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    print(out)
    table = [line.split()[0] for line in out.splitlines() if line.startswith(("prompt.", "train.", "seed"))]
    assert table.index("prompt.label_semantics") < table.index("train.eval_batch_size"), out
    assert (tmp_path / "cli" / "report.md").is_file()
    from crosspt.search.report import build_report, load_search

    s = load_search(uri, parent_run_id=summary["parent_run_id"])
    rep = build_report(s.title, s.metric, s.mode, s.factors, s.rows, s.best_trial_id)
    order = [f.key for f in rep.factors]
    assert order.index("prompt.label_semantics") < order.index("train.eval_batch_size"), rep.importance
    v = {x.factor: x for x in rep.verdicts}
    assert v["prompt.label_semantics"].kind == "effect" and v["prompt.label_semantics"].best == "natural"
    assert v["train.eval_batch_size"].lo <= 0 <= v["train.eval_batch_size"].hi, v["train.eval_batch_size"].text
    assert rep.best is not None and rep.best.run_id == summary["best_run_id"] and rep.best.trainable_params


def test_repeats_need_in_process_trials():
    from crosspt.config.space import SearchSpace, validate_space
    from crosspt.errors import ConfigError

    space = SearchSpace.model_validate({"name": "r", "base": {"scaling": {"num_workers": 2}},
                                        "space": {"optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.1}},
                                        "budget": {"repeats": 3}})
    with pytest.raises(ConfigError, match="budget.repeats"):
        validate_space(space)


@pytest.mark.slow
def test_one_job_pretrains_the_bank_searches_reports_promotes_then_reuses_the_bank(ray_head, minilm_path, data_dir,
                                                                                   tmp_path, monkeypatch):
    """`source_bank: {pretrain: ...}`: the first search pre-trains and registers the bank, searches with it,
    reports and promotes its best FINISHED trial; a second search of the same bank spec reuses the version."""
    from crosspt.config.space import SearchSpace
    from crosspt.registry import tracking as T
    from crosspt.search.driver import run_search

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CROSSPT_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def space(name: str) -> SearchSpace:
        return SearchSpace.model_validate({
            "name": name,
            "base": {"tasks": ["sst2"], "seed": 0, "backbone": {"name": "minilm", "max_length": 48},
                     "data": {"shots": 8, "max_test": 32},
                     "prompt": {"private_len": 4, "source_len": 4, "n_sources": 2,
                                "source_bank": {"pretrain": {"tasks": ["sst2", "rte"], "shots": 8, "epochs": 1,
                                                             "model_name": "bank"}}},
                     "train": {"batch_size": 8, "patience": None}, "scaling": {"num_workers": 1, "in_process": True}},
            "space": {"prompt.composition": {"type": "choice", "values": ["cat", "wavg"]}},
            "budget": {"num_samples": 2, "max_epochs": 1}, "scheduler": {"type": "fifo"},
            "search": {"algorithm": "random", "seed": 0}})

    first = run_search(space("pipe"), data_dir=str(data_dir), tracking_uri=uri, storage_path=str(tmp_path / "rr"),
                       verbose=0, promote="champion")
    assert first["source_bank"]["reused"] is False and first["source_bank"]["model_uri"] == "models:/bank/1"
    assert first["num_trials"] == 2 and first["best"] is not None
    c = T.client(uri)
    assert str(c.get_model_version_by_alias("bank", "current").version) == "1"
    promoted = first["promoted"]
    assert promoted["run_id"] == first["best_run_id"] and promoted["model_name"] == "pipe"
    assert c.get_model_version_by_alias("pipe", "champion").run_id
    assert (tmp_path / "rr" / "pipe_report" / "report.md").is_file()
    second = run_search(space("pipe2"), data_dir=str(data_dir), tracking_uri=uri, storage_path=str(tmp_path / "rr"),
                        verbose=0)
    print("\nbanks:", first["source_bank"], second["source_bank"])
    assert second["source_bank"] == {**first["source_bank"], "reused": True}
    assert len(c.search_model_versions("name='bank'")) == 1


@pytest.mark.slow
def test_repeats_train_each_trial_on_several_kshot_samples(ray_head, minilm_path, data_dir, tmp_path, monkeypatch):
    """budget.repeats 2: the child run's objective is the mean of its repeats (each logged, with the std),
    repeat 0 is the plain trial (same score as a repeats-1 search), and the report reads the repeats."""
    from crosspt.registry import tracking as T
    from crosspt.search.driver import run_search
    from crosspt.search.report import load_search

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {}
    for r in (1, 2):
        space = label_space(f"rep{r}", num_samples=2, repeats=r)
        space.search.points = space.search.points[:2]
        s = run_search(space, data_dir=str(data_dir), tracking_uri=uri, storage_path=str(tmp_path / "rr"), verbose=0)
        assert s["num_trials"] == 2 and s["num_failed"] == 0
        runs[r] = {c.data.params["prompt.label_semantics"] + c.data.params["train.eval_batch_size"]: c.data.metrics
                   for c in T.child_runs(uri, s["experiment_id"], s["parent_run_id"])}
        rows = load_search(uri, parent_run_id=s["parent_run_id"]).rows
        assert all(len(x.repeats) == (r if r > 1 else 0) for x in rows), [x.repeats for x in rows]
    print("\nrepeats 2:", {k: {m: v for m, v in x.items() if m.startswith("best_val_score")} for k, x in runs[2].items()})
    for key, m in runs[2].items():
        reps = [m["best_val_score_r0"], m["best_val_score_r1"]]
        assert m["best_val_score"] == pytest.approx(sum(reps) / 2) and "best_val_score_std" in m
        assert m["test_score"] == pytest.approx((m["test_score_r0"] + m["test_score_r1"]) / 2)
        assert reps[0] == pytest.approx(runs[1][key]["best_val_score"])      # repeat 0 is the trial itself
    # the repeats drew other k-shot samples (a 16-example validation split often ties; 100 test rows less so)
    assert any(m["test_score_r0"] != m["test_score_r1"] for m in runs[2].values()), runs[2]
