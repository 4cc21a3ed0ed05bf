"""The report as people and programs read it: the terminal table, report.md, a self-contained report.html
(figures inline, for MLflow's artifact viewer) and report.json. Scores are in points (x100) wherever the
objective is a score in [0, 1].

report.md and report.html are two renderings of one list of blocks (`blocks`), so they say the same.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from crosspt.search.params import INACTIVE
from crosspt.search.report.build import MIN_TRIALS, Report, metric_name
from crosspt.search.report.stats import ALPHA, N_PERMUTATIONS, FactorResult, Verdict

CALIBRATION = "benchmarks/report_calibration.md"


# ---- numbers ---------------------------------------------------------------------------------------
def _cell(v, digits: int = 1) -> str:
    """A table cell: "-" for a missing number, `digits` decimals for a float, anything else as it prints."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else (
        f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _tenths(v: float, sign: bool = False) -> str:
    """One decimal, never "-0.0"."""
    v = 0.0 if abs(v) < 0.05 else v
    return f"{v:+.1f}" if sign else f"{v:.1f}"


def _p_value(p: float | None) -> str:
    """A p-value, two significant digits below 0.01."""
    return "-" if p is None else (f"{p:.2g}" if p < 0.01 else f"{p:.2f}")


def _in_units(rep: Report, v: float | None) -> float | None:
    """A score in the report's units (`Report.scale`: percentage points for a 0-1 score); None if missing."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else rep.scale[0] * v


def _diff(rep: Report, r: FactorResult) -> tuple[float, float, float]:
    """best - worst and its interval in report units, oriented so that "better" is positive."""
    sign = 1 if rep.mode == "max" else -1
    est, lo, hi = (sign * _in_units(rep, v) for v in (r.estimate, r.ci_low, r.ci_high))
    return (est, lo, hi) if sign > 0 else (est, hi, lo)


def _unit(rep: Report) -> str:
    return f" {rep.scale[1]}" if rep.scale[1] else ""


def verdict_text(rep: Report, r: FactorResult, n_tested: int) -> str:
    """One factor's verdict in words, the same in every rendering."""
    if r.verdict == Verdict.INACTIVE:
        return "never active in a finished trial"
    if r.verdict == Verdict.NOT_VARIED:
        return f"not varied ({r.note}, {r.n} trials)"
    counts = ", ".join(f"{k}: {v}" for k, v in r.n_per_level.items())
    if r.verdict == Verdict.TOO_FEW:
        return f"too few trials to tell (trials per level: {counts}; {r.note})" + _power_text(rep, r)
    ps = f"p {_p_value(r.p)}" + (f", {_p_value(r.p_adjusted)} after Bonferroni over {n_tested} factors"
                                  if n_tested > 1 else "")
    trials = f"{r.n} trials" + (f"; {r.note}" if r.note else "")
    if r.estimate is None or r.ci_low is None:
        words = {Verdict.EFFECT: "effect", Verdict.HINT: "hint of an effect"}.get(r.verdict, "no detectable effect")
        return f"{words} ({ps}; {trials})"
    est, lo, hi = _diff(rep, r)
    if r.verdict in (Verdict.EFFECT, Verdict.HINT):
        better = "beats" if rep.mode == "max" else "is lower than"
        hint = "hint, no claim: " if r.verdict == Verdict.HINT else ""
        return (f"{hint}{r.best} {better} {r.worst} by {_tenths(est)}{_unit(rep)} "
                f"[95% CI {_tenths(lo)}, {_tenths(hi)}] ({ps}; {trials})")
    return (f"no detectable effect ({r.best} vs {r.worst}: {_tenths(est, True)}{_unit(rep)} "
            f"[{_tenths(lo)}, {_tenths(hi)}]; {ps}; {trials})" + _power_text(rep, r))


def _power_text(rep: Report, r: FactorResult) -> str:
    """What this search could have found (`power.add_power`), for a factor without a detected effect."""
    if r.mde is None:
        return ""
    if math.isinf(r.mde):
        out = (f"; at {r.n} trials no difference of any size is detectable (too few arrangements of the levels "
               "for a permutation p-value to reach the Bonferroni level, or beyond 15 residual sds)")
    else:
        out = (f"; 80% power only for a best − worst difference of {_tenths(_in_units(rep, r.mde))}{_unit(rep)} "
               f"or more at {r.n} trials")
    if r.trials_needed:
        out += f"; about {r.trials_needed} design trials would find the estimate"
    elif r.estimate is not None and r.estimate != 0:
        out += "; the estimate needs more design trials than is practical"
    return out


def _tested(results: list[FactorResult]) -> int:
    return sum(r.p is not None for r in results)


def state_line(rep: Report) -> str:
    c = rep.counts
    return (f"{sum(c.values())} trials: {c.get('FINISHED', 0)} finished, {c.get('PRUNED', 0)} pruned "
            f"(stopped early by ASHA), {c.get('FAILED', 0)} failed, {c.get('RUNNING', 0)} running"
            + (" — the search is still running: report so far" if rep.running else ""))


def aliased_note(rep: Report) -> str:
    """A warning for each pair of factors the verdicts' trials cannot split (`Report.aliased`)."""
    if not rep.aliased:
        return ""
    pairs = "; ".join(f"`{a}` and `{b}`" for a, b in rep.aliased)
    return (f" **Confounded in these trials: {pairs}.** Each level of one always came with the same level of the "
            "other, so each one's line measures both, and which of them acts cannot be told. More design trials "
            "(`search.design`) or another `search.seed` splits them.")


def design_note(rep: Report) -> str:
    """Which trials the verdicts stand on, and what that lets the report claim."""
    tested = ("the held-out assessment score (`assess_score`), the validation objective beside it"
              if rep.tested == "assess" else f"the validation objective `{rep.metric}`"
              + (" (not every trial has an `assess_score`)" if rep.results or rep.hints else ""))
    if rep.family == "design":
        n = len(rep.main_rows)
        return (f"**Verdicts stand on the {n} design trials** (randomised, balanced levels, never pruned: which of "
                f"them are analysed does not depend on any score), tested on {tested}"
                + (f". {rep.family_note}" if rep.family_note else "") + ". "
                + ("The optimiser's trials appear below as hints only." if rep.hints else "")
                + aliased_note(rep))
    if rep.family == "randomised":
        return (f"Searcher `{rep.algorithm}`, no trial pruned: each trial's levels were drawn independently of "
                f"the scores, so the permutation tests below are exact; tested on {tested}." + aliased_note(rep))
    return (f"**No verdicts: {rep.family_note or 'too few design trials'}.** Every line below is a hint from trials "
            "the optimiser chose or that survived pruning, never a claim. For claims, give the search design "
            "trials (`search.design`, `crosspt report --plan` sizes it).")


# ---- blocks (shared by markdown and html) -----------------------------------------------------------
def blocks(rep: Report) -> list[tuple]:
    """The report as ("h1" | "h2" | "h3" | "p" | "ul" | "table" | "fig" | "pre", ...) blocks. Text uses
    `code` and **bold** only."""
    unit = rep.scale[1] or "metric units"
    out: list[tuple] = [("h1", f"Design-factor report: {rep.title}"), ("p", state_line(rep) + "."),
                        ("p", f"Objective: {rep.mode} `{rep.metric}`, in {unit}."
                              + (f" A second analysis uses every trial at epoch {rep.rung_epoch + 1}."
                                 if rep.rung_results else ""))]
    if not rep.enough:
        return out + [("p", f"Fewer than {MIN_TRIALS} finished trials: no importances, effects or plots yet.")]
    pruning = bool(rep.counts.get("PRUNED"))          # prune rates are all 0 otherwise: no column
    out += [("p", design_note(rep))]
    if rep.results:
        n = _tested(rep.results)
        out += [("h2", "Verdicts"), ("ul", [f"`{r.factor}`: {verdict_text(rep, r, n)}" for r in rep.results]),
                ("h2", "Factors"), _factor_table(rep, rep.results, False, True),
                ("p", f"`effect` only when the adjusted p < {ALPHA}, which is exactly when the 95% interval of "
                      "best − worst excludes 0 (one construction: the permutation distribution of the studentized "
                      f"best − worst difference gives the p-value and the interval's critical value, at {ALPHA} "
                      f"divided by the factors tested, Bonferroni; {N_PERMUTATIONS} permutations, exact below "
                      "that), beyond the factors in *adjusted for*. best − worst: the difference corrected for "
                      "picking the two levels after the fact. Importance: the share of the variance the factor "
                      "explains; [noise]: the 95th percentile of that share with the factor's levels shuffled. "
                      "Power: the smallest best − worst difference this many design trials find 4 times in 5, "
                      "from the measured residual noise, and the design trials that would find the estimate "
                      f"(`crosspt report --plan` for a space before it runs). Calibration: `{CALIBRATION}`.")]
        if rep.factors and any(f.strata for f in rep.factors):
            out.append(("p", "A numeric factor's levels in the design are the strata its values were drawn in "
                             "(thirds of its range, on the log scale for a log-uniform factor)."))
    if rep.hints:
        m = _tested(rep.hints)
        out += [("h2", "Hints from every finished trial (no claims)"),
                ("p", "The optimiser chose these trials from earlier scores, and ASHA let them finish by their "
                      "early scores: a level can look better for the company it kept or for surviving. `hint` "
                      "marks what the same test would call an effect; read it as a place to look, and settle it "
                      "with design trials."),
                ("ul", [f"`{r.factor}`: {verdict_text(rep, r, m)}" for r in rep.hints]),
                _factor_table(rep, rep.hints, pruning, False)]
    out += [("fig", "importance"), ("fig", "effects"), ("h2", "Levels")]
    val = rep.tested == "assess"
    for r in rep.shown:
        if not r.levels:
            continue
        test = {lv.level: lv for lv in rep.test_levels.get(r.factor, [])}
        valid = {lv.level: lv for lv in rep.val_levels.get(r.factor, [])}
        pr = rep.prune_rates.get(r.factor, {}) if not rep.results else {}
        rows = [[lv.level, str(lv.n), *[f"{100 * pr[lv.level]:.0f}%" if lv.level in pr else "-"] * bool(pr),
                 _level(rep, lv), *[_level(rep, valid.get(lv.level))] * val, _level(rep, test.get(lv.level))]
                for lv in r.levels]
        note = f" (means at the average of {', '.join(r.adjusted_for)})" if r.adjusted_for else ""
        out += [("h3", r.factor + note), ("table", ["level", "trials", *["pruned"] * bool(pr),
                                                    f"{metric_name(rep)} [95% CI]",
                                                    *[f"{rep.metric} (validation) [95% CI]"] * val,
                                                    "test_score [95% CI]"], rows)]
    if rep.rung_results:
        m = _tested(rep.rung_results)
        out += [("h2", f"Every trial at epoch {rep.rung_epoch + 1} (pruned ones included)"),
                ("p", f"At epoch {rep.rung_epoch + 1} every finished and pruned trial has a score, so this comparison "
                      f"keeps them all; it measures early effects (its own family"
                      + ("; the optimiser chose most of these trials, so its lines are hints" if any(
                          r.verdict == Verdict.HINT or r.verdict == Verdict.NONE for r in rep.rung_results)
                         and rep.adaptive else "") + ")."),
                ("ul", [f"`{r.factor}`: {verdict_text(rep, r, m)}" for r in rep.rung_results])]
    out.append(("fig", "parallel coordinates"))
    if rep.interaction:
        x = rep.interaction
        s2 = rep.scale[0] ** 2
        out += [("h2", "Strongest pairwise interaction (descriptive)"),
                ("p", f"`{x.a}` x `{x.b}`: non-additive mean square {x.strength * s2:.2f} "
                      f"{rep.scale[1] + '²' if rep.scale[1] else ''}. Cell means, no test: a few trials per cell."),
                ("fig", "interaction")]
    if rep.best:
        b = rep.best
        out += [("h2", "Best configuration"),
                ("p", f"Trial `{b.trial_id}` (run `{b.run_id}`): {rep.metric} = {_cell(_in_units(rep, b.objective))}, "
                      f"test_score = {_cell(_in_units(rep, b.test_score))}, trainable params = {b.trainable_params}, "
                      f"wall time = {_cell(b.wall_s)} s. The best of many noisy trials scores above what its "
                      "configuration does on average: judge it by the level means above."),
                ("pre", json.dumps({k: v for k, v in b.params.items() if v != INACTIVE}, indent=1, default=str))]
        if b.scores:
            out.append(("table", ["score", unit], [[k, _cell(_in_units(rep, v))] for k, v in sorted(b.scores.items())]))
    if rep.pareto:
        out += [("h2", "Pareto front: score vs trainable params"),
                ("table", ["trial", "trainable params", f"{rep.metric} ({unit})"],
                 [[r.trial_id, str(r.trainable_params), _cell(_in_units(rep, r.objective))] for r in rep.pareto]),
                ("fig", "pareto front")]
    return out


def _factor_table(rep: Report, results: list[FactorResult], pruning: bool, power: bool) -> tuple:
    """The factors table: with prune rates (`pruning`, for hints) or power (`power`, for the main family)."""
    unit = rep.scale[1] or "metric units"
    head = ["factor", "verdict", f"best − worst ({unit}) [95% CI]", "p", "p (adjusted)", "importance [noise]",
            "trials per level", *["pruned per level"] * pruning, "adjusted for",
            *[f"80% power at ({unit})", "design trials for the estimate"] * power]
    rows = []
    for r in results:
        est, lo, hi = _diff(rep, r) if r.estimate is not None and r.ci_low is not None else (None, None, None)
        est = "-" if est is None else f"{_tenths(est, True)} [{_tenths(lo)}, {_tenths(hi)}]"
        imp = "-" if r.importance is None else f"{r.importance:.2f} [{r.noise:.2f}]"
        pr = rep.prune_rates.get(r.factor, {})
        mde = "-" if r.mde is None else ("∞" if math.isinf(r.mde) else _tenths(_in_units(rep, r.mde)))
        rows.append([f"`{r.factor}`", r.verdict.value, est, _p_value(r.p), _p_value(r.p_adjusted), imp,
                     ", ".join(f"{k}: {v}" for k, v in r.n_per_level.items()) or "-",
                     *[", ".join(f"{k}: {100 * v:.0f}%" for k, v in pr.items()) or "-"] * pruning,
                     ", ".join(r.adjusted_for) or "-",
                     *[mde, _cell(r.trials_needed)] * power])
    return ("table", head, rows)


def _level(rep: Report, lv) -> str:
    if lv is None:
        return "-"
    return f"{_cell(_in_units(rep, lv.mean))} [{_cell(_in_units(rep, lv.lo))}, {_cell(_in_units(rep, lv.hi))}]"


def to_markdown(rep: Report, figures: dict[str, str]) -> str:
    """report.md; `figures` maps a figure's name to its file name (those drawn)."""
    md = []
    for b in blocks(rep):
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            md += ["#" * int(kind[1]) + " " + b[1], ""]
        elif kind == "p":
            md += [b[1], ""]
        elif kind == "ul":
            md += [f"- {item}" for item in b[1]] + [""]
        elif kind == "table":
            md += ["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1]),
                   *["| " + " | ".join(row) + " |" for row in b[2]], ""]
        elif kind == "pre":
            md += ["```json", b[1], "```", ""]
        elif kind == "fig" and b[1] in figures:
            md += [f"![{b[1]}]({figures[b[1]]})", ""]
    return "\n".join(md)


_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*|\*([^*]+)\*")


def _inline(text: str) -> str:
    """`code`, **bold** and *italic* to html, everything else escaped."""
    out, last = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[last:m.start()]))
        code, bold, it = m.groups()
        out.append(f"<code>{html.escape(code)}</code>" if code else f"<b>{html.escape(bold)}</b>" if bold
                   else f"<i>{html.escape(it)}</i>")
        last = m.end()
    return "".join(out) + html.escape(text[last:])


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}code{background:#f3f3f3;padding:0 3px}
pre{background:#f7f7f7;padding:8px;font-size:12px}img{max-width:100%;display:block;margin:8px 0}
li{margin:3px 0}"""


def to_html(rep: Report, figures: dict[str, Path]) -> str:
    """A self-contained report.html: figures inline (base64 PNG), so it renders wherever the file goes (the
    MLflow UI's artifact viewer shows it as a page)."""
    body = []
    for b in blocks(rep):
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            body.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in b[1]) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b[2])
                        + "</table>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "fig" and b[1] in figures:
            data = base64.b64encode(Path(figures[b[1]]).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(b[1])}" src="data:image/png;base64,{data}">')
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(rep.title)} report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def format_table(rep: Report) -> str:
    """The compact terminal table: one line per factor, most important first, then the best trial."""
    lines = [f"report: {rep.title} — {state_line(rep)}"]
    if not rep.enough:
        return "\n".join(lines + [f"fewer than {MIN_TRIALS} finished trials: no effects to report"])
    plain = lambda t: t.replace("**", "").replace("`", "")  # noqa: E731
    lines.append(plain(design_note(rep)))
    for title, results in (("verdicts (design trials)", rep.results), ("hints (every finished trial, no claims)",
                                                                     rep.hints)):
        if not results:
            continue
        n = _tested(results)
        lines.append(f"{title}:")
        lines.append(f"{'factor':<32}{'importance':>11}{'noise':>7}  verdict")
        for r in results:
            imp = f"{r.importance:>11.2f}{r.noise:>7.2f}" if r.importance is not None else f"{'-':>11}{'-':>7}"
            lines.append(f"{r.factor:<32}{imp}  {verdict_text(rep, r, n)}")
    if rep.rung_results:
        m = _tested(rep.rung_results)
        lines.append(f"at epoch {rep.rung_epoch + 1}, every finished and pruned trial:")
        lines += [f"  {r.factor:<30}  {verdict_text(rep, r, m)}" for r in rep.rung_results]
    if rep.best:
        b = rep.best
        lines.append(f"best: trial {b.trial_id} {rep.metric}={_cell(_in_units(rep, b.objective))}{_unit(rep)} "
                     f"test_score={_cell(_in_units(rep, b.test_score))}{_unit(rep)} trainable={b.trainable_params}")
    return "\n".join(lines)


# ---- report.json -----------------------------------------------------------------------------------
def _factor_json(rep: Report, r: FactorResult, n_tested: int) -> dict[str, Any]:
    pts = lambda v: _in_units(rep, v)  # noqa: E731
    return {"factor": r.factor, "verdict": r.verdict.value, "text": verdict_text(rep, r, n_tested),
            "p": r.p, "p_adjusted": r.p_adjusted, "best": r.best or None, "worst": r.worst or None,
            "estimate": pts(r.estimate), "estimate_plugin": pts(r.raw_estimate),
            "ci_low": pts(r.ci_low), "ci_high": pts(r.ci_high), "importance": r.importance, "noise": r.noise,
            "n": r.n, "n_per_level": r.n_per_level, "prune_rate_per_level": rep.prune_rates.get(r.factor, {}),
            "adjusted_for": r.adjusted_for, "note": r.note or None, "alpha": r.alpha,
            "critical": r.critical, "resid_sd": pts(r.resid_sd), "mde_80": pts(r.mde) if r.mde is None or
            math.isfinite(r.mde) else "inf", "design_trials_for_estimate": r.trials_needed,
            "levels": [{"level": lv.level, "n": lv.n, "mean": pts(lv.mean), "ci_low": pts(lv.lo),
                        "ci_high": pts(lv.hi)} for lv in r.levels]}


def to_json(rep: Report) -> dict[str, Any]:
    """report.json: every number of the report, scores in `unit` (points for scores in [0, 1])."""
    n, m = _tested(rep.results), _tested(rep.rung_results)
    b = rep.best
    return {
        "title": rep.title, "metric": rep.metric, "mode": rep.mode, "unit": rep.scale[1] or None,
        "scale": rep.scale[0], "counts": rep.counts, "running": rep.running,
        "searcher": {"algorithm": rep.algorithm, "adaptive": rep.adaptive},
        "family": {"kind": rep.family or None, "trials": [r.trial_id for r in rep.main_rows] if rep.family else [],
                   "note": rep.family_note or None, "tested": metric_name(rep),
                   "confounded": [list(pair) for pair in rep.aliased]},
        "method": {"test": "permutation, studentized best-vs-worst difference", "n_permutations": N_PERMUTATIONS,
                   "correction": "bonferroni", "alpha": ALPHA,
                   "interval": "best - worst -+ permutation critical value x se: excludes 0 exactly when effect",
                   "power": "80%, normal errors with the measured residual sd (power.py)",
                   "importance": "variance share", "calibration": CALIBRATION},
        "factors": [_factor_json(rep, r, n) for r in rep.results],
        "hints": [_factor_json(rep, r, _tested(rep.hints)) for r in rep.hints],
        "rung": None if not rep.rung_results else {
            "epoch": rep.rung_epoch + 1, "factors": [_factor_json(rep, r, m) for r in rep.rung_results]},
        "best": None if b is None else {
            "trial_id": b.trial_id, "run_id": b.run_id, "objective": _in_units(rep, b.objective),
            "test_score": _in_units(rep, b.test_score), "trainable_params": b.trainable_params,
            "params": {k: v for k, v in b.params.items() if v != INACTIVE}},
        "pareto": [{"trial_id": r.trial_id, "trainable_params": r.trainable_params,
                    "objective": _in_units(rep, r.objective)} for r in rep.pareto],
    }


def tables(rep: Report) -> dict[str, dict[str, list]]:
    """The report's numbers as MLflow tables (`log_table` column dicts): one row per factor, per level,
    per Pareto trial."""
    facs = [_factor_json(rep, r, _tested(rep.shown)) for r in rep.shown]
    cols = ("factor", "verdict", "p", "p_adjusted", "best", "worst", "estimate", "ci_low", "ci_high",
            "importance", "noise", "n")
    factors = {c: [f[c] for f in facs] for c in cols}
    levels = {c: [] for c in ("factor", "level", "n", "mean", "ci_low", "ci_high", "prune_rate")}
    for f in facs:
        for lv in f["levels"]:
            for c, v in (("factor", f["factor"]), ("level", lv["level"]), ("n", lv["n"]), ("mean", lv["mean"]),
                         ("ci_low", lv["ci_low"]), ("ci_high", lv["ci_high"]),
                         ("prune_rate", f["prune_rate_per_level"].get(lv["level"]))):
                levels[c].append(v)
    pareto = {"trial_id": [r.trial_id for r in rep.pareto], "trainable_params": [r.trainable_params for r in rep.pareto],
              "objective": [_in_units(rep, r.objective) for r in rep.pareto]}
    return {"factors.json": factors, "levels.json": levels, "pareto.json": pareto}


def write_report(rep: Report, out: str | Path) -> Path:
    """report.md, report.html, report.json and the PNGs under `out`; returns report.md's path."""
    from crosspt.search.report.plots import draw_figures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(rep, out)
    md = out / "report.md"
    md.write_text(to_markdown(rep, {k: p.name for k, p in figures.items()}))
    (out / "report.html").write_text(to_html(rep, figures))
    (out / "report.json").write_text(json.dumps(to_json(rep), indent=1, default=str) + "\n")
    return md
