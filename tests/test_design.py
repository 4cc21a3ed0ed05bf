"""The design phase (crosspt/search/design.py): balanced, randomly permuted levels, numeric factors in
strata, conditional factors dealt only where they act, the design handed out first by the Optuna study,
`search.design` validated, and `crosspt report --plan`. No Ray cluster, no training."""
from __future__ import annotations

import collections
import math
import re

import numpy as np
import pytest

from crosspt.config.space import SearchSpace
from crosspt.search.design import N_STRATA, balanced_levels, factor_levels, make_design, plan, stratum_bounds


def space(n: int = 12, design: int | str = "auto", **extra) -> SearchSpace:
    tree = {
        "name": "d",
        "base": {"tasks": ["sst2"], "backbone": {"name": "minilm"}, "prompt": {"source_bank": "random"}},
        "space": {
            "prompt.n_sources": {"type": "int", "low": 0, "high": 2},
            "prompt.top_k": {"type": "int", "low": 1, "high": "prompt.n_sources", "when": {"prompt.n_sources": ">1"}},
            "prompt.composition": {"type": "choice", "values": ["cat", "wavg"]},
            "optim.prompt_lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
            "prompt.private_len": {"type": "int", "low": 4, "high": 64},
        },
        "budget": {"num_samples": n},
        "search": {"seed": 3, "design": design},
        **extra,
    }
    return SearchSpace.model_validate(tree)


def test_levels_are_balanced_and_numeric_factors_stratified():
    s = space(24, 24)
    d = make_design(s)
    assert len(d) == 24
    # a fixed int range of 3 values: its values are its levels, 8 each
    assert collections.Counter(p.params["prompt.n_sources"] for p in d) == {0: 8, 1: 8, 2: 8}
    # log-uniform: thirds of the log range, 8 trials each, every value inside its stratum
    strata = collections.Counter(p.strata["optim.prompt_lr"] for p in d)
    assert sorted(strata.values()) == [8, 8, 8] and all(k.startswith(("t1 [", "t2 [", "t3 [")) for k in strata)
    for p in d:
        s_idx = int(p.strata["optim.prompt_lr"][1]) - 1
        lo, hi = stratum_bounds(s_idx, 1e-4, 1e-1, log=True)
        assert lo <= p.params["optim.prompt_lr"] <= hi
    assert sorted(collections.Counter(p.strata["prompt.private_len"] for p in d).values()) == [8, 8, 8]
    assert factor_levels(s, "optim.prompt_lr") == N_STRATA and factor_levels(s, "prompt.n_sources") == 3
    # seeded: the same design every time, another with another seed
    assert [p.params for p in make_design(s)] == [p.params for p in d]
    assert [p.params for p in make_design(s, seed=4)] != [p.params for p in d]


def test_conditional_factors_are_dealt_only_where_they_act():
    """composition and top_k act only with sources (the liveness table: n_sources > 0 and > 1), so they are
    absent from the other trials and balanced among those where they act; a count that does not divide
    gives the extra trials to randomly drawn levels."""
    d = make_design(space(24, 24))
    routed = [p for p in d if p.params["prompt.n_sources"] > 0]
    assert all("prompt.composition" not in p.params for p in d if p.params["prompt.n_sources"] == 0)
    assert collections.Counter(p.params["prompt.composition"] for p in routed) == {"cat": 8, "wavg": 8}
    assert all(("prompt.top_k" in p.params) == (p.params["prompt.n_sources"] > 1) for p in d)
    assert all(1 <= p.params["prompt.top_k"] <= p.params["prompt.n_sources"] for p in d if "prompt.top_k" in p.params)
    odd = make_design(space(7, 7))
    counts = collections.Counter(p.params["prompt.n_sources"] for p in odd)
    assert sorted(counts.values()) == [2, 2, 3]


def test_the_assignment_is_a_uniform_random_permutation():
    """Every arrangement of a balanced multiset equally likely (what makes the permutation test exact for
    the design used): 2 levels x 2 trials has 6 arrangements; 6000 seeds put each near 1000 (chi-square)."""
    from scipy.stats import chisquare

    seen = collections.Counter(tuple(balanced_levels(4, 2, np.random.default_rng(s))) for s in range(6000))
    assert len(seen) == 6 and all(sorted(k).count(0) == 2 for k in seen)
    assert chisquare(list(seen.values())).pvalue > 0.001
    # 5 trials over 2 levels: the odd trial's level is itself random
    extra = collections.Counter(int(balanced_levels(5, 2, np.random.default_rng(s)).sum()) for s in range(2000))
    assert set(extra) == {2, 3} and abs(extra[2] - extra[3]) < 200


@pytest.mark.parametrize("design, msg", [(-1, "design must be a number of trials >= 0 or 'auto'"),
                                         (13, "search.design (13) is more trials than budget.num_samples (12)"),
                                         ("half", "Input should be")])
def test_search_design_is_validated(design, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        space(12, design)


def test_design_count_auto_and_off():
    assert space(12).design_count() == 6 and space(3).design_count() == 0 and space(12, 0).design_count() == 0
    assert space(12, 12).design_count() == 12 and make_design(space(12, 0)) == []


def test_the_study_hands_out_the_design_first(tmp_path):
    """The searcher the driver builds: Optuna's enqueued design comes out as the study's trials 0..n-1
    with the phase attribute, then the warm-start points, then the sampler's own."""
    from crosspt.search.optuna_glue import make_searcher

    s = space(6, 3, **{"search": {"seed": 3, "design": 3, "algorithm": "optuna",
                                  "points": [{"prompt.n_sources": 0, "prompt.private_len": 8,
                                              "optim.prompt_lr": 0.01}]}})
    d = make_design(s)
    searcher = make_searcher(s, f"sqlite:///{tmp_path / 'optuna.db'}", "d", design=d)
    got = [searcher.suggest(f"t{i}") for i in range(5)]
    assert got[:3] == [p.params for p in d]
    assert got[3] == {"prompt.n_sources": 0, "prompt.private_len": 8, "optim.prompt_lr": 0.01}
    trials = searcher._ot_study.get_trials(deepcopy=False)
    assert [t.user_attrs.get("crosspt.phase") for t in trials[:4]] == ["design"] * 3 + ["optimiser"]
    assert trials[0].user_attrs["crosspt.stratum.optim.prompt_lr"] == d[0].strata["optim.prompt_lr"]


def test_plan_matches_the_reports_power():
    """`plan` is the report's power at the design's size: a 2-level factor among 5 at 24 trials with sd 1
    detects a difference of about 1.4 sd (a t test at 0.01 with 12 per level); more trials, smaller."""
    from statsmodels.stats.power import TTestIndPower

    rows = {r.factor: r for r in plan(space(24, 24), 1.0, effect=2.0)}
    comp = rows["prompt.composition"]
    assert comp.levels == 2 and set(comp.mde) == {12, 24, 48}
    expected = TTestIndPower().solve_power(nobs1=12, alpha=0.05 / 5, power=0.8, alternative="two-sided")
    assert comp.mde[24] == pytest.approx(expected, rel=0.01)
    assert comp.mde[12] > comp.mde[24] > comp.mde[48]
    assert comp.trials_for_effect is not None and comp.trials_for_effect % 2 == 0
    assert rows["optim.prompt_lr"].mde[24] > comp.mde[24]          # 3 strata: fewer trials per level


def test_plan_cli_is_one_error_line_without_noise(tmp_path, capsys):
    from crosspt.cli.main import main

    code = main(["report", "--plan", "--space", "search_spaces/smoke.yaml"])
    err = capsys.readouterr().err
    assert code == 2 and "needs one of --noise-sd or --pilot-experiment" in err and "Traceback" not in err
    assert main(["report", "--plan", "--space", "search_spaces/smoke.yaml", "--noise-sd", "2", "--effect", "5"]) == 0
    out = capsys.readouterr().out
    assert "smallest best − worst difference found with 80% power" in out and "trials for 5" in out
    assert not math.isnan(float(out.splitlines()[-1].split()[3]))



@pytest.mark.slow
def test_asha_never_stops_a_design_trial(ray_head, minilm_path, data_dir, tmp_path, monkeypatch):
    """A real search (MiniLM, SST-2, sequential trials, ASHA with grace 1 and halving): 3 design trials,
    then a warm-start point that cannot learn (index labels at lr 1e-7). Every design trial runs its 4
    epochs, also one that ASHA's rule stops (below the median of the earlier trials at epoch 1); the
    optimiser's weak trial is stopped. The child runs say which is which from MLflow alone, and the
    report's verdicts stand on the design trials."""
    from crosspt.registry import experiments, store
    from crosspt.search.driver import run_search
    from crosspt.search.report import load_search

    monkeypatch.chdir(tmp_path)
    s = SearchSpace.model_validate({
        "name": "designasha",
        "base": {"tasks": ["sst2"], "seed": 0, "backbone": {"name": "minilm", "max_length": 48},
                 "data": {"shots": 8, "max_test": 16}, "prompt": {"private_len": 4},
                 "train": {"batch_size": 8, "patience": None}, "scaling": {"num_workers": 1, "in_process": True}},
        "space": {"prompt.label_semantics": {"type": "choice", "values": ["natural", "index"]},
                  "optim.prompt_lr": {"type": "loguniform", "low": 1e-7, "high": 1e-2}},
        "budget": {"num_samples": 4, "max_epochs": 4},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        # seed 1 deals natural, index, natural: natural label words score ~94 at once, indices ~69, so the
        # second design trial is below the first at epoch 1, where ASHA stops what is below the median
        "search": {"algorithm": "optuna", "seed": 1, "design": 3,
                   "points": [{"prompt.label_semantics": "index", "optim.prompt_lr": 1e-7}]},
        "resources": {"max_concurrent_trials": 1},
    })
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_search(s, data_dir=str(data_dir), tracking_uri=uri, storage_path=str(tmp_path / "ray_results"),
                         verbose=0)
    c = store.client(uri)
    children = sorted(experiments.child_runs(uri, summary["experiment_id"], summary["parent_run_id"]),
                      key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in children] == ["trial000", "trial001", "trial002", "trial003"]
    first = {r.info.run_name: {h.step: h.value for h in c.get_metric_history(r.info.run_id, "best_val_score")}
             for r in children}
    print("\nepoch scores:", first)
    design = children[:3]
    for r in design:
        assert r.data.tags["crosspt.phase"] == "design" and r.data.tags.get("pruned") != "true", r.data.tags
        assert "crosspt.stratum.optim.prompt_lr" in r.data.tags
        assert max(first[r.info.run_name]) == 3                        # all 4 epochs (steps 0..3)
    # ASHA's own rule would have stopped at least one of them: below the median of the earlier trials at epoch 1
    at1 = [first[r.info.run_name][0] for r in design]
    assert any(at1[i] < np.median(at1[:i]) for i in range(1, 3)), at1
    weak = children[3]
    assert weak.data.tags["crosspt.phase"] == "optimiser" and weak.data.tags.get("pruned") == "true"
    assert summary["num_stopped"] == 1
    rows = load_search(uri, parent_run_id=summary["parent_run_id"]).rows
    assert sorted(r.trial_id for r in rows if r.phase == "design") == sorted(r.data.tags[experiments.TRIAL_TAG] for r in design)
