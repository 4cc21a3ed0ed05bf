"""What people read from the standard benchmark (benchmarks/standard.md): the tables, paired differences
with 95% confidence intervals, the transfer matrix and its heatmap, the untrained probe, the router's
weights, wall time per stage and a verdict per method. Everything here is computed from the run's JSON
(`--standard --render standard.json` rebuilds it); nothing is picked by hand."""
from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Sequence

from crosspt.bench.standard import LABELS, MULTI, SINGLE, Arm

Cells = dict[tuple, dict[int, float]]      # (arm, task, k) -> {seed: test score}


def t_quantile(n: int) -> float:
    """The two-sided 95% Student-t quantile for n paired values (n - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Mean of a - b over the seeds both have, its 95% CI (t, n - 1 dof) and a verdict word:
    'better' / 'worse' when the CI excludes 0, 'no difference shown' otherwise."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if len(d) < 2:
        return None
    mu, sd = statistics.fmean(d), statistics.stdev(d)
    half = t_quantile(len(d)) * sd / math.sqrt(len(d))
    lo, hi = mu - half, mu + half
    word = "better" if lo > 0 else "worse" if hi < 0 else "no difference shown"
    return {"mean": mu, "lo": lo, "hi": hi, "n": len(d), "verdict": word}


def cells_of(records: list[dict], variant: str | None = None) -> Cells:
    """Test scores per (arm, task, k) and seed; a multi-task record gives one cell per task (its
    per-task primary metric) and one for the joint mean under its own task name. Only the cells of
    `variant` (None: the default rules; `normalization_variant(rule)`: CrossPT under another router rule)."""
    from crosspt.tasks.metrics import primary_metric

    out: Cells = {}
    for r in records:
        if r.get("kind") != "cell" or r["method"] in (Arm.SOURCE, Arm.SPOT) or r.get("variant_name") != variant:
            continue
        out.setdefault((r["method"], r["task"], r["k"]), {})[r["seed"]] = r["test"]
        if len(r["tasks"]) > 1:
            for t in r["tasks"]:
                out.setdefault((r["method"], t, r["k"]), {})[r["seed"]] = r["test_metrics"][t][primary_metric(t)]
    return out


def average_cells(cells: Cells, arms: Sequence[str], tasks: Sequence[str], shots: Sequence[int]) -> Cells:
    """Per arm and k: per seed, the mean over the targets (only seeds that ran every target)."""
    out: Cells = {}
    for a in arms:
        for k in shots:
            per = [cells.get((a, t, k), {}) for t in tasks]
            seeds = set.intersection(*(set(p) for p in per)) if per else set()
            if seeds:
                out[(a, "avg", k)] = {s: statistics.fmean(p[s] for p in per) for s in seeds}
    return out


def _ms(v: dict[int, float] | None) -> str:
    if not v:
        return "–"
    vals = list(v.values())
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals) * 100:.1f} ± {sd * 100:.1f}"


def _d(p: dict | None) -> str:
    if not p:
        return "–"
    return f"{p['mean'] * 100:+.1f} [{p['lo'] * 100:+.1f}, {p['hi'] * 100:+.1f}]"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


# ---- sections ------------------------------------------------------------------------------------------
def _sources(summary: dict, zero: dict[str, float]) -> list[str]:
    sd = summary["standard"]
    rows = []
    for r in (r for r in summary["records"] if r["method"] == Arm.SOURCE):
        z = zero.get(r["task"])
        rows.append([r["task"], str(r["n_train"][r["task"]]), f"{r['val'] * 100:.1f}", f"{r['test'] * 100:.1f}",
                     f"{z * 100:.1f}" if z is not None else "–",
                     f"{(r['test'] - z) * 100:+.1f}" if z is not None else "–", f"{r['wall_s']:.0f}"])
    return [f"One bank, pre-trained once (seed {sd['source_seed']}): single-task PT of each pool task on "
            f"{sd['source_rows']} train rows (seeded draw), {sd['source_epochs']} epochs, batch {sd['source_batch']}, "
            f"lr {sd['source_lr']}, validation {sd['source_val']} rows; scored on its own task's test split. "
            f"Bank: `{summary['bank']['path']}` (the job also registers it in the MLflow Model Registry as `<experiment>-bank`, alias `standard`).", ""] + \
        _table(["source task", "train rows", "val", "own test", "zero-shot test", "Δ vs zero-shot", "wall s"], rows)


def _main_table(cells: Cells, avgs: Cells, tasks: list[str], shots: list[int], zero: dict[str, float],
                arms: Sequence[Arm] = SINGLE) -> list[str]:
    head = ["target", "k", "Zero-shot"] + [LABELS[a] for a in arms]
    rows = []
    for t in tasks + ["avg"]:
        for k in shots:
            src = avgs if t == "avg" else cells
            z = statistics.fmean(zero[x] for x in tasks) if t == "avg" else zero.get(t)
            rows.append([f"**{t}**" if t == "avg" else t, str(k), f"{z * 100:.1f}" if z is not None else "–"]
                        + [_ms(src.get((str(a), t, k))) for a in arms])
    return _table(head, rows)


def _arms_run(summary: dict) -> list[Arm]:
    """The single-task arms the run ran (`StandardSettings.arms`; every one before the option existed)."""
    chosen = summary["standard"].get("arms") or [str(a) for a in SINGLE]
    return [a for a in SINGLE if str(a) in chosen]


def rule_variants(summary: dict) -> list[str]:
    """The variant names of the router rules a run compared with its default (`normalizations`)."""
    from crosspt.bench.standard import normalization_variant

    return [normalization_variant(n) for n in summary["standard"].get("normalizations") or []]


def _rule_lines(summary: dict, cells: Cells, tasks: list[str], shots: list[int]) -> list[str]:
    """CrossPT cat and wavg under the default router rule and under each compared rule, against PT and
    against each other, paired over seeds (same banks, rows, lr grid and seeds)."""
    recs = summary["records"]
    default = summary.get("router_rule", "the default")
    out = []
    for name in rule_variants(summary):
        rule = name.split(" ", 1)[1]
        other = cells_of(recs, name)
        for arm in (a for a in (Arm.CAT, Arm.WAVG) if a in _arms_run(summary)):
            a, pt = str(arm), str(Arm.PT)
            head = ["target", "k", "PT", f"{LABELS[arm]} {default}", f"{LABELS[arm]} {rule}",
                    f"{default} − PT", f"{rule} − PT", f"{default} − {rule}"]
            rows = []
            for k in shots:
                avg_default, avg_other = average_cells(cells, [a, pt], tasks, [k]), average_cells(other, [a], tasks, [k])
                for t in tasks + ["avg"]:
                    here, there = (avg_default, avg_other) if t == "avg" else (cells, other)
                    new, old, ref = here.get((a, t, k), {}), there.get((a, t, k), {}), here.get((pt, t, k), {})
                    rows.append([f"**{t}**" if t == "avg" else t, str(k), _ms(ref), _ms(new), _ms(old)]
                                + [_d(paired(x, y)) + _verdict(paired(x, y)) for x, y in
                                   ((new, ref), (old, ref), (new, old))])
            out += [f"**{LABELS[arm]}**: the default rule `{default}` vs `{rule}` (test x100, mean ± sd over "
                    "seeds; differences paired over seeds [95% CI])", ""] + _table(head, rows) + [""]
        out += [f"Final evaluation weights under `{rule}`:", ""] + _router_lines(summary, name, best_epochs=False) + [""]
    return out


def _verdict(p: dict | None) -> str:
    return f" {p['verdict']}" if p and p["verdict"] != "no difference shown" else ""


COMPARISONS = ((Arm.CAT, Arm.PT), (Arm.WAVG, Arm.PT), (Arm.PT_LONG, Arm.PT), (Arm.CAT, Arm.PT_LONG),
               (Arm.WAVG, Arm.PT_LONG))


def _paired_table(cells: Cells, avgs: Cells, tasks: list[str], shots: list[int],
                  arms: Sequence[Arm] = SINGLE) -> tuple[list[str], dict]:
    comparisons = [(a, b) for a, b in COMPARISONS if a in arms and b in arms]
    head = ["target", "k"] + [f"{LABELS[a]} − {LABELS[b]}" for a, b in comparisons]
    rows, found = [], {}
    for t in tasks + ["avg"]:
        for k in shots:
            src = avgs if t == "avg" else cells
            row = [f"**{t}**" if t == "avg" else t, str(k)]
            for a, b in comparisons:
                p = paired(src.get((str(a), t, k), {}), src.get((str(b), t, k), {}))
                found[(str(a), str(b), t, k)] = p
                row.append(_d(p) + _verdict(p))
            rows.append(row)
    return _table(head, rows), found


def _multi_table(cells: Cells, tasks: list[str], shots: list[int]) -> list[str]:
    joint = "+".join(tasks)
    pairs = ((Arm.PT_MULTI, Arm.PT), (Arm.CAT_MULTI, Arm.CAT), (Arm.CAT_MULTI, Arm.PT_MULTI), (Arm.CAT_MULTI, Arm.PT))
    head = ["target", "k", "PT", "PT multi-task", "CrossPT cat", "CrossPT cat multi-task"] + \
        [f"{LABELS[a]} − {LABELS[b]}" for a, b in pairs]
    rows = []
    for k in shots:
        if not cells.get((str(Arm.PT_MULTI), joint, k)):
            continue
        avg = average_cells(cells, [str(a) for a in (Arm.PT, Arm.PT_MULTI, Arm.CAT, Arm.CAT_MULTI)], tasks, [k])
        for t in tasks + ["avg"]:
            src = avg if t == "avg" else cells
            v = {a: src.get((str(a), t, k), {}) for a in (Arm.PT, Arm.PT_MULTI, Arm.CAT, Arm.CAT_MULTI)}
            rows.append([f"**{t}**" if t == "avg" else t, str(k)] + [_ms(v[a]) for a in v]
                        + [_d(paired(v[a], v[b])) for a, b in pairs])
    return _table(head, rows)


def transfer_matrix(summary: dict) -> dict:
    """(target, source) -> paired difference of SPoT-style init from that source vs PT, same seeds."""
    recs = summary["records"]
    pt = {(r["task"], r["seed"]): r["test"] for r in recs
          if r["method"] == Arm.PT and r["k"] == summary["standard"]["lr_shots"]}
    by: dict[tuple, dict[int, float]] = {}
    raw: dict[tuple, dict[int, float]] = {}
    for r in recs:
        if r["method"] == Arm.SPOT:
            raw.setdefault((r["task"], r["source"]), {})[r["seed"]] = r["test"]
    for key, vals in raw.items():
        by[key] = {"delta": paired(vals, {s: pt[(key[0], s)] for s in vals if (key[0], s) in pt}),
                   "score": statistics.fmean(vals.values()), "n": len(vals)}
    return by


def _transfer_lines(summary: dict, tm: dict) -> list[str]:
    tasks, sources = summary["settings"]["tasks"], summary["bank"]["tasks"]
    head = ["target \\ source"] + sources
    rows = [[t] + [(_d(tm[(t, s)]["delta"]) if (t, s) in tm else "own task") for s in sources] for t in tasks]
    return _table(head, rows)


def heatmap(summary: dict, tm: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, sources = summary["settings"]["tasks"], summary["bank"]["tasks"]
    m = np.full((len(tasks), len(sources)), np.nan)
    for i, t in enumerate(tasks):
        for j, s in enumerate(sources):
            d = tm.get((t, s), {}).get("delta")
            if d:
                m[i, j] = d["mean"] * 100
    lim = max(1.0, float(np.nanmax(np.abs(m)))) if np.isfinite(m).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(sources), 1.2 + 0.7 * len(tasks)))
    im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
    for i in range(len(tasks)):
        for j in range(len(sources)):
            d = tm.get((tasks[i], sources[j]), {}).get("delta")
            ax.text(j, i, "own" if (tasks[i], sources[j]) not in tm else
                    (f"{d['mean'] * 100:+.1f}\n[{d['lo'] * 100:+.1f},{d['hi'] * 100:+.1f}]" if d else "n/a"),
                    ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(sources)), sources)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("source prompt (initialises PT)")
    ax.set_ylabel("target")
    k, n = summary["standard"]["lr_shots"], len(summary["standard"]["transfer_seeds"])
    ax.set_title(f"transfer: SPoT-style init − PT, test x100 (k={k}, {n} seeds, 95% CI)", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _probe_lines(summary: dict) -> list[str]:
    probes = [r for r in summary["records"] if r.get("kind") == "probe"]
    if not probes:
        return []
    out = []
    for r in probes:
        out += [f"**{r['task']}** (seed {r['seed']}, untrained, test x100):", ""]
        out += _table(["prompt", "test"], [[name, f"{v * 100:.1f}"] for name, v in r["scores"].items()]) + [""]
    return out


def _router_lines(summary: dict, variant: str | None = None, best_epochs: bool = True) -> list[str]:
    """Mean final evaluation weights of the task router per target and k (the cells of `variant`), and
    the best epochs."""
    recs = [r for r in summary["records"] if r.get("kind") == "cell" and r.get("variant_name") == variant]
    out = []
    for arm in (Arm.CAT, Arm.WAVG, Arm.CAT_MULTI):
        for r0 in sorted({(r["task"], r["k"]) for r in recs if r["method"] == arm}):
            rs = [r for r in recs if r["method"] == arm and (r["task"], r["k"]) == r0 and r.get("router_weights")]
            if not rs:
                continue
            names = rs[0]["bank_tasks"] + ["private"]
            tasks = rs[0]["tasks"]
            for ti, t in enumerate(tasks):
                w = [statistics.fmean(r["router_weights"][ti][j] for r in rs) for j in range(len(names))]
                out.append(f"- {LABELS[arm]}, {t}, k={r0[1]}: " + ", ".join(f"{n} {x:.2f}" for n, x in zip(names, w))
                           + f" (initial {1 / len(names):.2f} each; mean over {len(rs)} seeds)")
    if not best_epochs:
        return out
    best = Counter()
    for r in recs:
        if r["method"] in [str(a) for a in SINGLE + MULTI]:
            best[(r["method"], "≤0" if r["best_epoch"] <= 0 else ">0")] += 1
    out += ["", "Best epoch of the selected run (−1 = the untrained start scored best on validation, "
                "0 = after one epoch):", ""]
    for a in SINGLE + MULTI:
        lo, hi = best[(str(a), "≤0")], best[(str(a), ">0")]
        if lo + hi:
            out.append(f"- {LABELS[a]}: best epoch ≤ 0 in {lo} of {lo + hi} cells")
    return out


def _trace_mean(rows: list[dict]) -> tuple[list[str], list[list[float]], list[str]]:
    """Per trace position: the mean weight of each candidate over the rows (one target's seeds); the
    trace positions are epochs -1 (start), 0, 1, ... and the restored best state last."""
    names = rows[0]["bank_tasks"] + ["private"]
    n = min(len(r["router_trace"]) for r in rows)
    means = [[statistics.fmean(r["router_trace"][i]["weights"][0][j] for r in rows) for j in range(len(names))]
             for i in range(n)]
    labels = [("best" if e.get("restored_best") else str(e["epoch"])) for e in rows[0]["router_trace"][:n]]
    return labels, means, names


def _trace_lines(summary: dict) -> list[str]:
    tr = summary.get("router_trace") or []
    if not tr:
        return []
    out = [f"Re-run of CrossPT cat's k={summary['standard']['lr_shots']} cells (seeds "
           f"{sorted({r['seed'] for r in tr})}, each at the lr it picked) recording the router's evaluation "
           f"weights after every epoch; {sum(r['reproduced'] for r in tr)} of {len(tr)} re-runs reproduced the "
           "original cell's validation and test scores exactly. Mean weight over seeds per epoch "
           "(-1 = start; an early-stopped seed shortens the rows to the shortest; 'best' = the restored best "
           "state the test split scored):", "", "![router weights over training](standard_router.png)", ""]
    for t in dict.fromkeys(r["task"] for r in tr):
        labels, means, names = _trace_mean([r for r in tr if r["task"] == t])
        out += [f"**{t}**", ""] + _table(["epoch"] + names, [[lab] + [f"{w:.3f}" for w in row]
                                                            for lab, row in zip(labels, means)]) + [""]
    return out


def router_plot(summary: dict, path: Path) -> Path | None:
    tr = summary.get("router_trace") or []
    if not tr:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r["task"] for r in tr))
    fig, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets), 2.8), squeeze=False)
    for ax, t in zip(axes[0], targets):
        labels, means, names = _trace_mean([r for r in tr if r["task"] == t])
        for j, name in enumerate(names):
            ax.plot(range(len(labels)), [row[j] for row in means], marker="o", ms=3, label=name,
                    lw=2 if name == "private" else 1)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"{t}: CrossPT cat router weights", fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ablation_lines(summary: dict) -> list[str]:
    """Each ablation vs the run's own cell (same seeds and lr): per target and the average over targets."""
    ab = summary.get("ablations") or []
    if not ab:
        return []
    seeds = sorted({r["seed"] for r in ab})
    k = summary["standard"]["lr_shots"]
    out = [f"Re-runs of the k={k} cells (seeds {seeds}, each at the lr the cell picked on validation), one "
           "change at a time; ablated − original test x100 [95% CI over seeds]:", ""]
    targets = list(dict.fromkeys(r["task"] for r in ab))
    rows = []
    for (name, arm) in dict.fromkeys((r["variant_name"], r["method"]) for r in ab):
        rs = [r for r in ab if (r["variant_name"], r["method"]) == (name, arm)]
        cells = []
        for t in targets + ["avg"]:
            sel = [r for r in rs if t in ("avg", r["task"])]
            new = {sd: statistics.fmean(r["test"] for r in sel if r["seed"] == sd) for sd in seeds}
            old = {sd: statistics.fmean(r["original_test"] for r in sel if r["seed"] == sd) for sd in seeds}
            cells.append(f"{statistics.fmean(new.values()) * 100:.1f} vs {statistics.fmean(old.values()) * 100:.1f}: "
                         + _d(paired(new, old)))
        rows.append([name, LABELS[Arm(arm)]] + cells)
    return out + _table(["change", "method"] + targets + ["avg"], rows) + [""]


def _one_sample(values: list[float]) -> str:
    """Mean [95% t-interval] x100 of values that are differences already (one per seed)."""
    if len(values) < 2:
        return "–"
    mu, sd = statistics.fmean(values), statistics.stdev(values)
    half = t_quantile(len(values)) * sd / math.sqrt(len(values))
    return f"{mu * 100:+.1f} [{(mu - half) * 100:+.1f}, {(mu + half) * 100:+.1f}]"


def _trace_end(r: dict, kept: bool = False) -> list[float]:
    """A cell's router weights `[n_cand]` (its one task) at its last epoch report before the end (the last
    epoch's report comes after validation's pick is restored), or (`kept`) in the state validation kept (the
    trace's `restored_best` entry)."""
    return [e for e in r["router_trace"] if bool(e.get("restored_best")) == kept][-1]["weights"][0]


def _planted_lines(summary: dict) -> list[str]:
    """The planted-source probe (`standard_run.planted`): the router's weight on the target's own source over
    training, and the test score against that source's own score (its pre-training run's test)."""
    pl = summary.get("planted") or []
    if not pl:
        return []
    own_score = {r["task"]: r["test"] for r in summary["records"] if r["method"] == Arm.SOURCE}
    r0 = pl[0]
    out = [f"Each target whose own task is in the pool composes the whole bank {r0['bank_tasks']} (its own "
           "pre-trained prompt among the others), with no private prompt: only the router can find its own "
           f"prompt. k={summary['standard']['lr_shots']}, router lr {r0['router_lr']}, {r0['epochs']} epochs "
           f"without early stopping, prompt lr {r0['lr']} (only the scoring heads train besides the router); "
           "validation picks the kept epoch as in every cell. Own-prompt score = the source's own test in the "
           f"Sources table. Seeds {sorted({r['seed'] for r in pl})}; uniform weight {1 / len(r0['bank_tasks']):.2f}. "
           "Weights and scores x100.", ""]
    for t in dict.fromkeys(r["task"] for r in pl):
        rs = [r for r in pl if r["task"] == t]
        ref = own_score.get(t)
        groups = list(dict.fromkeys((r["method"], r["rule"]) for r in rs))
        of = {grp: {r["seed"]: r for r in rs if (r["method"], r["rule"]) == grp} for grp in groups}
        rows = []
        for (arm, rule), g in of.items():
            top = sum(1 for r in g.values() if max(range(len(r["bank_tasks"])), key=_trace_end(r).__getitem__) == r["own"])
            tests = {sd: r["test"] for sd, r in g.items()}
            rows.append([LABELS[Arm(arm)], rule, _ms({sd: _trace_end(r)[r["own"]] for sd, r in g.items()}),
                         _ms({sd: _trace_end(r, kept=True)[r["own"]] for sd, r in g.items()}),
                         f"{top} of {len(g)}", _ms(tests),
                         _one_sample([v - ref for v in tests.values()]) if ref is not None else "–"])
        out += [f"**{t}** (own-prompt score {ref * 100:.1f})" if ref is not None else f"**{t}**", ""]
        last = [e["epoch"] for e in rs[0]["router_trace"] if not e.get("restored_best")][-1]
        out += _table(["method", "rule", f"own weight after epoch {last}", "own weight, kept epoch",
                       f"own the top candidate after epoch {last}", "test", "test − own-prompt score [95% CI]"], rows) + [""]
        n = min(len(r["router_trace"]) for r in rs)
        trows = []
        for i in range(n):
            e = rs[0]["router_trace"][i]
            trows.append(["kept" if e.get("restored_best") else str(e["epoch"])]
                         + [f"{statistics.fmean(r['router_trace'][i]['weights'][0][r['own']] for r in g.values()):.3f}"
                            for g in of.values()])
        out += ["Weight on the own source per epoch (mean over seeds; −1 = start, kept = the state validation kept):", ""]
        out += _table(["epoch"] + [f"{LABELS[Arm(a)]} {rule}" for a, rule in groups], trows) + [""]
        rules = list(dict.fromkeys(r["rule"] for r in rs))
        for arm in dict.fromkeys(r["method"] for r in rs):
            if len(rules) != 2:
                break
            a, b = of.get((arm, rules[0]), {}), of.get((arm, rules[1]), {})
            seeds = sorted(set(a) & set(b))
            out.append(f"- {LABELS[Arm(arm)]}, {rules[0]} − {rules[1]}, paired over seeds: own weight after epoch {last} "
                       + _one_sample([_trace_end(a[x])[a[x]["own"]] - _trace_end(b[x])[b[x]["own"]] for x in seeds])
                       + ", test " + _d(paired({x: a[x]["test"] for x in seeds}, {x: b[x]["test"] for x in seeds})))
        out.append("")
    return out


def _lr_lines(summary: dict) -> list[str]:
    picks: dict[str, Counter] = {}
    k0 = summary["standard"]["lr_shots"]
    for r in summary["records"]:
        if r.get("kind") == "cell" and r["k"] == k0 and len(r.get("trials", [])) > 1:
            picks.setdefault((r["method"], r.get("variant_name")), Counter())[r["lr"]] += 1
    return [f"- {LABELS[Arm(m)]}{f' ({v})' if v else ''}: " + ", ".join(f"lr {lr:g}: {n}" for lr, n in sorted(c.items()))
            for (m, v), c in picks.items()]


def verdicts(found: dict, shots: list[int]) -> list[str]:
    out = []
    for a, b in COMPARISONS:
        for k in shots:
            p = found.get((str(a), str(b), "avg", k))
            if not p:
                continue
            word = {"better": "beats", "worse": "loses to", "no difference shown": "cannot be told apart from"}
            per_task = [(t, q["verdict"]) for (a2, b2, t, k2), q in found.items()
                        if (a2, b2, k2) == (str(a), str(b), k) and t != "avg" and q]
            wins = [t for t, v in per_task if v == "better"]
            losses = [t for t, v in per_task if v == "worse"]
            out.append(f"- k={k}: **{LABELS[a]} {word[p['verdict']]} {LABELS[b]}** on the average "
                       f"({_d(p)} points, n={p['n']} seeds); per target: better on {wins or 'none'}, "
                       f"worse on {losses or 'none'}, the rest not told apart")
    return out


def render(summary: dict, analysis: str | None = None) -> tuple[str, dict]:
    s, sd = summary["settings"], summary["standard"]
    tasks, shots = list(s["tasks"]), list(s["shots"])
    recs = summary["records"]
    zero = {r["task"]: r["test"] for r in recs if r["method"] == Arm.ZERO_SHOT}
    cells = cells_of(recs)
    avgs = average_cells(cells, [str(a) for a in SINGLE], tasks, shots)
    ptab, found = _paired_table(cells, avgs, tasks, shots, _arms_run(summary))
    tm = transfer_matrix(summary)
    walls = summary["stage_wall_s"]
    n_cells = Counter(r.get("kind") for r in recs)
    n_trained = sum(len(r.get("trials", [])) for r in recs if r.get("kind") == "cell")
    lines = [f"# Standard benchmark `{summary.get('name', 'standard')}`", "",
             f"Wall **{summary['wall_s'] / 60:.1f} min** with `--parallel {summary['parallel']}` "
             f"(stages: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in walls.items()) + "); "
             f"{n_cells['cell']} cells ({n_trained} training runs), {n_cells['probe']} probes, "
             f"{n_cells['zero_shot']} zero-shot scores."
             + (f" Stages {summary['reused_stages']} and {sum(1 for r in recs if r.get('reused'))} single-lr cells "
                "were taken from an earlier run of the same settings (`--reuse`); their walls are that run's."
                if summary.get("reused_stages") else ""), "",
             f"Backbone `{s['backbone']}` (frozen); targets {tasks}; source pool {summary['bank']['tasks']} "
             f"(each target's bank leaves its own task out: {summary['banks']}; multi-task bank: "
             f"{summary['multi_bank']}); k = {shots} per class (STS-B: 2k rows), seeds {s['seeds']}; test = official "
             f"dev split capped at {s['max_test']} rows (the same seeded rows for every method, seed and k).", "",
             "## Verdict", ""] + verdicts(found, shots) + [""]
    if analysis:
        lines += ["## Diagnosis", "", analysis.strip(), ""]
    lines += ["## Sources", ""] + _sources(summary, zero) + [""]
    lines += ["## Single-task: test score x100, mean ± std over seeds", ""] + \
        _main_table(cells, avgs, tasks, shots, zero, _arms_run(summary)) + [""]
    lines += ["## Paired differences (test x100), mean over seeds [95% CI, t with n−1 dof]", "",
              "A verdict word follows a difference whose CI excludes 0. avg: per seed the mean over the "
              "targets, then paired over seeds.", ""] + ptab + [""]
    if any(r["method"] in [str(a) for a in MULTI] for r in recs):
        lines += ["## Multi-task regime (all targets trained jointly)", "",
              f"PT multi-task: one {s['prompt_len']}-token prompt shared by every target. CrossPT cat multi-task: "
              f"the sources no target owns ({summary['multi_bank']}) fine-tuned jointly (learn_sources), a private "
              "prompt and a router row per target. lr picked by mean validation over the targets.", ""] + \
        _multi_table(cells, tasks, shots) + [""]
    if rule_variants(summary):
        lines += ["## Router rules: the default and the compared ones", "",
                  "The same cells (banks, rows, seeds, lr grid picked on validation) under each router rule."
                  , ""] + _rule_lines(summary, cells, tasks, shots)
    png = "standard_transfer.png"
    if tm:
        lines += ["## Transfer matrix", "",
              f"Each source prompt initialises PT on each target (SPoT-style; k={sd['lr_shots']}, seeds "
              f"{sd['transfer_seeds']}, the lr PT picked on validation for that target and seed); test minus "
              f"PT's test on the same seeds, x100 [95% CI].", "", f"![transfer matrix]({png})", ""] + \
            _transfer_lines(summary, tm) + [""]
    if any(r.get("kind") == "probe" for r in recs):
        lines += ["## Before training: untrained prompts on each target", ""] + _probe_lines(summary)
    if summary.get("planted"):
        lines += ["## Planted source: can the router find the target's own prompt?", ""] + _planted_lines(summary)
    if summary.get("ablations"):
        lines += ["## Ablations: what the trained part costs", ""] + _ablation_lines(summary)
    lines += ["## Router weights and best epochs", ""] + _router_lines(summary) + [""] + _trace_lines(summary)
    lines += ["## Chosen learning rates (cells at k=" + str(sd["lr_shots"]) + ")", ""] + _lr_lines(summary) + [""]
    lines += ["## Protocol", "",
              f"- every run: {s['epochs']} epochs, batch {s['batch_size']}, early stopping patience {s['patience']} "
              f"on validation, max_length {s['max_length']}, torch threads {s['threads']}; prompt length "
              f"{s['prompt_len']} (PT, each source, private; PT long = the composed length of CrossPT cat for that "
              f"target); router lr {s['router_lr']}",
              f"- lr grid {s['lrs']} over each method's prompt lr, searched at k={sd['lr_shots']} per (method, target, "
              f"seed) on validation only; other k reuse that pick; the test split is scored once per cell, "
              f"after the pick",
              "- train/val: k-shot samples per class from the train split (val disjoint, k per class), the same "
              "rows for every method at a seed",
              "- paired differences: over the seeds both methods ran; 95% CI = mean ± t(0.975, n−1)·sd/√n"]
    return "\n".join(lines) + "\n", tm


def write_report(summary: dict, out: Path, name: str, analysis: str | None = None) -> dict[str, Path]:
    out = Path(out)
    text, tm = render(summary, analysis)
    md = out / f"{name}.md"
    md.write_text(text.replace("standard_transfer.png", f"{name}_transfer.png")
                  .replace("standard_router.png", f"{name}_router.png"))
    files = {"md": md}
    if tm:
        files["transfer"] = heatmap(summary, tm, out / f"{name}_transfer.png")
    router = router_plot(summary, out / f"{name}_router.png")
    if router:
        files["router"] = router
    return files


def log_standard_to_mlflow(summary: dict, files: dict[str, Path], *, tracking_uri: str | None,
                           experiment: str) -> dict:
    """A parent run with the settings, average scores and paired differences as metrics, the report and
    heatmap; the bank as its `bank/` artifact, registered as a source-bank model version."""
    from crosspt.bench.report import start_benchmark_run
    from crosspt.registry import run_log
    from crosspt.registry.models import BANK_DIR, BANK_FILE, register_bank

    c, uri, _, pid = start_benchmark_run(summary, tracking_uri=tracking_uri, experiment=experiment,
                                         kind="standard", default_name="standard")
    s = summary["settings"]
    cells = cells_of(summary["records"])
    avgs = average_cells(cells, [str(a) for a in SINGLE], s["tasks"], s["shots"])
    metrics = {f"avg_{a}_k{k}": statistics.fmean(v.values()) for (a, _, k), v in avgs.items()}
    for a, b in COMPARISONS:
        for k in s["shots"]:
            p = paired(avgs.get((str(a), "avg", k), {}), avgs.get((str(b), "avg", k), {}))
            if p:
                metrics[f"diff_{a}_vs_{b}_k{k}"] = p["mean"]
    metrics["wall_s"] = summary["wall_s"]
    run_log.log_metrics(c, pid, metrics)
    for p in files.values():
        c.log_artifact(pid, str(p))
    bank = Path(summary["bank"]["path"])
    if bank.exists():
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            shutil.copy(bank, Path(d) / BANK_FILE)
            c.log_artifacts(pid, d, BANK_DIR)
        register_bank(uri, pid, f"{experiment}-bank", alias="standard",
                      description=f"standard benchmark sources {summary['bank']['tasks']}")
    c.set_terminated(pid, "FINISHED")
    return {"tracking_uri": uri, "experiment": experiment, "run_id": pid}
