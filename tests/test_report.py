"""The design-factor report (crosspt/search/report/): its statistics on plain rows (calibrated: no effects
in noise), its renderings, its MLflow reader/writer on a real sqlite store, and one real search whose
report must find the factor that matters and clear the one that cannot."""
from __future__ import annotations

import base64
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest

from crosspt.search.report import (Factor, TrialRow, Verdict, analyse, build_report, format_table, levels,
                                   pareto_front, strongest_interaction, to_json, write_report)

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


def by_factor(factors, rows, mode="max", **kw):
    return {r.factor: r for r in analyse(factors, rows, mode, **kw)}


# ---- calibration: no effects in noise -------------------------------------------------------------
def effect_calls(factors, rows) -> list[bool]:
    """Per factor: does the report call it an effect? (The hook the old-code check swaps for the old
    per-factor `verdict`.)"""
    return [r.verdict == Verdict.EFFECT for r in analyse(factors, rows)]


@pytest.mark.parametrize("design", ["3 levels, 4 trials per level", "5 levels, 2 trials per level",
                                    "numeric (log-uniform lr, terciles), 12 trials"])
def test_null_searches_rarely_report_an_effect(design):
    """Searches where no factor does anything (objective 0.6 + N(0, 0.06)): at most 5% of factor tests
    say `effect`, within Monte-Carlo error (3 SE of 200 searches: a valid test fails this 1 time in 700;
    benchmarks/report_calibration.md has 1000 searches per design). The report before issue 20 (its
    per-factor `verdict` in place of `effect_calls`) said so in 31.5% (3 x 4), 70% (5 x 2) and 25.5%
    (numeric terciles) of these same searches: this test failed on it."""
    from benchmarks.report_calibration import designs, simulate

    d = next(x for x in designs() if x.name == design)
    calls = [c for seed in range(200) for c in effect_calls([s.factor for s in d.specs], simulate(d, seed))]
    rate = sum(calls) / len(calls)
    print(f"\n{design}: false-effect rate {rate:.3f} over {len(calls)} tests")
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / len(calls)), rate


def test_family_wise_rate_and_interval_coverage_in_a_six_factor_space():
    """Six factors, none with an effect, 24 random trials: Holm keeps the chance of any false `effect` in a
    report near 5%, and every best-vs-worst interval covers 0 (the true difference) about 95% of the time
    although best and worst are picked after the fact."""
    from benchmarks.report_calibration import designs, simulate

    d = next(x for x in designs() if x.name == "6-factor space, random, 24 trials")
    any_false, covered, intervals = 0, 0, 0
    for seed in range(60):
        res = analyse([s.factor for s in d.specs], simulate(d, seed))
        any_false += any(r.verdict == Verdict.EFFECT for r in res)
        for r in res:
            if r.ci_low is not None:
                intervals += 1
                covered += r.ci_low <= 0 <= r.ci_high
    print(f"\nfamily-wise {any_false}/60, coverage {covered}/{intervals}")
    assert any_false <= 7                                # 5% of 60 is 3; 7 is beyond 2 SE
    assert covered / intervals >= 0.93


def test_picking_best_and_worst_does_not_inflate_the_estimate():
    """Five levels without effect: the plug-in best-minus-worst is large by construction (winner's curse);
    the report's estimate, re-picked in each redraw, is much closer to the true 0 and inside its interval."""
    from benchmarks.report_calibration import designs, simulate

    d = next(x for x in designs() if x.name == "5 levels, 4 trials per level")
    res = [analyse([s.factor for s in d.specs], simulate(d, seed))[0] for seed in range(40)]
    raw, est = np.mean([r.raw_estimate for r in res]), np.mean([r.estimate for r in res])
    print(f"\nplug-in {raw:.4f}, estimate {est:.4f}")
    assert raw > 0.05 and est < raw / 2          # 5 means with SE 0.03: their range is 0.07 on average
    assert all(r.ci_low <= r.estimate <= r.ci_high for r in res)


def test_a_planted_effect_is_found_beside_a_large_one():
    """`a2` moves the objective by 2 SD, a learning rate over four decades by 4 SD: the test of a2 adjusts
    for the lr (which visibly matters) and finds a2 in most searches; the factors without effect stay
    clear."""
    from benchmarks.report_calibration import designs, simulate

    d = next(x for x in designs() if "beside an lr effect" in x.name)
    found, false = 0, 0
    for seed in range(30):
        res = by_factor([s.factor for s in d.specs], simulate(d, seed))
        found += res["a2"].verdict == Verdict.EFFECT
        false += sum(res[k].verdict == Verdict.EFFECT for k in ("b3", "c5", "seed", "f2"))
    print(f"\na2 found {found}/30, false {false}/120")
    assert found >= 18 and false <= 4


def test_calibration_benchmark_writes_its_table(tmp_path):
    """`python -m benchmarks.report_calibration` end to end on a few searches, the old verdict read from
    git included: the markdown table and its JSON, with the search paths and the power table through
    `build_report`; the markdown again from the JSON."""
    from benchmarks.report_calibration import before_module, main

    out = tmp_path / "cal.md"
    assert main(["--searches", "4", "--before-searches", "2", "--only", "3 levels, 4 trials", "--paths-searches", "1",
                 "--power-searches", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 3 levels, 4 trials per level | 4 / 2 |" in text and "## Method" in text
    assert "## The search paths users run" in text and "| ASHA survivors: 48 trials" in text
    assert "| assessment (200 fixed rows) | 1.74 | 24 | 1 |" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["stats"][0]["after"]["false_effect"]["n"] == 4 and len(data["power"]) == 6
    assert [p["hint_effects"] for p in data["paths"]] == [0, 0]
    again = tmp_path / "again.md"
    assert main(["--from-json", str(out.with_suffix(".json")), "--out", str(again)]) == 0
    assert again.read_text() == text
    if before_module() is None:
        pytest.skip("no git history with the old report here (a shallow clone): the before column is empty")
    assert data["stats"][0]["before"]["false_effect"]["n"] == 2


def test_the_interval_excludes_zero_exactly_when_the_verdict_is_effect():
    """One construction for test, p and interval (stats.py): over simulated searches with effects of every
    size around the detection limit, `effect` <=> the best-vs-worst interval excludes 0 <=> the adjusted p
    < 0.05, for 5 levels x 3 trials (the issue's case), 2 levels x 6 and a 3-factor space. Failed on the code
    before (a sum-of-squares test with Holm, Tukey's interval beside it), at its first disagreement:
    `(8, 'f0', <Verdict.NONE: 'none'>, 0.063, 0.0249, 0.2545)`, no effect with an interval excluding 0."""
    rng = np.random.default_rng(0)
    checked = effects = 0
    for seed in range(240):
        k, per, n_factors = [(5, 3, 1), (2, 6, 1), (3, 4, 3)][seed % 3]
        gap = rng.uniform(0, 4) * 0.06                     # 0 to 4 SD from the worst level to the best
        rows = []
        for i in range(k * per):
            params = {f"f{j}": f"l{(i + j * (i // k)) % k}" for j in range(n_factors)}
            y = 0.6 + gap * int(params["f0"][1:]) / (k - 1) + rng.normal(0, 0.06)
            rows.append(TrialRow(f"t{i}", "FINISHED", params, objective=y))
        for r in analyse([Factor(f"f{j}") for j in range(n_factors)], rows):
            if r.ci_low is None:
                assert r.verdict != Verdict.EFFECT, r
                continue
            checked += 1
            excludes = r.ci_low > 0 or r.ci_high < 0
            effects += r.verdict == Verdict.EFFECT
            assert (r.verdict == Verdict.EFFECT) == excludes == (r.p_adjusted < 0.05), (
                seed, r.factor, r.verdict, r.p_adjusted, r.ci_low, r.ci_high)
    print(f"\n{checked} intervals, {effects} effects")
    assert effects > 40 and checked - effects > 40            # both sides of the boundary were exercised


def survivor_rows(seed: int, design: int) -> list[TrialRow]:
    """Issue 30's survivor design: 48 trials; `slow` lowers the first rung by 1.2 SD and does nothing to
    the final score; a per-trial quality is shared by rung and final score (measured with 0.3 SD of noise
    each); ASHA lets the top half at the rung continue. The first `design` trials are design trials
    (balanced, never stopped); the rest are pruned among themselves. Phases are set after construction,
    so the rows also build on the code before the design phase."""
    rng = np.random.default_rng([seed, 7])
    slow = np.concatenate([rng.permutation(np.arange(design) % 2), rng.integers(0, 2, 48 - design)])
    quality = rng.normal(0, 0.06, 48)
    rung = 0.5 + quality - 1.2 * 0.06 * slow + rng.normal(0, 0.018, 48)
    final = 0.6 + quality + rng.normal(0, 0.018, 48)
    cut = np.median(rung[design:])
    rows = []
    for i in range(48):
        done = i < design or rung[i] >= cut
        row = TrialRow(f"t{i:02d}", "FINISHED" if done else "PRUNED", {"slow": ["fast", "slow"][slow[i]]},
                       objective=float(final[i] if done else rung[i]))
        row.phase = "design" if i < design else "optimiser"
        rows.append(row)
    return rows


def test_asha_survivors_are_never_the_evidence_for_an_effect():
    """A factor that only slows early learning: among ASHA's survivors the slow trials are the ones of
    high quality, so "slow beats fast" on the final score although it does nothing to it.
    - A search whose trials all went through ASHA (no design trials, random searcher): its finished trials
      are survivors, so the report claims nothing (hints only). Failed on the code before the design phase,
      which tested every finished trial: `slow` was an effect in 22 of these 60 searches (37%):
      `assert 22 == 0`.
    - The default path (24 design trials that ASHA never stops, 24 optimiser trials): the verdicts stand on
      the design trials, at most 5% of searches (within 3 Monte-Carlo SE of 60) call `slow` an effect, and
      they do not change when other trials survive instead."""
    survivors_only = design = 0
    for seed in range(60):
        rep = build_report("s", "best_val_score", "max", [Factor("slow")], survivor_rows(seed, 0), None,
                           algorithm="random")
        survivors_only += sum(r.verdict == Verdict.EFFECT for r in rep.results)
        rep = build_report("s", "best_val_score", "max", [Factor("slow")], survivor_rows(seed, 24), None,
                           algorithm="optuna")
        design += sum(r.verdict == Verdict.EFFECT for r in rep.results)
    print(f"\nslow called an effect: {survivors_only}/60 searches without design trials, {design}/60 with")
    assert survivors_only == 0
    assert design <= 3 + 3 * math.sqrt(60 * 0.05 * 0.95), design
    # which optimiser trials survived changes nothing in the verdicts
    rows = survivor_rows(0, 24)
    flipped = [TrialRow(r.trial_id, "PRUNED" if r.state == "FINISHED" else "FINISHED", r.params,
                        objective=r.objective + 0.3, phase=r.phase) if r.phase == "optimiser" else r for r in rows]
    a, b = (build_report("s", "m", "max", [Factor("slow")], x, None, algorithm="optuna") for x in (rows, flipped))
    assert [(r.verdict, r.p, r.ci_low, r.ci_high) for r in a.results] == \
        [(r.verdict, r.p, r.ci_low, r.ci_high) for r in b.results]
    assert a.family == "design" and {r.trial_id for r in a.main_rows} == {f"t{i:02d}" for i in range(24)}


def test_tiny_designs_are_too_few_or_exact():
    """A permutation test of 2 x 2 trials has 3 distinct outcomes, of 3 x 2 trials 15 (levels of equal size
    can swap names): p can never fall below 0.05, so the verdict is too_few and says why, while the
    difference is still shown. 2 x 4 trials: 35 outcomes, the clearest split reaches p = 1/35."""
    def rows(values):
        return [TrialRow(f"t{i}", "FINISHED", {"x": lv}, objective=v) for i, (lv, v) in enumerate(values)]

    r = by_factor([Factor("x")], rows([("a", 0.9), ("a", 0.91), ("b", 0.1), ("b", 0.11)]))["x"]
    assert r.verdict == Verdict.TOO_FEW and "cannot fall below 0.05" in r.note and r.p is None
    assert r.estimate is not None and r.best == "a"
    r = by_factor([Factor("x")], rows([("a", 0.9), ("a", 0.91), ("b", 0.5), ("b", 0.52), ("c", 0.1), ("c", 0.12)]))["x"]
    assert r.verdict == Verdict.TOO_FEW and r.best == "a" and r.worst == "c"
    r = by_factor([Factor("x")], rows([("a", 0.9 + i / 100) for i in range(4)] + [("b", 0.1 + i / 100) for i in range(4)]))["x"]
    assert r.verdict == Verdict.EFFECT and r.p == pytest.approx(1 / 35, abs=0.01)


def test_verdicts_effect_none_not_varied_and_min_mode():
    rows = rows_with_effect()
    res = by_factor([LS, EBS, LR], rows)
    ls, ebs = res[LS.key], res[EBS.key]
    assert ls.verdict == Verdict.EFFECT and ls.best == "natural" and ls.worst == "index"
    assert 0.08 < ls.estimate < 0.12 and ls.ci_low > 0 and ls.p_adjusted < 0.01 and ls.importance > ls.noise
    assert ebs.verdict == Verdict.NONE and ebs.ci_low <= 0 <= ebs.ci_high and ebs.p_adjusted > 0.05
    assert ebs.importance < ebs.noise
    rep = build_report("s", "best_val_score", "max", [LS, EBS, LR], rows, best_trial_id="t00", algorithm="random")
    table = format_table(rep)
    print("\n" + table)
    assert re.search(r"prompt.label_semantics .* natural beats index by \d+\.\d pts \[95% CI \d", table)
    assert re.search(r"train.eval_batch_size .* no detectable effect \((16 vs 64|64 vs 16): ", table)
    one = [TrialRow(r.trial_id, r.state, {**r.params, EBS.key: 32}, r.objective) for r in rows]
    assert by_factor([EBS], one)[EBS.key].verdict == Verdict.NOT_VARIED
    # minimising: the lower level wins, worded as such, the difference best - worst is negative
    low = by_factor([LS], rows, mode="min")[LS.key]
    assert low.best == "index" and low.estimate < 0 and low.ci_high < 0
    rep = build_report("s", "loss", "min", [LS], rows, best_trial_id=None, algorithm="random")
    assert "index is lower than natural by" in format_table(rep)


def test_tied_trials_give_zero_importance_not_a_failed_report():
    """Every finished trial at the same score (few shots, 1 epoch, all keep the untrained prompt): nothing
    to attribute, no effect, no failure."""
    rows = rows_with_effect(8)
    for r in rows:
        r.objective = 0.5
    res = by_factor([LS, EBS], rows)
    assert all(r.importance == 0.0 and r.verdict == Verdict.NONE for r in res.values())


def test_a_level_seen_in_one_trial_is_never_called_an_effect():
    """Three trials, three levels: one trial each has no spread: too few to tell."""
    rows = rows_with_effect(3)
    for r, lv in zip(rows, ("natural", "index", "opaque")):
        r.params[LS.key] = lv
    r = by_factor([LS], rows)[LS.key]
    assert r.verdict == Verdict.TOO_FEW and r.n_per_level == {"index": 1, "natural": 1, "opaque": 1}
    rep = build_report("s", "m", "max", [LS], rows, None)
    assert "too few trials to tell (trials per level: index: 1, natural: 1, opaque: 1" in format_table(rep)


def test_inactive_values_are_left_out_per_factor_and_numeric_factors_binned():
    rows = rows_with_effect(12)
    for r in rows[:3]:
        r.params[LR.key] = "inactive"
    bins = levels(LR, rows)
    assert len(bins) == 3 and sum(len(v) for v in bins.values()) == 9, bins.keys()
    assert all(k.startswith("[") for k in bins)
    assert len(levels(LS, rows)) == 2 and sum(len(v) for v in levels(LS, rows).values()) == 12
    rep = build_report("s", "best_val_score", "max", [LS, EBS, LR], rows, best_trial_id=None, algorithm="random")
    assert {r.factor: r.n for r in rep.results} == {LS.key: 12, EBS.key: 12, LR.key: 9}
    never = [TrialRow(r.trial_id, r.state, {**r.params, LR.key: "inactive"}, r.objective) for r in rows]
    assert by_factor([LR], never)[LR.key].verdict == Verdict.INACTIVE


def test_pruned_trials_prune_rates_and_the_common_rung():
    """Pruned trials never enter the finished-trial analysis; each level's prune rate is shown; with the
    rung values every finished and pruned trial is compared at the common epoch (its own family)."""
    rows = rows_with_effect(10)
    for r in rows:
        r.rung, r.phase = r.objective - 0.1, "design"
    # pruned trials with an absurd partial score would flip the effect if they were used as finished ones
    rows += [TrialRow(f"p{i}", "PRUNED", {LS.key: "index", EBS.key: 16, LR.key: 0.01}, objective=5.0, rung=0.3,
                      phase="optimiser") for i in range(6)]
    rows.append(TrialRow("f0", "FAILED", {LS.key: "index", EBS.key: 16, LR.key: 0.01}))
    rep = build_report("s", "best_val_score", "max", [LS, EBS, LR], rows, best_trial_id="t00", rung_epoch=1,
                       algorithm="random")
    assert rep.counts == {"FINISHED": 10, "PRUNED": 6, "FAILED": 0 + 1, "RUNNING": 0}
    ls = rep.result(LS.key)
    assert ls.best == "natural" and ls.n == 10
    assert rep.prune_rates[LS.key] == {"index": pytest.approx(6 / 11), "natural": 0.0}
    rung = {r.factor: r for r in rep.rung_results}
    assert rep.rung_epoch == 1 and rung[LS.key].n == 16 and rung[LS.key].verdict == Verdict.EFFECT
    table = format_table(rep)
    assert "6 pruned" in table and "at epoch 2, every finished and pruned trial:" in table
    j = to_json(rep)
    assert j["rung"]["epoch"] == 2 and j["factors"][0]["prune_rate_per_level"]
    running = build_report("s", "best_val_score", "max", [LS], rows + [TrialRow("r", "RUNNING", {LS.key: "index"})],
                           best_trial_id="t00", running=True)
    assert running.counts["RUNNING"] == 1 and "report so far" in format_table(running)


def test_adaptive_trials_are_hints_never_effects(tmp_path):
    """Trials TPE chose (no design trials): the clear label_semantics difference is a `hint`, never an
    `effect`, in the table, report.md/html, report.json and the plots' colours; the report says that it
    makes no claim. Failed on the code before the design phase, where TPE's trials gave `effect` and only a
    note called them hints: `assert [<Verdict.EFFECT: 'effect'>] == []`."""
    rows = rows_with_effect(12)
    tpe = build_report("s", "m", "max", [LS, EBS], rows, None, algorithm="optuna")
    assert [r.verdict for r in tpe.results if r.verdict == Verdict.EFFECT] == []
    verdicts = [r.verdict for r in tpe.results + tpe.hints]
    assert Verdict.EFFECT not in verdicts and tpe.hint(LS.key).verdict == Verdict.HINT
    assert tpe.results == [] and tpe.family == ""
    table = format_table(tpe)
    assert "No verdicts" in table and "hint, no claim: natural beats index" in table
    j = to_json(tpe)
    assert j["searcher"]["adaptive"] and j["factors"] == [] and j["hints"][0]["verdict"] == "hint"
    md = write_report(tpe, tmp_path / "tpe").read_text()
    assert "`effect`" not in md.replace("`effect` only", "") and "Hints from every finished trial" in md
    from crosspt.search.report.plots import verdict_colour

    assert verdict_colour(Verdict.HINT, "C7") != verdict_colour(Verdict.EFFECT, "C7")
    # the same trials as a design: a claim
    for r in rows:
        r.phase = "design"
    assert build_report("s", "m", "max", [LS, EBS], rows, None, algorithm="optuna").result(LS.key).verdict == Verdict.EFFECT
    assert not build_report("s", "m", "max", [LS, EBS], rows, None, algorithm="qmc").adaptive


def test_report_files_md_html_json_in_points(tmp_path):
    rows = rows_with_effect(16)
    rep = build_report("s", "best_val_score", "max", [EBS, LR, LS], rows, best_trial_id="t00", algorithm="random")
    print("\n" + format_table(rep))
    assert rep.factors[0].key == LS.key                          # most important first
    md = write_report(rep, tmp_path / "out")
    text = md.read_text()
    assert "natural beats index" in text and "## Pareto front" in text and "t00" in text
    pngs = sorted(p.name for p in md.parent.glob("*.png"))
    assert pngs == ["effects.png", "importance.png", "interaction.png", "parallel_coordinates.png", "pareto.png"]
    # report.html: self-contained (every figure inline), the same verdicts
    html = (md.parent / "report.html").read_text()
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', html)
    assert {a for a, _ in imgs} == {"importance", "effects", "parallel coordinates", "interaction", "pareto front"}
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for _, b in imgs)
    assert "natural beats index by" in html and "src=\"http" not in html and ".png\"" not in html
    # report.json: the fields programs read, scores in points like every other number of the report
    j = json.loads((md.parent / "report.json").read_text())
    f = {x["factor"]: x for x in j["factors"]}
    for key in ("factor", "verdict", "p", "p_adjusted", "estimate", "ci_low", "ci_high", "n_per_level",
                "prune_rate_per_level"):
        assert key in f[LS.key], key
    assert f[LS.key]["verdict"] == "effect" and 8 < f[LS.key]["estimate"] < 12 and f[EBS.key]["verdict"] == "none"
    assert f[LS.key]["n_per_level"] == {"index": 8, "natural": 8} and j["unit"] == "pts"
    best = rows[0].objective * 100
    assert j["best"]["objective"] == pytest.approx(best) and f"best_val_score = {best:.1f}" in text
    assert all(p["objective"] > 1 for p in j["pareto"])


def test_fewer_than_two_finished_trials_give_a_report_that_says_so(tmp_path):
    rows = rows_with_effect(1) + [TrialRow("p", "PRUNED", {LS.key: "index", EBS.key: 16, LR.key: 0.1}, 0.3)]
    rep = build_report("s", "best_val_score", "max", [LS, EBS, LR], rows, best_trial_id="t00")
    md = write_report(rep, tmp_path / "few")
    assert "Fewer than 2 finished trials" in md.read_text()
    assert list(md.parent.glob("*.png")) == []
    assert "fewer than 2 finished trials" in format_table(rep)
    assert json.loads((md.parent / "report.json").read_text())["factors"] == []
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


def synthetic_search(uri: str, n: int = 16, pruned: int = 4, algorithm: str = "random") -> str:
    """A search as the driver leaves it in MLflow, written with the real client into a real sqlite store:
    the parent run (search tag, params, search_space.yaml) and child runs with their sampled values, one
    objective value per epoch, and ASHA's stops (KILLED + `pruned` tag, 1 epoch); the finished trials are
    design trials with an `assess_score`, the stopped ones the optimiser's. `natural` beats `index`
    by 10 points; eval_batch_size does nothing. Returns the parent run id."""
    import yaml

    from crosspt.registry import experiments, run_log, store

    c = store.client(uri)
    eid = c.create_experiment("synthetic")
    parent = c.create_run(eid, run_name="search-synthetic", tags={experiments.SEARCH_TAG: "synthetic"}).info.run_id
    run_log.log_params(c, parent, {"search.algorithm": algorithm, "objective.metric": "best_val_score",
                                   "objective.mode": "max", "space.keys": f"{LS.key},{EBS.key}"})
    c.log_text(parent, yaml.safe_dump({"space": {LS.key: {"type": "choice", "values": ["natural", "index"]},
                                                 EBS.key: {"type": "choice", "values": [16, 64]}}}),
               "search_space.yaml")
    rng = random.Random(0)
    for i in range(n + pruned):
        ls, ebs = ("natural" if i % 2 == 0 else "index"), [16, 64][(i // 2) % 2]
        stopped = i >= n
        if stopped:
            ls = "index"
        run = c.create_run(eid, run_name=f"trial-{i}", tags={"mlflow.parentRunId": parent, experiments.TRIAL_TAG: f"t{i:02d}",
                                                            "crosspt.sampled": json.dumps({LS.key: ls, EBS.key: ebs}),
                                                            "crosspt.phase": "optimiser" if stopped else "design",
                                                            **({"pruned": "true"} if stopped else {})}).info.run_id
        final = 0.6 + (0.1 if ls == "natural" else 0.0) + rng.gauss(0, 0.02)
        for epoch in range(1 if stopped else 3):
            run_log.log_metrics(c, run, {"best_val_score": final - 0.05 * (2 - epoch) - (0.1 if stopped else 0)},
                                step=epoch)
        if not stopped:
            run_log.log_metrics(c, run, {"test_score": final - 0.03, "trainable_params": 1000 + 10 * i,
                                         "assess_score": final - 0.02})
        c.set_terminated(run, "KILLED" if stopped else "FINISHED")
    c.set_terminated(parent, "FINISHED")
    return parent


def test_report_from_mlflow_alone_logs_md_html_json_and_the_importance_plot(tmp_path, capsys):
    """`crosspt report --parent` on a real sqlite store: rows from the child runs (sampled values, pruned tag,
    per-epoch history for the common rung), report.md/html/json written and logged under `report/`, the
    tables, and the parent's importance plot drawn from the same numbers."""
    from crosspt.cli.main import main
    from crosspt.registry import store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = synthetic_search(uri)
    assert main(["report", "--parent", parent, "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "natural beats index by" in out and "at epoch 1, every finished and pruned trial:" in out
    j = json.loads((tmp_path / "out" / "report.json").read_text())
    f = {x["factor"]: x for x in j["factors"]}
    assert f[LS.key]["verdict"] == "effect" and f[EBS.key]["verdict"] == "none"
    assert f[LS.key]["n_per_level"] == {"index": 8, "natural": 8}
    assert j["family"]["kind"] == "design" and j["family"]["tested"] == "assess_score" and len(j["family"]["trials"]) == 16
    assert f[EBS.key]["mde_80"] > 0 and "80% power only for a best − worst difference of" in f[EBS.key]["text"]
    assert f[LS.key]["prune_rate_per_level"] == {"index": pytest.approx(4 / 12), "natural": 0.0}
    assert j["rung"]["epoch"] == 1 and {x["factor"]: x["n"] for x in j["rung"]["factors"]}[LS.key] == 20
    assert j["searcher"] == {"algorithm": "random", "adaptive": False} and j["best"]["trial_id"]
    c = store.client(uri)
    logged = {a.path for a in c.list_artifacts(parent, "report")} | {a.path for a in c.list_artifacts(parent, "plots")}
    assert {"report/report.md", "report/report.html", "report/report.json", "report/importance.png",
            "report/factors.json", "report/levels.json", "plots/param_importances.png"} <= logged, logged
    # a second report replaces the tables: MLflow's log_table alone appends (two reports' rows in one table)
    assert main(["report", "--parent", parent, "--tracking-uri", uri, "--out", str(tmp_path / "again")]) == 0
    table = json.loads(Path(c.download_artifacts(parent, "report/factors.json", str(tmp_path))).read_text())
    assert table["columns"][0] == "factor" and len(table["data"]) == 2, table


def test_importances_on_the_optuna_study_for_the_dashboard(tmp_path):
    """The study gets the report's importances (user attr) and a dashboard note with the same numbers."""
    import optuna
    from optuna_dashboard import get_note

    from crosspt.search.report import publish_to_study
    from crosspt.search.report.store import STUDY_ATTR

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url, direction="maximize")
    rep = build_report("s", "best_val_score", "max", [LS, EBS], rows_with_effect(16), None, algorithm="random")
    publish_to_study(rep, url, "s")
    study = optuna.load_study(study_name="s", storage=url)
    attr = study.user_attrs[STUDY_ATTR]
    assert attr[LS.key]["verdict"] == "effect" and attr[LS.key]["importance"] == rep.result(LS.key).importance
    note = get_note(study)
    assert f"| {LS.key} | {rep.result(LS.key).importance:.2f} |" in note and "PED-ANOVA" in note


def label_space(name: str, num_samples: int = 12, **budget):
    """label_semantics (natural label words vs indices: ~10 points on SST-2 with MiniLM) and
    eval_batch_size (cannot change a score); the k-shot seed varies so levels carry real noise."""
    from crosspt.config.space import SearchSpace

    return SearchSpace.model_validate({
        "name": name,
        "base": {"tasks": ["sst2"], "seed": 0, "backbone": {"name": "minilm", "max_length": 48},
                 # 32 validation rows per class: with 8 (the default: as many as shots) the objective's noise
                 # hid the ~15-point effect at 12 trials on some k-shot draws (p 0.06 before Holm)
                 "data": {"shots": 8, "val_shots": 32, "max_test": 100}, "prompt": {"private_len": 4},
                 "train": {"batch_size": 8, "patience": None}, "scaling": {"num_workers": 1, "in_process": True}},
        "space": {"prompt.label_semantics": {"type": "choice", "values": ["natural", "index"]},
                  "train.eval_batch_size": {"type": "choice", "values": [16, 64]},
                  "seed": {"type": "int", "low": 0, "high": 3}},
        "budget": {"num_samples": num_samples, "max_epochs": 2, **budget},
        "scheduler": {"type": "fifo"},
        # every trial a design trial: each factor's levels balanced and randomly dealt (`crosspt.search.design`)
        "search": {"algorithm": "random", "seed": 0, "design": num_samples},
    })


@pytest.mark.slow
def test_real_search_report_finds_label_semantics_and_clears_eval_batch_size(ray_head, minilm_path, data_dir,
                                                                              tmp_path, monkeypatch, capsys):
    from crosspt.cli.main import main
    from crosspt.registry import store
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
    c = store.client(uri)
    logged = {a.path for a in c.list_artifacts(summary["parent_run_id"], "report")}
    assert {"report/report.md", "report/report.html", "report/report.json", "report/importance.png",
            "report/factors.json"} <= logged, logged
    # the CLI builds the same report from MLflow alone
    assert main(["report", "--experiment", "labels", "--tracking-uri", uri, "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    print(out)
    table = [line.split()[0] for line in out.splitlines() if line.startswith(("prompt.", "train.", "seed"))]
    assert table.index("prompt.label_semantics") < table.index("train.eval_batch_size"), out
    j = json.loads((tmp_path / "cli" / "report.json").read_text())
    f = {x["factor"]: x for x in j["factors"]}
    assert j["family"]["kind"] == "design" and len(j["family"]["trials"]) == 12, j["family"]     # every trial designed
    assert f["prompt.label_semantics"]["n_per_level"] == {"index": 6, "natural": 6}                  # balanced
    assert f["prompt.label_semantics"]["verdict"] == "effect" and f["prompt.label_semantics"]["best"] == "natural", out
    assert f["train.eval_batch_size"]["verdict"] == "none", out
    assert f["train.eval_batch_size"]["ci_low"] <= 0 <= f["train.eval_batch_size"]["ci_high"]
    from crosspt.search.report import load_search

    s = load_search(uri, parent_run_id=summary["parent_run_id"])
    rep = build_report(s.title, s.metric, s.mode, s.factors, s.rows, s.best_trial_id, algorithm=s.algorithm)
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
    from crosspt.registry import store
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
    c = store.client(uri)
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
    from crosspt.registry import experiments
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
                   for c in experiments.child_runs(uri, s["experiment_id"], s["parent_run_id"])}
        rows = load_search(uri, parent_run_id=s["parent_run_id"]).rows
        assert all(len(x.repeats) == (r if r > 1 else 0) for x in rows), [x.repeats for x in rows]
    print("\nrepeats 2:", {k: {m: v for m, v in x.items() if m.startswith("best_val_score")} for k, x in runs[2].items()})
    for key, m in runs[2].items():
        reps = [m["best_val_score_r0"], m["best_val_score_r1"]]
        assert m["best_val_score"] == pytest.approx(sum(reps) / 2) and "best_val_score_std" in m
        assert m["test_score"] == pytest.approx((m["test_score_r0"] + m["test_score_r1"]) / 2)
        assert m["assess_score"] == pytest.approx((m["assess_score_r0"] + m["assess_score_r1"]) / 2)
        assert reps[0] == pytest.approx(runs[1][key]["best_val_score"])      # repeat 0 is the trial itself
    # the repeats drew other k-shot samples (a 16-example validation split often ties; 100 test rows less so)
    assert any(m["test_score_r0"] != m["test_score_r1"] for m in runs[2].values()), runs[2]


def test_factors_the_design_trials_cannot_split_are_named_confounded():
    """Two 2-level factors dealt the same split of 8 design trials (the decoder search drew `prompt.init` and
    `prompt.label_semantics` so: every text trial opaque, every vocab trial natural) get one warning naming
    both, in the text and in report.json; the same trials with the pair split get none."""
    from crosspt.search.report.render import design_note

    init, sem = Factor("prompt.init"), Factor("prompt.label_semantics")
    rng = random.Random(0)
    split = ["text", "vocab", "vocab", "text", "text", "vocab", "text", "vocab"]

    def rows(semantics):
        return [TrialRow(f"t{i}", "FINISHED", {init.key: a, sem.key: b, LR.key: 0.01 * (i + 1)},
                         objective=rng.random(), phase="design") for i, (a, b) in enumerate(zip(split, semantics))]

    aliased = build_report("s", "best_val_score", "max", [init, sem, LR],
                           rows(["opaque" if a == "text" else "natural" for a in split]), None, algorithm="optuna")
    assert aliased.family == "design"
    assert {frozenset(pair) for pair in aliased.aliased} == {frozenset((init.key, sem.key))}
    assert "Confounded in these trials" in design_note(aliased)
    assert sorted(to_json(aliased)["family"]["confounded"][0]) == sorted([init.key, sem.key])
    crossed = build_report("s", "best_val_score", "max", [init, sem, LR],
                           rows(["opaque", "opaque", "natural", "natural", "opaque", "opaque", "natural", "natural"]),
                           None, algorithm="optuna")
    assert crossed.aliased == [] and "Confounded" not in design_note(crossed)


def test_no_power_where_the_permutation_test_cannot_reach_the_level():
    """8 design trials in 2 levels of 4 allow 35 distinct arrangements, so the permutation p-value is at least
    1/35 = 0.029: above 0.05 / 5 factors (the decoder search's 8 design trials), fine for one factor. The power
    (and the smallest detectable difference it gives) must know that floor; normal theory alone said 80% power
    for a 13.8-point difference there."""
    from crosspt.search.report.power import detectable, power, trials_needed

    assert power(10.0, 2, 4, 0.05 / 5) == 0.0
    assert math.isinf(detectable(2, 4, 0.05 / 5))
    assert power(10.0, 2, 4, 0.05) > 0.99
    assert trials_needed(10.0, 2, 0.05 / 5) == 10          # 5 per level: 126 arrangements, p >= 0.0079
