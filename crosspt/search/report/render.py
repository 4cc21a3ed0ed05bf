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
from crosspt.search.report.build import MIN_TRIALS, Report
from crosspt.search.report.stats import ALPHA, N_PERMUTATIONS, FactorResult, Verdict

CALIBRATION = "benchmarks/report_calibration.md"


# ---- numbers ---------------------------------------------------------------------------------------
def _num(v, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else (
        f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _f(v: float, sign: bool = False) -> str:
    """One decimal, never "-0.0"."""
    v = 0.0 if abs(v) < 0.05 else v
    return f"{v:+.1f}" if sign else f"{v:.1f}"


def _p(p: float | None) -> str:
    return "-" if p is None else (f"{p:.2g}" if p < 0.01 else f"{p:.2f}")


def _pts(rep: Report, v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else rep.scale[0] * v


def _diff(rep: Report, r: FactorResult) -> tuple[float, float, float]:
    """best - worst and its interval in report units, oriented so that "better" is positive."""
    sign = 1 if rep.mode == "max" else -1
    est, lo, hi = (sign * _pts(rep, v) for v in (r.estimate, r.ci_low, r.ci_high))
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
        return f"too few trials to tell (trials per level: {counts}; {r.note})"
    ps = f"p {_p(r.p)}" + (f", {_p(r.p_adjusted)} after Holm over {n_tested} factors" if n_tested > 1 else "")
    trials = f"{r.n} trials" + (f"; {r.note}" if r.note else "")
    if r.estimate is None:
        return f"{'effect' if r.verdict == Verdict.EFFECT else 'no detectable effect'} ({ps}; {trials})"
    est, lo, hi = _diff(rep, r)
    if r.verdict == Verdict.EFFECT:
        better = "beats" if rep.mode == "max" else "is lower than"
        return (f"{r.best} {better} {r.worst} by {_f(est)}{_unit(rep)} [95% CI {_f(lo)}, {_f(hi)}] "
                f"({ps}; {trials})")
    return (f"no detectable effect ({r.best} vs {r.worst}: {_f(est, True)}{_unit(rep)} [{_f(lo)}, {_f(hi)}]; "
            f"{ps}; {trials})")


def _tested(results: list[FactorResult]) -> int:
    return sum(r.p is not None for r in results)


def state_line(rep: Report) -> str:
    c = rep.counts
    return (f"{sum(c.values())} trials: {c.get('FINISHED', 0)} finished, {c.get('PRUNED', 0)} pruned "
            f"(stopped early by ASHA), {c.get('FAILED', 0)} failed, {c.get('RUNNING', 0)} running"
            + (" — the search is still running: report so far" if rep.running else ""))


def design_note(rep: Report) -> str:
    """What the searcher's design lets the report claim."""
    if rep.algorithm is None:
        return "Searcher unknown: the tests assume each trial's levels were drawn at random (`random` or `qmc`)."
    if rep.adaptive:
        return (f"**The searcher was adaptive** (`{rep.algorithm}`, TPE): it chose later trials by earlier scores, "
                "so levels were not randomly assigned and a level can look better for the company it kept. The "
                "tests below assume random assignment; read them as hints. For attribution, search with "
                "`search.algorithm: random` or `qmc`.")
    return (f"Searcher `{rep.algorithm}`: each trial's levels were drawn independently of the scores, so the "
            "permutation tests below are exact.")


# ---- blocks (shared by markdown and html) -----------------------------------------------------------
def blocks(rep: Report) -> list[tuple]:
    """The report as ("h1" | "h2" | "h3" | "p" | "ul" | "table" | "fig" | "pre", ...) blocks. Text uses
    `code` and **bold** only."""
    unit = rep.scale[1] or "metric units"
    out: list[tuple] = [("h1", f"Design-factor report: {rep.title}"), ("p", state_line(rep) + "."),
                        ("p", f"Objective: {rep.mode} `{rep.metric}`, in {unit}. Effects and importances use the "
                              "finished trials" + (f"; a second analysis uses every trial at epoch {rep.rung_epoch + 1}"
                                                   if rep.rung_results else "") + ".")]
    if not rep.enough:
        return out + [("p", f"Fewer than {MIN_TRIALS} finished trials: no importances, effects or plots yet.")]
    n = _tested(rep.results)
    out += [("p", design_note(rep)),
            ("h2", "Verdicts"), ("ul", [f"`{r.factor}`: {verdict_text(rep, r, n)}" for r in rep.results])]
    pruning = bool(rep.counts.get("PRUNED"))          # prune rates are all 0 otherwise: no column
    head = ["factor", "verdict", f"best − worst ({unit}) [95% CI]", "p", "p (Holm)", "importance [noise]",
            "trials per level", *["pruned per level"] * pruning, "adjusted for"]
    rows = []
    for r in rep.results:
        est, lo, hi = _diff(rep, r) if r.estimate is not None else (None, None, None)
        est = "-" if est is None else f"{_f(est, True)} [{_f(lo)}, {_f(hi)}]"
        imp = "-" if r.importance is None else f"{r.importance:.2f} [{r.noise:.2f}]"
        pr = rep.prune_rates.get(r.factor, {})
        rows.append([f"`{r.factor}`", r.verdict.value, est, _p(r.p), _p(r.p_adjusted), imp,
                     ", ".join(f"{k}: {v}" for k, v in r.n_per_level.items()) or "-",
                     *[", ".join(f"{k}: {100 * v:.0f}%" for k, v in pr.items()) or "-"] * pruning,
                     ", ".join(r.adjusted_for) or "-"])
    out += [("h2", "Factors"), ("table", head, rows),
            ("p", f"`effect` only when the Holm-adjusted p < {ALPHA}. p: permutation test of the factor's levels "
                  f"({N_PERMUTATIONS} permutations, exact below that), beyond the factors in *adjusted for*. "
                  "best − worst: the two levels with the best and worst mean, the difference corrected for "
                  "picking them after the fact, with Tukey's simultaneous 95% interval. Importance: the share of "
                  "the objective's variance the factor explains; [noise]: the 95th percentile of that share with "
                  "the factor's levels shuffled: below it, a factor looks like noise. "
                  + ("Pruned per level: the share of each level's trials ASHA stopped (a level pruned more has only "
                     "its survivors below). " if pruning else "")
                  + f"False-effect rate, coverage and power of these numbers: `{CALIBRATION}`."),
            ("fig", "importance"), ("fig", "effects")]
    out.append(("h2", "Levels"))
    for r in rep.results:
        if not r.levels:
            continue
        test = {lv.level: lv for lv in rep.test_levels.get(r.factor, [])}
        pr = rep.prune_rates.get(r.factor, {})
        rows = [[lv.level, str(lv.n), *[f"{100 * pr[lv.level]:.0f}%" if lv.level in pr else "-"] * pruning,
                 _level(rep, lv), _level(rep, test.get(lv.level))] for lv in r.levels]
        note = f" (means at the average of {', '.join(r.adjusted_for)})" if r.adjusted_for else ""
        out += [("h3", r.factor + note), ("table", ["level", "trials", *["pruned"] * pruning,
                                                    f"{rep.metric} [95% CI]", "test_score [95% CI]"], rows)]
    if rep.rung_results:
        m = _tested(rep.rung_results)
        out += [("h2", f"Every trial at epoch {rep.rung_epoch + 1} (pruned ones included)"),
                ("p", f"Finished trials are the survivors of ASHA's rungs. At epoch {rep.rung_epoch + 1} every "
                      f"finished and pruned trial has a score, so this comparison keeps them all; it measures "
                      f"early effects (its own Holm family)."),
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
                ("p", f"Trial `{b.trial_id}` (run `{b.run_id}`): {rep.metric} = {_num(_pts(rep, b.objective))}, "
                      f"test_score = {_num(_pts(rep, b.test_score))}, trainable params = {b.trainable_params}, "
                      f"wall time = {_num(b.wall_s)} s. The best of many noisy trials scores above what its "
                      "configuration does on average: judge it by the level means above."),
                ("pre", json.dumps({k: v for k, v in b.params.items() if v != INACTIVE}, indent=1, default=str))]
        if b.scores:
            out.append(("table", ["score", unit], [[k, _num(_pts(rep, v))] for k, v in sorted(b.scores.items())]))
    if rep.pareto:
        out += [("h2", "Pareto front: score vs trainable params"),
                ("table", ["trial", "trainable params", f"{rep.metric} ({unit})"],
                 [[r.trial_id, str(r.trainable_params), _num(_pts(rep, r.objective))] for r in rep.pareto]),
                ("fig", "pareto front")]
    return out


def _level(rep: Report, lv) -> str:
    if lv is None:
        return "-"
    return f"{_num(_pts(rep, lv.mean))} [{_num(_pts(rep, lv.lo))}, {_num(_pts(rep, lv.hi))}]"


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
    if rep.adaptive:
        lines.append(f"searcher {rep.algorithm} is adaptive (TPE): tests assume random assignment, read as hints; "
                     "use search.algorithm random or qmc for attribution")
    n = _tested(rep.results)
    lines.append(f"{'factor':<32}{'importance':>11}{'noise':>7}  verdict")
    for r in rep.results:
        imp = f"{r.importance:>11.2f}{r.noise:>7.2f}" if r.importance is not None else f"{'-':>11}{'-':>7}"
        lines.append(f"{r.factor:<32}{imp}  {verdict_text(rep, r, n)}")
    if rep.rung_results:
        m = _tested(rep.rung_results)
        lines.append(f"at epoch {rep.rung_epoch + 1}, every finished and pruned trial:")
        lines += [f"  {r.factor:<30}  {verdict_text(rep, r, m)}" for r in rep.rung_results]
    if rep.best:
        b = rep.best
        lines.append(f"best: trial {b.trial_id} {rep.metric}={_num(_pts(rep, b.objective))}{_unit(rep)} "
                     f"test_score={_num(_pts(rep, b.test_score))}{_unit(rep)} trainable={b.trainable_params}")
    return "\n".join(lines)


# ---- report.json -----------------------------------------------------------------------------------
def _factor_json(rep: Report, r: FactorResult, n_tested: int) -> dict[str, Any]:
    pts = lambda v: _pts(rep, v)  # noqa: E731
    return {"factor": r.factor, "verdict": r.verdict.value, "text": verdict_text(rep, r, n_tested),
            "p": r.p, "p_adjusted": r.p_adjusted, "best": r.best or None, "worst": r.worst or None,
            "estimate": pts(r.estimate), "estimate_plugin": pts(r.raw_estimate),
            "ci_low": pts(r.ci_low), "ci_high": pts(r.ci_high), "importance": r.importance, "noise": r.noise,
            "n": r.n, "n_per_level": r.n_per_level, "prune_rate_per_level": rep.prune_rates.get(r.factor, {}),
            "adjusted_for": r.adjusted_for, "note": r.note or None,
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
        "method": {"test": "permutation", "n_permutations": N_PERMUTATIONS, "correction": "holm", "alpha": ALPHA,
                   "interval": "tukey simultaneous 95%, best vs worst", "importance": "variance share",
                   "calibration": CALIBRATION},
        "factors": [_factor_json(rep, r, n) for r in rep.results],
        "rung": None if not rep.rung_results else {
            "epoch": rep.rung_epoch + 1, "factors": [_factor_json(rep, r, m) for r in rep.rung_results]},
        "best": None if b is None else {
            "trial_id": b.trial_id, "run_id": b.run_id, "objective": _pts(rep, b.objective),
            "test_score": _pts(rep, b.test_score), "trainable_params": b.trainable_params,
            "params": {k: v for k, v in b.params.items() if v != INACTIVE}},
        "pareto": [{"trial_id": r.trial_id, "trainable_params": r.trainable_params, "objective": _pts(rep, r.objective)}
                   for r in rep.pareto],
    }


def tables(rep: Report) -> dict[str, dict[str, list]]:
    """The report's numbers as MLflow tables (`log_table` column dicts): one row per factor, per level,
    per Pareto trial."""
    facs = [_factor_json(rep, r, _tested(rep.results)) for r in rep.results]
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
              "objective": [_pts(rep, r.objective) for r in rep.pareto]}
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
