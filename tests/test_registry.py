"""Source-prompt pre-training, promotion, loading, prediction, evaluation and PEFT export, against real
components: a local Ray (`ray.init(num_cpus=2)`), a sqlite MLflow store in tmp_path, the tiny random
T5/decoder backbones and real GLUE rows (few shots)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crosspt.config.schema import config_hash, load_config
from crosspt.errors import ArtifactError, CrossPTError, UnknownTaskError


# ---- helpers ---------------------------------------------------------------------------------------
def hand_built_bundle(tmp_path: Path, backbone: Path, over: dict | None = None, **prompt) -> Path:
    """A bundle from a freshly built model (random bank, perturbed router): no training needed to
    compare crosspt's logits with PEFT's."""
    from crosspt.run.artifacts import save_prompt_artifact
    from crosspt.run.model import build_model
    from crosspt.registry.pyfunc import write_bundle
    from crosspt.tasks.specs import resolve_tasks

    over = {"tasks": ["sst2", "rte"], "backbone.name": str(backbone), "backbone.max_length": 48, "seed": 3,
            **{f"prompt.{k}": v for k, v in prompt.items()}, **(over or {})}
    cfg = load_config(None, over)
    model = build_model(cfg, resolve_tasks(cfg.tasks))
    with torch.no_grad():
        model.prompt.router.logits.copy_(torch.randn(model.prompt.router.logits.shape,
                                                     generator=torch.Generator().manual_seed(1)))
    prompts = save_prompt_artifact(tmp_path / "prompts.safetensors", model, config_hash=config_hash(cfg),
                                   backbone=cfg.backbone.name)
    return write_bundle(tmp_path / "bundle", config=cfg, prompts_path=prompts, source={"test": True})


def peft_logits_match(predictor, out_dir: Path, task: str, texts: list[tuple[str, ...]], one_by_one: bool) -> float:
    """Max |logit difference| between crosspt's own prompted model and PEFT with the exported adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from crosspt.tasks.data import Example
    from crosspt.registry.peft_export import crosspt_logits

    bb = predictor.backbone
    auto = AutoModelForSeq2SeqLM if bb.family == "seq2seq" else AutoModelForCausalLM
    base = auto.from_pretrained(predictor.config.backbone.name)
    peft_model = PeftModel.from_pretrained(base, str(out_dir)).eval()
    examples = [Example(task=task, uid=f"{task}/x/{i}", texts=t, label=None) for i, t in enumerate(texts)]
    groups = [[e] for e in examples] if one_by_one else [examples]
    worst = 0.0
    n_virtual = json.loads((out_dir / "adapter_config.json").read_text())["num_virtual_tokens"]
    for group in groups:
        batch = bb.collate(group, train=False)
        with torch.no_grad():
            if bb.family == "seq2seq":
                dec = bb._decoder_inputs(bb._targets(["positive"] * len(group)))
                ours = crosspt_logits(predictor, batch, dec)
                theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    decoder_input_ids=dec).logits
            else:
                ours = crosspt_logits(predictor, batch)
                theirs = peft_model(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).logits[:, n_virtual:]
        assert ours.shape == theirs.shape
        worst = max(worst, float((ours - theirs).abs().max()))
    return worst


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from crosspt.cli.main import main

    capsys.readouterr()                      # drop what earlier steps printed
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- fast: PEFT export on hand-built models ---------------------------------------------------------------
TEXTS = [("a gripping, beautifully made film",), ("dull and far too long",), ("it is fine",)]


def test_peft_round_trip_t5_identical_logits(tiny_t5_path, tmp_path):
    """cat of 2 sources (len 3) + private (len 5): padding positions are masked in crosspt's composed
    prompt; the collapsed (fully attended) prompt in PEFT gives the same logits, padded batch included."""
    from crosspt.registry.peft_export import export_peft
    from crosspt.registry.pyfunc import CrossPTPredictor

    bundle = hand_built_bundle(tmp_path, tiny_t5_path, n_sources=2, source_len=3, private_len=5, composition="cat")
    predictor = CrossPTPredictor(bundle, device="cpu")
    summary = export_peft(predictor, "sst2", tmp_path / "peft")
    assert summary["num_virtual_tokens"] == 2 * 3 + 5 and summary["task_type"] == "SEQ_2_SEQ_LM"
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 11 and cfg["num_transformer_submodules"] == 1
    assert peft_logits_match(predictor, tmp_path / "peft", "sst2", TEXTS, one_by_one=False) < 1e-4


def test_peft_round_trip_decoder_identical_logits(tiny_decoder_path, tmp_path):
    from crosspt.registry.peft_export import export_peft
    from crosspt.registry.pyfunc import CrossPTPredictor

    bundle = hand_built_bundle(tmp_path, tiny_decoder_path, n_sources=2, source_len=4, private_len=2, composition="cat")
    predictor = CrossPTPredictor(bundle, device="cpu")
    summary = export_peft(predictor, "rte", tmp_path / "peft")
    assert summary["task_type"] == "CAUSAL_LM" and summary["num_virtual_tokens"] == 2 * 4 + 2
    pairs = [("A man is sleeping.", "Someone sleeps."), ("The cat sat on the mat.", "A dog barks.")]
    # decoder: identical for rows without left padding (PEFT drops position_ids), i.e. one at a time
    assert peft_logits_match(predictor, tmp_path / "peft", "rte", pairs, one_by_one=True) < 1e-4


@pytest.mark.parametrize("init", ["text", "vocab"])
def test_peft_round_trip_decoder_chat_identical_logits(init, tiny_chat_llama_path, tmp_path):
    """Under the chat template crosspt's prompt sits inside the user turn; PEFT can only prepend, so the export
    folds the task's chat head into its virtual tokens ([head H, prompt L]) and the input template starts
    after the prompt: PEFT then reads the same sequence and gives crosspt's logits. Init text (the decoder's
    default): the prompt took the place of the head's last L tokens, which the export leaves out (H - L + L)."""
    from crosspt.registry.peft_export import export_peft
    from crosspt.registry.pyfunc import CrossPTPredictor

    bundle = hand_built_bundle(tmp_path, tiny_chat_llama_path, {"backbone.template": "chat"}, private_len=3,
                               init=init)
    predictor = CrossPTPredictor(bundle, device="cpu")
    replaced = 3 if init == "text" else 0
    assert predictor.model.replaces_head == replaced
    head = predictor.backbone.tokenizer(predictor.backbone.chat_head(predictor.task("rte")),
                                        add_special_tokens=False)["input_ids"]
    summary = export_peft(predictor, "rte", tmp_path / "peft")
    assert summary["num_virtual_tokens"] == len(head) - replaced + 3
    info = json.loads((tmp_path / "peft" / "crosspt_task.json").read_text())
    assert info["chat_head_tokens"] == len(head) - replaced and info["prompt_replaces_head_tokens"] == replaced
    assert info["chat_head"].endswith("Answer yes or no.\n") == (init == "vocab")
    assert info["input_template"].endswith("<|im_end|>\n<|im_start|>assistant\n")
    pairs = [("A man is sleeping.", "Someone sleeps."), ("The cat sat on the mat.", "A dog barks.")]
    assert peft_logits_match(predictor, tmp_path / "peft", "rte", pairs, one_by_one=True) < 1e-4


def test_a_prompt_is_read_as_it_was_trained_in_or_behind_the_chat_head(tiny_chat_llama_path, tmp_path):
    """The prompt artifact records how many chat-head tokens its prompts took the place of, and a promoted model
    is read that way. An artifact written before the prompt could take the instruction's place has no such key:
    its prompts were trained behind the whole head, and the predictor keeps the whole head for them (else the
    same stored prompts would silently answer differently)."""
    from crosspt.registry.pyfunc import CrossPTPredictor
    from crosspt.run.artifacts import load_tensors, save_tensors
    from crosspt.tasks.data import Example

    bundle = hand_built_bundle(tmp_path, tiny_chat_llama_path, {"backbone.template": "chat"}, private_len=3)
    new = CrossPTPredictor(bundle, device="cpu")
    assert new.prompt_meta["replaces_head"] == 3 and new.model.replaces_head == 3
    tensors, meta = load_tensors(bundle / "prompts.safetensors")
    del meta["replaces_head"]                                    # as written before the key existed
    save_tensors(bundle / "prompts.safetensors", tensors, meta)
    old = CrossPTPredictor(bundle, device="cpu")
    assert old.model.replaces_head == 0
    rows = [Example("rte", "r0", ("A man is sleeping.", "Someone sleeps."), 0)]
    with torch.no_grad():
        batch = new.backbone.collate(rows, train=False)
        whole = new.backbone.candidate_scores(*new.model.compose(batch)[:2], batch)   # no replacement: whole head
        assert torch.allclose(old.backbone.candidate_scores(*old.model.compose(batch)[:2],
                                                            old.model.backbone_batch(batch))[0], whole[0])
        assert not torch.allclose(new.backbone.candidate_scores(*new.model.compose(batch)[:2],
                                                                new.model.backbone_batch(batch))[0], whole[0])


def test_peft_export_refuses_encoder(minilm_path, tmp_path, capsys):
    from crosspt.registry.peft_export import ExportError, check_exportable, export_peft
    from crosspt.registry.pyfunc import CrossPTPredictor

    bundle = hand_built_bundle(tmp_path, minilm_path, n_sources=0, private_len=2)
    with pytest.raises(ExportError, match="encoder.*CLS"):
        check_exportable(bundle)                              # from the config, before loading weights
    predictor = CrossPTPredictor(bundle, device="cpu")
    with pytest.raises(ExportError, match="encoder.*CLS"):
        export_peft(predictor, "sst2", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(UnknownTaskError, match="not trained on task 'cola'"):
        predictor.task("cola")
    # the CLI: one line, exit 2, nothing written
    code, out, err = run_cli(["export-peft", "--model", str(bundle), "--task", "sst2", "--out", str(tmp_path / "peft")],
                             capsys)
    assert code == 2 and err.startswith("error: cannot export an encoder") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "peft").exists()


def test_bank_and_model_references_fail_clearly(tmp_path):
    from crosspt.registry.models import RegistryError, parse_model_uri, resolve_bank

    assert parse_model_uri("models:/glue-sources@current") == ("glue-sources", "current", None)
    assert parse_model_uri("models:/glue-sources/3") == ("glue-sources", None, "3")
    with pytest.raises(RegistryError, match="names no version"):
        parse_model_uri("models:/glue-sources")
    with pytest.raises(ArtifactError, match="source bank not found"):
        resolve_bank(str(tmp_path / "nope.safetensors"), None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RegistryError, match="no registered model 'glue-sources'"):
        resolve_bank("models:/glue-sources@current", uri)


# ---- slow: pretrain -> search by models:/ name -> promote -> predict / evaluate ------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_t5_path, data_dir):
    """Two source prompts pre-trained as parallel Ray tasks and registered; a 2-trial search that names
    the bank `models:/glue-sources@current`. Ray is shut down before the tests run."""
    import ray

    from crosspt.search.driver import run_search
    from crosspt.config.space import SearchSpace
    from crosspt.registry.sources import pretrain_sources

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    # a Ray of this module's own: an earlier test's session head (`ray_head` sets RAY_ADDRESS for the session)
    # is left alone, and init_ray inside the search joins this one instead of refusing a mismatch
    if ray.is_initialized():
        ray.shutdown()
    mp.delenv("RAY_ADDRESS", raising=False)
    mp.setenv("CROSSPT_CACHE_DIR", str(tmp / "cache"))
    mp.chdir(tmp)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        cfg = load_config(None, {"backbone.name": str(tiny_t5_path), "backbone.max_length": 48, "data.shots": 4,
                                 "data.max_test": 16, "prompt.source_len": 4, "train.epochs": 2,
                                 "train.patience": None, "seed": 0})
        sources = pretrain_sources(cfg, tasks=["sst2", "rte"], data_dir=str(data_dir), output_dir=tmp / "sources",
                                   tracking_uri=uri, model_name="glue-sources")
        space = SearchSpace.model_validate({
            "name": "regsearch",
            "base": {"tasks": ["sst2", "rte"], "seed": 0, "backbone": {"name": str(tiny_t5_path), "max_length": 48},
                     "data": {"shots": 4, "max_test": 16},
                     "prompt": {"n_sources": 2, "source_len": 4, "private_len": 4,
                                "source_bank": "models:/glue-sources@current"},
                     "train": {"batch_size": 8, "eval_batch_size": 32, "patience": None},
                     "scaling": {"num_workers": 1, "in_process": True}},
            "space": {"prompt.composition": {"type": "choice", "values": ["cat", "wavg"]},
                      "optim.prompt_lr": {"type": "loguniform", "low": 1e-2, "high": 0.3}},
            "objective": {"metric": "best_val_score", "mode": "max"},
            "budget": {"num_samples": 2, "max_epochs": 2}, "scheduler": {"type": "fifo"},
            "search": {"algorithm": "random", "seed": 0}})
        search = run_search(space, experiment="regsearch", data_dir=str(data_dir), tracking_uri=uri,
                            storage_path=str(tmp / "ray_results"), verbose=0)
    except BaseException:
        mp.undo()           # a failed set-up must not leave the session in this module's folder and cache
        raise
    finally:
        ray.shutdown()
    yield {"uri": uri, "tmp": tmp, "sources": sources, "search": search, "data_dir": data_dir}
    mp.undo()


def _children(world):
    from crosspt.registry import experiments

    s = world["search"]
    return experiments.child_runs(world["uri"], s["experiment_id"], s["parent_run_id"])


def _versions(uri: str, name: str) -> int:
    from crosspt.registry.models import count_versions

    return count_versions(uri, name)


@pytest.mark.slow
def test_pretrained_bank_is_registered_and_used_by_the_search(world):
    from crosspt.run.artifacts import load_bank, load_prompt_artifact
    from crosspt.registry.models import _client, resolve_bank

    uri, src = world["uri"], world["sources"]
    assert src["model_uri"] == "models:/glue-sources@current" and src["version"] == "1"
    bank, meta = load_bank(src["bank_path"])
    assert tuple(bank.shape) == (2, 4, 64) and meta["tasks"] == ["sst2", "rte"]
    assert "tiny_t5" in meta["backbone"] and meta["source_len"] == 4 and meta["dim"] == 64
    assert set(meta["metrics"]["rte"]) >= {"best_val_score", "test_score", "test_accuracy"}
    # each bank row is that task's learned vanilla prompt (its private prompt, n_sources = 0)
    for i, t in enumerate(["sst2", "rte"]):
        tensors, tmeta = load_prompt_artifact(Path(world["tmp"]) / "sources" / t / "checkpoints" /
                                              next(p.name for p in (Path(world["tmp"]) / "sources" / t /
                                                                    "checkpoints").iterdir()) / "prompts.safetensors")
        assert tmeta["n_sources"] == 0 and tmeta["private_len"] == 4
        assert torch.equal(bank[i], tensors[f"composed.{t}"])
    # the parent run holds the bank and per-task metrics
    c = _client(uri)
    run = c.get_run(src["run_id"])
    assert {"sst2_test_score", "rte_best_val_score"} <= set(run.data.metrics)
    assert "bank/sources.safetensors" in {a.path for a in c.list_artifacts(src["run_id"], "bank")}
    # alias / version / latest resolve to the same registered file
    paths = {resolve_bank(u, uri) for u in ("models:/glue-sources@current", "models:/glue-sources/1",
                                             "models:/glue-sources/latest")}
    assert len(paths) == 1
    assert torch.equal(load_bank(paths.pop())[0], bank)
    # the search resolved the models:/ name once; every trial composed from the registered prompts
    children = _children(world)
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    for r in children:
        import yaml

        cfg = c.download_artifacts(r.info.run_id, "config.yaml", str(world["tmp"] / r.info.run_id))
        assert Path(yaml.safe_load(Path(cfg).read_text())["prompt"]["source_bank"]).is_file()
        local = c.download_artifacts(r.info.run_id, "prompts/prompts.safetensors", str(world["tmp"] / r.info.run_id))
        tensors, _ = load_prompt_artifact(local)
        assert torch.equal(tensors["prompt.bank.prompts"], bank)      # frozen bank, "order" selection of 2


@pytest.mark.slow
def test_promote_then_predict_and_evaluate_reproduce_the_trial(world, capsys, tmp_path):
    import mlflow
    import pandas as pd

    from crosspt.tasks.data import make_splits
    from crosspt.registry.pyfunc import select_test_examples
    from crosspt.registry.models import _client, load_predictor
    from crosspt.tasks.specs import get_task

    uri = world["uri"]
    code, out, err = run_cli(["promote", "--experiment", "regsearch", "--metric", "best_val_score",
                              "--model-name", "glue-crosspt", "--alias", "champion", "--tracking-uri", uri,
                              "--json"], capsys)
    assert code == 0, err
    promoted = json.loads(out)
    children = _children(world)
    best = max(children, key=lambda r: (r.data.metrics["best_val_score"], -r.info.start_time))
    assert promoted["run_id"] == best.info.run_id and promoted["version"] == "1" and promoted["created"]
    c = _client(uri)
    mv = c.get_model_version_by_alias("glue-crosspt", "champion")
    assert str(mv.version) == "1" and mv.tags["source_run_id"] == best.info.run_id
    assert mv.tags["config_hash"] == best.data.tags["crosspt.config_hash"]

    # idempotent: promoting the same run again adds no version
    code, out, err = run_cli(["promote", "--experiment", "regsearch", "--model-name", "glue-crosspt",
                              "--tracking-uri", uri], capsys)
    assert code == 0 and "already registered" in out and _versions(uri, "glue-crosspt") == 1

    # evaluate = the metric the trial logged, on the same test examples (official dev, data.max_test)
    for task in ("sst2", "rte"):
        code, out, err = run_cli(["evaluate", "--model", "models:/glue-crosspt@champion", "--task", task,
                                  "--data-dir", str(world["data_dir"]), "--tracking-uri", uri], capsys)
        assert code == 0, err
        result = json.loads(out)
        assert result["n_examples"] == 16 and result["version"] == "1"
        assert result["metrics"]["accuracy"] == pytest.approx(best.data.metrics[f"test_{task}_accuracy"], abs=1e-9)
        from crosspt.tasks.data import load_split

        chosen = select_test_examples(load_split(get_task(task), "dev", str(world["data_dir"])), task, 16)
        trial_test = make_splits(task, str(world["data_dir"]), shots=4, seed=0, max_test=16)["test"]
        assert [e.uid for e in chosen] == [e.uid for e in trial_test]

    # the loaded model is the trial's: stored collapsed prompts = prompts rebuilt from the stored state
    predictor = load_predictor("models:/glue-crosspt/1", uri, device="cpu")
    assert predictor.info["source_run_id"] == best.info.run_id
    for task in ("sst2", "rte"):
        assert torch.allclose(predictor.collapsed_prompt(task), predictor.composed[task])

    # predict: --text, and --input files (.jsonl, .csv) -> label names
    code, out, err = run_cli(["predict", "--model", "models:/glue-crosspt@champion", "--task", "sst2",
                              "--text", "a gripping film", "--text", "dull and long", "--tracking-uri", uri], capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    direct = predictor.predict("sst2", ["a gripping film", "dull and long"])
    assert [x["prediction"] for x in lines] == direct and set(direct) <= {"negative", "positive"}
    (tmp_path / "in.jsonl").write_text(json.dumps({"task": "rte", "sentence1": "A man sleeps.",
                                                   "sentence2": "Someone sleeps."}) + "\n" +
                                       json.dumps({"task": "sst2", "text": "a gripping film"}) + "\n")
    code, out, err = run_cli(["predict", "--model", "models:/glue-crosspt@champion", "--input",
                              str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.csv"),
                              "--tracking-uri", uri], capsys)
    assert code == 0, err
    rows = pd.read_csv(tmp_path / "out.csv")
    assert list(rows["prediction"]) == [predictor.predict("rte", ["A man sleeps."], ["Someone sleeps."])[0],
                                        direct[0]]

    # the MLflow pyfunc flavour gives the same predictions
    mlflow.set_tracking_uri(uri)
    try:
        # logged as a model from code: loading it runs stored code and unpickles nothing
        local = Path(mlflow.artifacts.download_artifacts("models:/glue-crosspt@champion"))
        assert not list(local.rglob("*.pkl")) and (local / "MLmodel").read_text().count("model_code_path")
        pyfunc = mlflow.pyfunc.load_model("models:/glue-crosspt@champion")
        got = pyfunc.predict(pd.DataFrame({"task": ["sst2", "rte", "sst2"],
                                           "text": ["a gripping film", "A man sleeps.", "dull and long"],
                                           "text_b": [None, "Someone sleeps.", None]}))
    finally:
        mlflow.set_tracking_uri(None)
    assert list(got) == [direct[0], rows["prediction"][0], direct[1]]

    # PEFT export of the promoted (trained, bank-composed) model: same logits on the T5 backbone
    code, out, err = run_cli(["export-peft", "--model", "models:/glue-crosspt@champion", "--task", "sst2",
                              "--out", str(tmp_path / "peft"), "--tracking-uri", uri], capsys)
    assert code == 0, err
    assert peft_logits_match(predictor, tmp_path / "peft", "sst2", TEXTS, one_by_one=False) < 1e-4


@pytest.mark.slow
def test_alias_conflict_is_refused_unless_forced(world, capsys):
    uri = world["uri"]
    first, second = sorted(_children(world), key=lambda r: r.info.start_time)
    code, out, err = run_cli(["promote", "--run-id", first.info.run_id, "--model-name", "glue-conflict",
                              "--alias", "champion", "--tracking-uri", uri], capsys)
    assert code == 0, err
    code, out, err = run_cli(["promote", "--run-id", second.info.run_id, "--model-name", "glue-conflict",
                              "--alias", "champion", "--tracking-uri", uri], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "points to version 1" in err and "--force" in err
    from crosspt.registry.models import _client

    c = _client(uri)
    assert _versions(uri, "glue-conflict") == 1
    assert str(c.get_model_version_by_alias("glue-conflict", "champion").version) == "1"
    code, out, err = run_cli(["promote", "--run-id", second.info.run_id, "--model-name", "glue-conflict",
                              "--alias", "champion", "--tracking-uri", uri, "--force"], capsys)
    assert code == 0 and "moved from version 1" in out
    assert _versions(uri, "glue-conflict") == 2
    assert str(c.get_model_version_by_alias("glue-conflict", "champion").version) == "2"
    # the reserved alias is refused before anything happens
    code, out, err = run_cli(["promote", "--run-id", first.info.run_id, "--model-name", "glue-conflict",
                              "--alias", "latest", "--tracking-uri", uri], capsys)
    assert code == 2 and "reserved" in err and _versions(uri, "glue-conflict") == 2


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors_and_change_nothing(world, capsys):
    from crosspt.registry.models import _client

    uri = world["uri"]
    c = _client(uri)
    names = ("glue-sources", "glue-crosspt", "glue-conflict")
    before = {n: _versions(uri, n) for n in names}
    models = sorted(m.name for m in c.search_registered_models())
    # a run without prompt artifacts (the source pre-training parent run holds a bank, no prompts/)
    cases = [
        (["promote", "--run-id", world["sources"]["run_id"], "--model-name", "glue-crosspt",
          "--tracking-uri", uri, "--force"], "has no prompt artifact"),
        (["promote", "--run-id", world["sources"]["run_id"], "--model-name", "brand-new-model",
          "--tracking-uri", uri], "has no prompt artifact"),
        (["predict", "--model", "models:/no-such-model@champion", "--task", "sst2", "--text", "x",
          "--tracking-uri", uri], "no registered model 'no-such-model'"),
        (["evaluate", "--model", "models:/glue-sources@nope", "--task", "sst2", "--tracking-uri", uri],
         "has no alias 'nope'"),
        (["predict", "--model", "models:/glue-sources@current", "--task", "sst2", "--text", "x",
          "--tracking-uri", uri], "is a source-prompt bank"),
        (["promote", "--experiment", "no-such-experiment", "--model-name", "glue-crosspt",
          "--tracking-uri", uri], "no experiment 'no-such-experiment'"),
    ]
    if _versions(uri, "glue-crosspt"):
        cases.append((["predict", "--model", "models:/glue-crosspt/1", "--task", "cola", "--text", "x",
                       "--tracking-uri", uri], "not trained on task 'cola'"))
    for argv, message in cases:
        code, out, err = run_cli(argv, capsys)
        assert code == 2, (argv, out, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err
    assert {n: _versions(uri, n) for n in names} == before
    assert sorted(m.name for m in c.search_registered_models()) == models
    assert issubclass(__import__("crosspt.registry.models", fromlist=["RegistryError"]).RegistryError, CrossPTError)
