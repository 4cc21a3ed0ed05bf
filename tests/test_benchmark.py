"""The few-shot benchmark harness: same samples for every method, leave-one-out banks, table arithmetic,
the PEFT reference paths, and the GPU check's CPU (--tiny) mode. Fast: tiny models, fake training runs."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosspt.bench import harness as H
from crosspt.bench import job as J
from crosspt.bench import methods as M
from crosspt.bench import prompts as P
from crosspt.bench import report as R
from benchmarks import speed as S
from crosspt.bench import stats as ST
from crosspt.bench.settings import BenchSettings

REPO = Path(__file__).resolve().parents[1]


def _settings(data_dir, backbone="minilm", **kw) -> BenchSettings:
    base = dict(tasks=["sst2", "rte"], source_tasks=["sst2", "rte", "mrpc"], shots=[4], seeds=[0, 1],
                lrs=[0.3, 0.03], epochs=1, patience=None, max_test=8, max_length=32, prompt_len=2,
                data_dir=str(data_dir), backbone=str(backbone))
    base.update(kw)
    return BenchSettings(**base)


# ---- same k-shot samples for every method ------------------------------------------------------------
def test_every_method_sees_the_same_samples(data_dir):
    from crosspt.run.inputs import prepare_data

    s = _settings(data_dir)
    for seed in (0, 1):
        ids = {}
        for m in ("zero_shot", "pt", "peft_pt", "spot", "attempt", "mpt", "crosspt_cat", "crosspt_wavg"):
            cfg = M.run_config(s, m, ["rte"], 4, seed, 0.3, n_sources=2)
            _, splits = prepare_data(cfg)
            ids[m] = {part: [e.uid for e in splits["rte"][part]] for part in ("train", "val", "test")}
        first = next(iter(ids.values()))
        assert all(v == first for v in ids.values())
        assert len(first["train"]) == 8 and len(first["val"]) == 8 and len(first["test"]) == 8
    s0 = prepare_data(M.run_config(s, "pt", ["rte"], 4, 0, 0.3))[1]["rte"]
    s1 = prepare_data(M.run_config(s, "pt", ["rte"], 4, 1, 0.3))[1]["rte"]
    assert {e.uid for e in s0["train"]} != {e.uid for e in s1["train"]}
    assert [e.uid for e in s0["test"]] == [e.uid for e in s1["test"]]      # test subset fixed across seeds


def test_executed_jobs_record_identical_sample_ids(data_dir, tiny_t5_path):
    s = _settings(data_dir, backbone=tiny_t5_path, max_test=4)
    st = dataclasses.asdict(s)
    bank = torch.randn(2, 2, 64) * 0.1
    recs = [J.execute_job({"method": m, "task": "sst2", "k": 4, "seed": 1, "lr": 0.3, "settings": st,
                           **({"bank": bank, "bank_tasks": ["rte", "mrpc"]} if m in ("crosspt_cat", "spot") else {})})
            for m in ("zero_shot", "pt", "peft_pt", "crosspt_cat", "spot")]
    assert all(r["sample_ids"] == recs[0]["sample_ids"] for r in recs)
    assert all(math.isfinite(r["test"]) for r in recs)
    assert recs[0]["epochs_run"] == 0 and recs[1]["epochs_run"] == 1
    assert recs[1]["prompt"].shape == (2, 64)                      # PT returns its (best) prompt for banks
    assert recs[4]["spot_source"] in ("rte", "mrpc")


# ---- orchestration with fake training: leave-one-out banks, selection, MPT stages ---------------------
def test_orchestration_leave_one_out_and_selection(data_dir, tmp_path, monkeypatch):
    s = _settings(data_dir, methods=list(M.METHODS))
    pool = s.source_tasks
    seen: list[dict] = []

    def fake(job, splits=None):
        seen.append(job)
        lr, seed = job["lr"], job["seed"]
        val = {0.3: 0.6, 0.03: 0.7, None: 0.5}[lr]
        task = "+".join(job.get("tasks") or [job["task"]])
        rec = {"method": job["method"], "task": task, "k": job["k"], "seed": seed, "lr": lr, "val": val,
               "test": val + 0.1 * seed + (0.01 if lr == 0.3 else 0.0), "metrics": {}, "epochs_run": 1,
               "best_epoch": 0, "trainable_params": 0, "wall_s": 0.1, "epoch_s": [0.05], "sample_ids": {}}
        if job["method"] == "pt":
            rec["prompt"] = torch.full((s.prompt_len, 3), float(pool.index(job["task"]) if job["task"] in pool else -1)
                                       + 10 * seed)
        if job["method"] == "mpt_source":
            rec["mpt_state"] = {"tag": torch.tensor([seed])}
        if job.get("bank_tasks") and job["method"] != "spot":
            rec["sources"] = list(job["bank_tasks"])
        return rec

    monkeypatch.setattr(J, "execute_job", fake)
    summary = H.run_benchmark(s, tmp_path, log=lambda m: None)

    composed = [j for j in seen if j["method"] in ("spot", "attempt", "crosspt_cat", "crosspt_wavg")]
    assert len(composed) == 4 * 2 * 2 * 2                              # methods x targets x seeds x lrs
    for j in composed:
        assert j["task"] not in j["bank_tasks"]
        assert j["bank_tasks"] == [t for t in pool if t != j["task"]]
        # the bank rows are the source tasks' own PT prompts of the same seed
        want = torch.stack([torch.full((s.prompt_len, 3), float(pool.index(t) + 10 * j["seed"]))
                            for t in j["bank_tasks"]])
        assert torch.equal(j["bank"], want)
    mpt_src = [j for j in seen if j["method"] == "mpt_source"]
    assert mpt_src and all(j["target"] not in j["tasks"] for j in mpt_src)
    mpt = [j for j in seen if j["method"] == "mpt"]
    assert mpt and all(int(j["mpt_state"]["tag"]) == j["seed"] for j in mpt)
    assert all(j["task"] not in j["bank_tasks"] for j in mpt)
    # PT on a source-pool task that is also a target (same k) ran once, not twice
    pt_jobs = [(j["task"], j["k"], j["seed"], j["lr"]) for j in seen if j["method"] == "pt"]
    assert len(pt_jobs) == len(set(pt_jobs)) == len(pool) * 2 * 2
    # selection by validation: lr 0.03 (val 0.7) wins every trained cell
    for r in summary["selected"]:
        assert r["lr"] == (None if r["method"] == "zero_shot" else 0.03)
    cell = summary["table"]["cells"]["crosspt_cat|rte|4"]
    assert cell["mean"] == pytest.approx(0.75) and cell["std"] == pytest.approx(statistics.stdev([0.7, 0.8]))
    assert Path(summary["banks"]["0"]).is_file()


def test_bank_helper_excludes_target(tmp_path):
    from crosspt.run.artifacts import load_bank, save_bank

    path = save_bank(tmp_path / "b.safetensors", torch.arange(4.0).view(4, 1, 1).expand(4, 2, 3).clone(),
                     backbone="x", tasks=["sst2", "rte", "mrpc", "cola"])
    bank, meta = load_bank(path)
    sub, names = H.leave_one_out_bank(bank, meta, "rte")
    assert names == ["sst2", "mrpc", "cola"] and sub[:, 0, 0].tolist() == [0.0, 2.0, 3.0]
    sub, names = H.leave_one_out_bank(bank, meta, "qnli")          # not in the bank: everything
    assert names == ["sst2", "rte", "mrpc", "cola"]


# ---- table arithmetic ----------------------------------------------------------------------------------
def _rec(m, t, k, seed, test):
    return {"method": m, "task": t, "k": k, "seed": seed, "test": test, "val": 0.0, "lr": 0.1}


def test_table_mean_std_and_average_row():
    recs = [_rec("pt", "sst2", 16, 0, 0.80), _rec("pt", "sst2", 16, 1, 0.90), _rec("pt", "sst2", 16, 2, 0.70),
            _rec("pt", "rte", 16, 0, 0.50), _rec("pt", "rte", 16, 1, 0.60), _rec("pt", "rte", 16, 2, 0.55),
            _rec("crosspt_cat", "sst2", 16, 0, 0.85), _rec("crosspt_cat", "rte", 16, 0, 0.65)]
    table = ST.summarize(recs, ["pt", "crosspt_cat", "mpt"], ["sst2", "rte"], [16, 32])
    c = table["cells"]["pt|sst2|16"]
    assert c["mean"] == pytest.approx(0.8) and c["std"] == pytest.approx(0.1) and c["n"] == 3
    avg = table["avg"]["pt|16"]                                        # per seed: .65, .75, .625
    assert avg["mean"] == pytest.approx(statistics.fmean([0.65, 0.75, 0.625]))
    assert avg["std"] == pytest.approx(statistics.stdev([0.65, 0.75, 0.625]))
    assert avg["mean"] == pytest.approx(statistics.fmean([0.8, 0.55]))  # = mean of the task means
    assert table["avg"]["crosspt_cat|16"] == {"mean": pytest.approx(0.75), "std": 0.0, "n": 1,
                                              "seeds": {"0": pytest.approx(0.75)}}
    assert "pt|32" not in table["avg"] and "mpt|16" not in table["avg"]
    text = R.format_table(table, na={"mpt": "not supported"})
    assert "| sst2 | PT (ours) | 80.0 ± 10.0 | n/a |" in text
    assert "| rte | MPT (PEFT) | n/a: not supported | n/a: not supported |" in text
    assert "| **avg** | PT (ours) | **67.5 ± 6.6** | **n/a** |" in text
    assert ST.mean_std([0.5]) == (0.5, 0.0)
    v = R.verdict(table)
    assert any("CrossPT cat beats PT (ours)" in x for x in v)


def test_bar_chart_writes_png(tmp_path):
    table = ST.summarize([_rec("pt", "sst2", 16, 0, 0.8), _rec("crosspt_cat", "sst2", 16, 0, 0.7)],
                        ["pt", "crosspt_cat"], ["sst2"], [16])
    p = R.bar_chart(table, tmp_path / "c.png")
    assert p.read_bytes()[:4] == b"\x89PNG"


# ---- PEFT reference paths ------------------------------------------------------------------------------
def _one_batch(backbone, task="rte", n=4):
    from crosspt.tasks.data import Example

    exs = [Example(task, f"{task}/train/{i}", ("a cat sat on the mat", "a cat sat"), i % 2) for i in range(n)]
    return backbone.collate(exs, train=True)


@pytest.mark.parametrize("kind", ["pt", "mpt"])
def test_peft_encoder_path_trains_only_peft_prompt_and_heads(minilm_path, kind):
    from crosspt.backbones.loader import load_backbone
    from crosspt.run.model import CrossPTModel
    from crosspt.tasks.specs import resolve_tasks

    bb = load_backbone("minilm", resolve_tasks(["rte"]), max_length=32)
    reprs = None if not hasattr(bb, "class_reprs") else bb.class_reprs.clone()
    prompt, bb = P.attach_peft(bb, kind, 3, n_tasks=1)
    model = CrossPTModel(prompt, bb)
    loss = model(_one_batch(bb))
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("prompt_encoder" in n for n in trainable)
    assert all("prompt_encoder" in n or n.startswith("backbone.pair_") or n.startswith("backbone.logit")
               or n.startswith("backbone.reg_") for n in trainable), trainable
    emb = [p for n, p in model.named_parameters() if "prompt_encoder" in n and "embedding" in n][0]
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert model.predict(_one_batch(bb)).shape == (4,)
    if reprs is not None:
        assert torch.equal(reprs, bb.class_reprs)                     # class sentences stay prompt-free


def test_peft_prompt_module_on_seq2seq(tiny_t5_path):
    from crosspt.backbones.loader import load_backbone
    from crosspt.run.model import CrossPTModel
    from crosspt.tasks.specs import resolve_tasks

    bb = load_backbone(str(tiny_t5_path), resolve_tasks(["rte"]), max_length=32)
    for kind in ("pt", "mpt"):
        prompt, bb2 = P.attach_peft(bb, kind, 3, n_tasks=1)
        model = CrossPTModel(prompt, bb2)
        loss = model(_one_batch(bb2))
        loss.backward()
        assert all(p.grad is not None for p in prompt.prompt_encoder.parameters())
        assert prompt.collapsed(0)[0].shape == (3, 64)


def test_peft_prompt_on_the_encoder_encodes_as_peft_feature_extraction_does(minilm_path):
    """PEFT's PT through our encoder (its PromptEmbedding as the prompt, placed before [CLS]) gives the
    token states PeftModelForFeatureExtraction's own forward gives, pooled over the real tokens."""
    from peft import get_peft_model
    from transformers import AutoModel

    from crosspt.backbones.loader import load_backbone
    from crosspt.tasks.specs import resolve_tasks

    bb = load_backbone("minilm", resolve_tasks(["rte"]), max_length=32)
    prompt, bb = P.attach_peft(bb, "pt", 3, n_tasks=1)
    ref = get_peft_model(AutoModel.from_pretrained(str(minilm_path)), P.peft_config("pt", 3, bb.embed_dim)).eval()
    ref.prompt_encoder["default"].load_state_dict(prompt.prompt_encoder.state_dict())
    b = _one_batch(bb)
    ids, am = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        p, m, _ = prompt(b["task_ids"])
        got = bb.encode(p, m, ids, am, b["token_type_ids"])
        h = ref(input_ids=ids, attention_mask=am).last_hidden_state[:, 3:]
    pool = am.unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * pool).sum(1) / pool.sum(1), dim=-1)
    assert torch.allclose(got, want, atol=1e-5)


def test_mpt_prompt_module_gives_pefts_task_prompts(minilm_path):
    """PeftPrompt around MultitaskPromptEmbedding returns what PeftModel.get_prompt returns with task ids."""
    from peft import get_peft_model
    from transformers import AutoModel

    from crosspt.backbones.loader import load_backbone
    from crosspt.tasks.specs import resolve_tasks

    bb = load_backbone("minilm", resolve_tasks(["rte", "mrpc"]), max_length=32)
    prompt, bb = P.attach_peft(bb, "mpt", 3, n_tasks=2)
    with torch.no_grad():
        prompt.prompt_encoder.prefix_task_cols.normal_()          # two tasks that differ
    ref = get_peft_model(AutoModel.from_pretrained(str(minilm_path)), P.peft_config("mpt", 3, bb.embed_dim, n_tasks=2))
    ref.prompt_encoder["default"].load_state_dict(prompt.prompt_encoder.state_dict())
    tids = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        got, mask, _ = prompt(tids)
        assert torch.allclose(got, ref.get_prompt(batch_size=4, task_ids=tids), atol=1e-6)
    assert not torch.allclose(got[0], got[1]) and mask.shape == (4, 3)


def test_mpt_source_stage_starts_from_the_pretrained_sources(minilm_path):
    """MPT's shared prompt starts as the mean of the bank's source prompts, not PEFT's random init."""
    from crosspt.backbones.loader import load_backbone
    from crosspt.tasks.specs import resolve_tasks

    bb = load_backbone("minilm", resolve_tasks(["rte", "mrpc"]), max_length=32)
    prompt, bb = P.attach_peft(bb, "mpt", 3, n_tasks=2)
    bank = torch.randn(2, 3, bb.embed_dim)
    P.init_mpt_shared_prompt(prompt, bank)
    assert torch.allclose(prompt.prompt_encoder.embedding.weight, bank.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        P.init_mpt_shared_prompt(prompt, torch.randn(2, 3, bb.embed_dim + 1))


# ---- the split cache ----------------------------------------------------------------------------------
def test_jobs_of_one_runner_draw_the_splits_once(data_dir, tiny_t5_path, monkeypatch):
    """Two methods on the same task, k and seed: one k-shot draw, reused by the run loop too."""
    from crosspt.run import inputs

    calls = []
    real = inputs.prepare_data

    def counting(cfg, splits=None):                  # a draw is a call without precomputed splits
        if splits is None:
            calls.append(cfg.name)
        return real(cfg, splits=splits)

    monkeypatch.setattr(inputs, "prepare_data", counting)
    st = dataclasses.asdict(_settings(data_dir, backbone=tiny_t5_path, max_test=4))
    runner = J.JobRunner()
    recs = [runner.run({"method": m, "task": "rte", "k": 4, "seed": 0, "lr": 0.3, "settings": st})
            for m in ("zero_shot", "pt")]
    assert len(calls) == 1 and recs[0]["sample_ids"] == recs[1]["sample_ids"]
    runner.run({"method": "zero_shot", "task": "rte", "k": 4, "seed": 1, "lr": None, "settings": st})
    assert len(calls) == 2                                               # another seed: another draw


# ---- GPU check, CPU mode ------------------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_check_tiny_runs_on_cpu_without_ray_mlflow_optuna_datasets(tmp_path):
    """`jobs/gpu_check.py --tiny` runs every part (the step variants, host syncs, profile, one trial process)
    where ray, mlflow, optuna and datasets cannot be imported, as on the GPU machine."""
    blocked = tmp_path / "blocked"
    for name in ("ray", "mlflow", "optuna", "datasets"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "gpu_check.py"), "--tiny", "--cpu", "--concurrency", "1",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step time ratio CrossPT / PT" in p.stdout and "Trials per GPU" in p.stdout
    res = json.loads(out.read_text())
    st = res["steps"]
    assert {"pt", "crosspt", "crosspt_old_syncs"} <= set(st["steps"]) and st["steps"]["pt"]["examples_per_s"] > 0
    assert st["syncs"]["counted_ours_per_step"] == 0, st["syncs"]
    assert st["profile"]["ops"]
    [level] = res["concurrency"]
    assert level["trials"] == 1 and level["failed"] == 0 and level["start_to_first_step_s"] > 0


# ---- speed mode pieces ---------------------------------------------------------------------------------
def test_promoted_prompt_predicts_like_the_composed_model_and_step_timing_runs(data_dir, tiny_t5_path):
    s = _settings(data_dir, backbone=tiny_t5_path, max_test=8, eval_batch_size=4)
    inf = S.measure_inference_ratio(s, rounds=1, log=lambda m: None)
    assert inf["promoted_predictions_identical"] is True
    assert inf["collapsed_shape"] == [5 * s.prompt_len, 64]
    assert inf["ratio_promoted_vs_pt"] > 0
    st = S.measure_step_ratio(s, rounds=1, steps=1, log=lambda m: None)
    assert st["composed_len"]["pt"] == st["composed_len"]["crosspt_cat"] == 5 * s.prompt_len
    assert st["ratio_crosspt_cat_vs_pt"] > 0


def test_speed_before_after_table_reads_each_sides_runs():
    """`--speed-compare`: parts measured in separate runs merge per side, and the table shows both columns."""
    before = S.merge_speed([{"settings": {}, "step": {"median_step_s": {"pt": 0.2, "crosspt_cat": 0.21},
                                                      "ratio_crosspt_cat_vs_pt": 1.05}, "wall_s": 10},
                            {"ray": {"plain_s": 100.0, "in_process": {"ratio_vs_plain": 1.113},
                                     "worker_group": {"ratio_vs_plain": 1.5}}, "wall_s": 20}])
    after = S.merge_speed([{"settings": {}, "trial": {"fixed_s": 3.0, "eval_share": 0.25, "data_preparations": 0.0},
                            "wall_s": 5}])
    assert before["wall_s"] == 30 and "step" in before and "ray" in before
    text = S.render_before_after(before, after, before_label="old", after_label="new")
    assert "| **in-process search / plain loop** (median over the rounds) | 1.113 | - | <= 1.05 |" in text
    assert "| smoke trial: evaluation share of its wall | - | 25% |" in text
    assert "| train step PT (same batches, CPU) | 200.0 ms | - |" in text


def test_ray_overhead_rounds_compare_each_search_with_the_plain_runs_around_it():
    """Each in-process round is divided by the mean of the plain runs just before and after it (not by one
    plain mean of the whole run); the wall outside the trials and each trial's extra seconds come from the
    trials' own `trial.wall_s`, matched to the plain runs by configuration."""
    def plain(walls):
        rows = [{"lr": lr, "wall_s": w} for lr, w in zip((0.1, 0.03), walls)]
        return rows, sum(walls)
    plains = [plain([50.0, 50.0]), plain([60.0, 60.0]), plain([40.0, 40.0])]
    searches = [{"wall_s": 126.0, "trials": [{"lr": 0.03, "trial_wall_s": 58.0, "ran": 1},
                                             {"lr": 0.1, "trial_wall_s": 55.0, "ran": 0}]},
                {"wall_s": 105.0, "trials": [{"lr": 0.03, "trial_wall_s": 52.0}, {"lr": 0.1, "trial_wall_s": None}]}]
    r1, r2 = S.bracketed_rounds(searches, plains)
    assert r1["plain_s"] == 110.0 and abs(r1["ratio"] - 126.0 / 110.0) < 1e-12
    assert r2["plain_s"] == 100.0 and abs(r2["ratio"] - 1.05) < 1e-12
    assert r1["outside_trials_s"] == 126.0 - 113.0
    assert list(r1["trial_minus_plain_s"].items()) == [(0.1, 0.0), (0.03, 3.0)]       # in the order they ran
    assert r2["outside_trials_s"] is None and r2["trial_minus_plain_s"] == {0.03: 2.0}
    ray = {"task": "rte", "trials": 2, "epochs": 1, "cpus_per_trial": 1, "ray_init_s": 3.0, "plain": plains[0][0],
           "plain_after": plains[-1][0], "plain_walls_s": [100.0, 120.0, 80.0],
           "identical_in_process_vs_worker_group": True, "identical_in_process_vs_plain": True,
           "worker_group": {"wall_s": 150.0, "ratio_vs_plain": 1.364, "trials": []},
           "in_process": {"trials": [], "ratio_vs_plain": 1.097, "ratio_min": 1.05, "ratio_max": 1.145,
                          "rounds": [r1, r2]}}
    for rows in (ray["plain"], ray["plain_after"]):
        for x in rows:
            x.update(best_val_score=0.5, test_score=0.5)
    text = "\n".join(S._ray_rows(ray))
    assert "| in-process search / plain loop, each round | 1.145, 1.050 | |" in text
    assert "**1.097** (1.050 - 1.145) | <= 1.05 |" in text
    assert "each round | +13.0, - s | |" in text
    both = S.render_before_after({"ray": ray}, {}, before_label="old", after_label="new")
    assert "| in-process search / plain loop, each round | 1.145, 1.050 | - |  |" in both
    assert "| in-process search: wall outside its trials, each round | 13.0 s, - | - |  |" in both
