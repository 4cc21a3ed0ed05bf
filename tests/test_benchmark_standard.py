"""The standard benchmark (`jobs/benchmark_fewshot.py --standard`): its statistics, and its quick mode run
end to end on real GLUE rows with the offline MiniLM, a real local Ray (--parallel 2) and a real MLflow
sqlite store."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats as sps

from crosspt.bench import standard_report as SR
from crosspt.bench.standard import Arm

REPO = Path(__file__).resolve().parents[1]


# ---- statistics -----------------------------------------------------------------------------------------
def test_paired_difference_ci_is_the_t_interval_over_seeds():
    a = {0: 0.70, 1: 0.62, 2: 0.66, 3: 0.71, 4: 0.69}
    b = {0: 0.60, 1: 0.61, 2: 0.60, 3: 0.65, 4: 0.62, 9: 0.99}       # seed 9 has no partner: ignored
    p = SR.paired(a, b)
    d = [a[s] - b[s] for s in range(5)]
    res = sps.ttest_rel([a[s] for s in range(5)], [b[s] for s in range(5)])
    lo, hi = res.confidence_interval(0.95)
    assert p["n"] == 5 and math.isclose(p["mean"], statistics.fmean(d))
    assert math.isclose(p["lo"], lo, rel_tol=1e-9) and math.isclose(p["hi"], hi, rel_tol=1e-9)
    assert p["verdict"] == "better"
    assert SR.paired(b, a)["verdict"] == "worse"
    noisy = {0: 0.5, 1: 0.9, 2: 0.4}
    assert SR.paired(noisy, {0: 0.6, 1: 0.6, 2: 0.6})["verdict"] == "no difference shown"
    assert SR.paired({0: 0.5}, {0: 0.4}) is None                       # one seed: no interval


def test_multi_task_records_give_per_task_cells_and_averages_need_every_target():
    recs = [{"kind": "cell", "method": "pt_multi", "task": "rte+mrpc", "tasks": ["rte", "mrpc"], "k": 16,
             "seed": s, "test": 0.6 + s / 100,
             "test_metrics": {"rte": {"accuracy": 0.5 + s / 100}, "mrpc": {"combined": 0.7, "f1": 0.8}}}
            for s in (0, 1)]
    recs.append({"kind": "cell", "method": "pt", "task": "rte", "tasks": ["rte"], "k": 16, "seed": 2, "test": 0.9})
    cells = SR.cells_of(recs)
    assert cells[("pt_multi", "rte", 16)] == {0: 0.5, 1: 0.51}
    assert cells[("pt_multi", "mrpc", 16)] == {0: 0.7, 1: 0.7}
    assert cells[("pt_multi", "rte+mrpc", 16)] == {0: 0.6, 1: 0.61}
    avg = SR.average_cells(cells, ["pt_multi", "pt"], ["rte", "mrpc"], [16])
    assert avg[("pt_multi", "avg", 16)] == {0: 0.6, 1: statistics.fmean([0.51, 0.7])}
    assert ("pt", "avg", 16) not in avg          # pt ran rte only: no average


# ---- the quick mode, end to end -------------------------------------------------------------------------
def _env(data_dir) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "CROSSPT_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.slow
def test_standard_quick_mode_end_to_end(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "benchmark_fewshot.py"), "--standard", "--quick",
                        "--parallel", "2", "--out", str(out), "--tracking-uri", uri, "--experiment", "std-test"],
                       cwd=tmp_path, env=_env(data_dir), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ETA" in p.stdout and "stage 4/4 reuse" in p.stdout
    summary = json.loads((out / "standard_quick.json").read_text())
    recs = summary["records"]
    cells = [r for r in recs if r.get("kind") == "cell"]
    targets = summary["settings"]["tasks"]
    # leave-one-out: no single-task bank holds its target; the multi-task bank holds no target
    for t, names in summary["banks"].items():
        assert t not in names and names
    assert summary["multi_bank"] and not set(summary["multi_bank"]) & set(targets)
    for r in cells:
        assert not set(r["tasks"]) & set(r["bank_tasks"]), r["method"]
    # the lr is picked on validation only: the pick has the best validation score of its trials, and the
    # trials carry no test score at all (test is read once, after the pick)
    for r in cells:
        assert r["val"] == max(tr["val"] for tr in r["trials"])
        assert r["lr"] == next(tr["lr"] for tr in r["trials"] if tr["val"] == r["val"])
        assert all("test" not in tr for tr in r["trials"])
    # every single-task method of a (target, k, seed) saw the same training rows and test rows
    for key in {(r["task"], r["k"], r["seed"]) for r in cells if r["method"] == Arm.PT}:
        same = [r for r in cells if (r["task"], r["k"], r["seed"]) == key and len(r["tasks"]) == 1
                and r["method"] != Arm.SOURCE]
        assert len({json.dumps(r["sample_ids"]) for r in same}) == 1
        assert len({json.dumps(r["n_test"]) for r in same}) == 1
    # the other k reuses the lr picked at lr_shots; the transfer matrix uses PT's pick
    k0 = summary["standard"]["lr_shots"]
    pick = {(r["method"], r["task"], r["seed"]): r["lr"] for r in cells if r["k"] == k0 and len(r["trials"]) > 1}
    for r in cells:
        if r["method"] in ("pt", "pt_long", "crosspt_cat", "crosspt_wavg") and r["k"] != k0:
            assert r["trials"][0]["lr"] == pick[(r["method"], r["task"], r["seed"])]
        if r["method"] == Arm.SPOT:
            assert r["lr"] == pick[("pt", r["task"], r["seed"])] and r["source"] not in (r["task"],)
    # PT long has CrossPT cat's composed length on each target
    for t in targets:
        cat = next(r for r in cells if r["method"] == Arm.CAT and r["task"] == t)
        long = next(r for r in cells if r["method"] == Arm.PT_LONG and r["task"] == t)
        assert cat["prompt_tokens"] == long["prompt_tokens"] == (len(summary["banks"][t]) + 1) * 2
    md = (out / "standard_quick.md").read_text()
    for section in ("## Verdict", "## Paired differences", "## Transfer matrix", "## Multi-task regime",
                    "## Before training", "## Sources"):
        assert section in md
    assert (out / "standard_quick_transfer.png").stat().st_size > 1000
    # the bank is registered in the MLflow Model Registry
    from mlflow import MlflowClient

    mv = MlflowClient(uri).get_model_version_by_alias("std-test-bank", "standard")
    assert mv.run_id in p.stdout


@pytest.mark.slow
def test_standard_stages_run_on_a_seq2seq_backbone(data_dir, tiny_t5_path, tmp_path):
    """The --full mode's family (T5): every stage and the report, in-process on a tiny random T5."""
    from crosspt.bench.settings import BenchSettings
    from crosspt.bench.standard import StandardSettings
    from crosspt.bench.standard_run import run_standard

    b = BenchSettings(tasks=["rte"], source_tasks=["sst2", "mrpc"], shots=[2, 4], seeds=[0, 1], lrs=[0.3, 0.03],
                      epochs=1, patience=None, max_test=4, max_length=24, prompt_len=2, data_dir=str(data_dir),
                      backbone=str(tiny_t5_path), batch_size=4)
    st = StandardSettings(bench=b, source_rows=8, source_val=4, source_epochs=1, lr_shots=2, multi_shots=[2],
                          transfer_seeds=[0, 1])
    summary = run_standard(st, tmp_path / "art", log=lambda m: None)
    kinds = {(r.get("kind"), r["method"]) for r in summary["records"]}
    assert {("cell", a) for a in ("source", "pt", "pt_long", "crosspt_cat", "crosspt_wavg", "pt_multi",
                                  "crosspt_cat_multi", "spot")} <= kinds
    probe = next(r for r in summary["records"] if r.get("kind") == "probe")
    assert not any("before [CLS]" in name for name in probe["scores"])      # an encoder-only variant
    assert all(math.isfinite(v) for v in probe["scores"].values())
    files = SR.write_report(summary, tmp_path, "t5")
    assert "## Transfer matrix" in files["md"].read_text()


def test_sources_rescaled_to_the_vocabulary_norm_keep_their_directions():
    import torch

    from crosspt.bench.standard import at_vocabulary_norm

    emb = torch.randn(50, 6) * 0.7
    bank = torch.randn(3, 4, 6) * 40.0
    out = at_vocabulary_norm(bank, emb)
    assert torch.allclose(out.norm(dim=-1), emb.norm(dim=-1).mean().expand(3, 4), atol=1e-5)
    assert torch.allclose(torch.nn.functional.cosine_similarity(out, bank, dim=-1), torch.ones(3, 4), atol=1e-5)


def test_each_lr_of_a_cell_trains_and_scores_as_if_run_alone(data_dir):
    """The lr grid of a cell is independent runs: the encoder's scoring heads (trained with the prompt)
    never carry from one lr to the next, and the picked lr is tested with its own heads. Before the fix
    the cell shared one backbone: the second lr started from the first lr's trained heads."""
    from crosspt.bench.job import JobRunner
    from crosspt.bench.settings import BenchSettings
    from crosspt.bench.standard import StandardSettings, cell_job

    b = BenchSettings(tasks=["mrpc"], source_tasks=["sst2"], shots=[8], seeds=[3], lrs=[0.3, 0.03], epochs=3,
                      patience=None, max_test=32, max_length=32, prompt_len=2, data_dir=str(data_dir), threads=1)
    st = StandardSettings(bench=b, lr_shots=8, multi_shots=[], transfer_seeds=[3])
    runner = JobRunner()
    both = runner.run(cell_job(st, Arm.PT, ["mrpc"], 8, 3, [0.3, 0.03]))
    alone = {lr: runner.run(cell_job(st, Arm.PT, ["mrpc"], 8, 3, [lr])) for lr in (0.3, 0.03)}
    assert both["trials"][0]["best_epoch"] >= 0          # the first lr did train its heads
    for tr in both["trials"]:
        assert tr["val"] == alone[tr["lr"]]["val"] and tr["best_epoch"] == alone[tr["lr"]]["best_epoch"]
    assert both["test"] == alone[both["lr"]]["test"]


def _summary_with(records: list[dict], **standard) -> dict:
    """A finished run's summary around `records` (what the report reads; nothing trained)."""
    from dataclasses import asdict

    from crosspt.bench.settings import BenchSettings
    from crosspt.bench.standard import StandardSettings

    st = StandardSettings(bench=BenchSettings(tasks=["rte", "mrpc"], shots=[16], seeds=[0, 1, 2]), lr_shots=16,
                          transfer_seeds=[], **standard)
    return {"name": "t", "settings": asdict(st.bench), "standard": {k: v for k, v in asdict(st).items() if k != "bench"},
            "router_rule": "dirichlet",
            "wall_s": 1.0, "stage_wall_s": {}, "parallel": 1, "bank": {"tasks": ["sst2"], "path": "-"},
            "banks": {}, "multi_bank": [], "records": records}


def _cell(method, task, seed, test, variant=None, weights=None):
    return {"kind": "cell", "method": method, "task": task, "tasks": [task], "k": 16, "seed": seed, "test": test,
            "lr": 0.3, "trials": [{}, {}], "best_epoch": 1, "variant_name": variant, "bank_tasks": ["sst2"],
            "router_weights": weights}


def test_rule_variant_cells_stay_out_of_the_default_rows_and_are_paired_with_them():
    """--normalizations: a CrossPT cell run under another router rule is its own row (never averaged into the
    default's), and the report pairs the two rules over the same seeds."""
    recs = [_cell("pt", t, s, 0.50 + s / 100) for t in ("rte", "mrpc") for s in range(3)]
    recs += [_cell("crosspt_cat", t, s, 0.60 + s / 100, weights=[[0.4, 0.6]]) for t in ("rte", "mrpc") for s in range(3)]
    recs += [_cell("crosspt_cat", t, s, 0.55, "normalization noisy_topk", [[0.5, 0.5]]) for t in ("rte", "mrpc")
             for s in range(3)]
    recs += [{"kind": "zero_shot", "method": "zero_shot", "task": t, "k": 16, "seed": 0, "test": 0.6} for t in ("rte", "mrpc")]
    summary = _summary_with(recs, arms=["pt", "crosspt_cat"], normalizations=["noisy_topk"])
    assert SR.cells_of(recs)[("crosspt_cat", "rte", 16)] == {0: 0.60, 1: 0.61, 2: 0.62}
    assert SR.cells_of(recs, "normalization noisy_topk")[("crosspt_cat", "rte", 16)] == {0: 0.55, 1: 0.55, 2: 0.55}
    text, _ = SR.render(summary)
    rules = text.split("## Router rules")[1].split("\n## ")[0]
    avg = next(line for line in rules.splitlines() if line.startswith("| **avg**"))
    # PT, default, noisy_topk, default - PT (+10.0, sd 0), noisy_topk - PT, default - noisy_topk (+6.0 ± t*sd/sqrt 3)
    assert avg.split(" | ")[1:6] == ["16", "51.0 ± 1.0", "61.0 ± 1.0", "55.0 ± 0.0", "+10.0 [+10.0, +10.0] better"]
    assert "+6.0 [+3.5, +8.5] better" in avg
    assert "rte, k=16: sst2 0.50, private 0.50" in rules                 # the variant's router weights
    assert "PT long" not in text.split("## Paired differences")[1].split("\n## ")[0]   # arms not run: no columns


def test_planted_probe_reports_the_own_sources_weight_and_its_score():
    trace = [{"epoch": -1, "weights": [[0.5, 0.5]]}, {"epoch": 0, "weights": [[0.3, 0.7]]},
             {"epoch": 1, "weights": [[0.2, 0.8]]}, {"epoch": 2, "restored_best": True, "weights": [[0.3, 0.7]]}]
    pl = [{"method": "crosspt_wavg", "task": "sst2", "seed": s, "lr": 0.03, "val": 0.7, "test": 0.74 + s / 100,
           "best_epoch": 0, "router_weights": [[0.3, 0.7]], "router_trace": trace, "bank_tasks": ["qnli", "sst2"],
           "rule": rule, "own": 1, "router_lr": 0.1, "epochs": 3, "wall_s": 1.0}
          for s in range(3) for rule in ("dirichlet", "noisy_topk")]
    summary = _summary_with([{"kind": "cell", "method": "source", "task": "sst2", "test": 0.756}], arms=["pt"])
    summary["planted"] = pl
    lines = "\n".join(SR._planted_lines(summary))
    assert "**sst2** (own-prompt score 75.6)" in lines
    # own weight after the last epoch before the restore (epoch 1): 0.80; kept state 0.70; top 3 of 3
    assert "| CrossPT wavg | dirichlet | 80.0 ± 0.0 | 70.0 ± 0.0 | 3 of 3 | 75.0 ± 1.0 | -0.6 [-3.1, +1.9] |" in lines
    assert "| 1 | 0.800 | 0.800 |" in lines
