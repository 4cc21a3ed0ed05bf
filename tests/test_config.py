"""The run schema: defaults validate, bad input names the key."""
from pathlib import Path

import pytest

from crosspt.config.schema import RunConfig, config_hash, config_to_yaml, flatten, load_config, config_to_dict
from crosspt.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("tasks: [sst2, rte]\nprompt:\n  n_sources: 2\n  private_len: 8\n")
    cfg = load_config(f, ["prompt.top_k=2", "optim.prompt_lr=0.1", "tasks=[rte]"])
    assert cfg.tasks == ["rte"] and cfg.prompt.top_k == 2 and cfg.optim.prompt_lr == 0.1
    assert cfg.prompt.n_candidates == 3


@pytest.mark.parametrize("text,overrides,needle", [
    ("prompt:\n  bogus: 1\n", [], "prompt.bogus"),
    ("prompt:\n  private_len: many\n", [], "prompt.private_len"),
    ("prompt: {n_sources: 1, private_len: 4}\n", ["prompt.top_k=5"], "top_k"),
    ("prompt: {n_sources: 0, private_len: 0}\n", [], "private_len"),
    ("prompt: {composition: sum}\n", [], "prompt.composition"),
    ("tasks: []\n", [], "tasks"),
    ("prompt: {temperature: {start: 1.0, floor: 2.0}}\n", [], "temperature"),
])
def test_bad_configs_name_the_key(tmp_path, text, overrides, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("prompt:\n  private_len: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml at line"):
        load_config(f)


def test_hash_ignores_paths_but_not_factors():
    a = load_config(None, {"data.data_dir": "/x"})
    b = load_config(None, {"data.data_dir": "/y"})
    c = load_config(None, {"prompt.private_len": 4})
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_flatten_is_scalar_only():
    flat = flatten(config_to_dict(load_config(None, {"tasks": ["sst2", "rte"]})))
    assert flat["tasks"] == "sst2,rte"
    assert all(not isinstance(v, (dict, list)) for v in flat.values())


# config_hash identifies a configuration across versions (MLflow params, stored bundles): these values
# must not move by accident. They moved once on purpose when the router's keys were added
# (prompt.normalization, prompt.temperature.schedule, prompt.router_bias, prompt.include_own_source,
# prompt.placement, optim.source_lr): the default now trains differently (noisy_topk, exp over progress), so it is a new
# configuration. Before: 84dbd5497af3acb9 and 90fb804bb97a4ef5 (still the hashes of those stored configs: see
# test_stored_configs_keep_their_meaning_and_hash). They moved a second time, on purpose, when the default
# prompt.normalization became dirichlet (issue 21): before, 9b2af8f045a47fde and f07268f158b5a48b, which a
# config naming noisy_topk and data.train_pool: all still hashes to (test_noisy_topk_configs_keep_their_hash).
# And a third time with data.train_pool (issue 23): a target's validation sample now comes from the target half
# of the train split, other rows (a config.yaml written before the key keeps its rows and hash:
# test_config_before_train_pool_keeps_its_rows_and_hash in test_trust.py).
_OTHER_FACTORS = {"prompt.composition": "wavg", "prompt.router": "attention", "backbone.family": "encoder",
                  "backbone.dtype": "bfloat16", "prompt.init": "vocab", "prompt.label_semantics": "opaque",
                  "backbone.pair_encoding": "joint", "data.shots_per": "task", "prompt.source_selection": "similar",
                  "prompt.n_sources": 2}


# A fourth time with backbone.template (issue 33): a new config says `auto` (a decoder with a chat template
# reads it), one stored before the key reads `plain` and keeps its hash (the pins before: the `plain` rows).
_PLAIN = {"backbone.template": "plain"}


@pytest.mark.parametrize("overrides,expected", [
    ({}, "51067a9c107b33f9"),
    (_OTHER_FACTORS, "2bdd3ad01bd8f328"),
    ({"prompt.normalization": "noisy_topk", "data.train_pool": "all"}, "0f8030c900766fcc"),
    ({**_OTHER_FACTORS, "prompt.normalization": "noisy_topk", "data.train_pool": "all"}, "28fd48650765a61c"),
    (_PLAIN, "dde546487cc292e3"),
    ({**_OTHER_FACTORS, **_PLAIN}, "486884200ce02cb3"),
    ({"prompt.normalization": "noisy_topk", "data.train_pool": "all", **_PLAIN}, "9b2af8f045a47fde"),
    ({**_OTHER_FACTORS, "prompt.normalization": "noisy_topk", "data.train_pool": "all", **_PLAIN}, "f07268f158b5a48b"),
])
def test_config_hash_is_stable(overrides, expected):
    assert config_hash(load_config(None, overrides)) == expected


@pytest.mark.parametrize("name,old_hash,router", [("default", "84dbd5497af3acb9", "task"),
                                                   ("gated_attention_wavg", "90fb804bb97a4ef5", "attention_gated")])
def test_stored_configs_keep_their_meaning_and_hash(name, old_hash, router):
    """A config.yaml written before the router options (a promoted bundle's, a run's) reads with the rules
    it was trained under, and hashes as it did then, so its prompt artifacts and checkpoints still match."""
    import yaml

    from crosspt.config.schema import build_config, upgrade_stored_tree

    text = (Path(__file__).parent / "stored_configs" / f"{name}.yaml").read_text()
    assert old_hash in text.splitlines()[0]
    cfg = build_config(upgrade_stored_tree(yaml.safe_load(text)), name)
    assert cfg.prompt.normalization == "gate_softmax" and cfg.prompt.temperature.schedule == "step"
    assert cfg.prompt.router == router
    assert config_hash(cfg) == old_hash
    # read as a new config instead, the same file means today's defaults: another configuration
    assert config_hash(build_config(yaml.safe_load(text), name)) != old_hash
    assert upgrade_stored_tree({"prompt": {"normalization": "noisy_topk"}}) == {"prompt": {"normalization": "noisy_topk"}}


def test_noisy_topk_configs_keep_their_meaning_and_hash():
    """A config.yaml written while noisy_topk was the default names it (dumps carry every key): it keeps
    that rule and its hash after the default moved to dirichlet."""
    import yaml

    from crosspt.config.schema import build_config, upgrade_stored_tree

    text = (Path(__file__).parent / "stored_configs" / "noisy_topk_top2.yaml").read_text()
    old_hash = text.splitlines()[0].rsplit(" ", 1)[-1]
    cfg = build_config(upgrade_stored_tree(yaml.safe_load(text)), "noisy_topk_top2")
    assert cfg.prompt.normalization == "noisy_topk" and config_hash(cfg) == old_hash == "255957b4e8617ede"
    assert load_config(None, {}).prompt.normalization == "dirichlet"


def test_options_are_plain_strings_in_config_and_dump():
    cfg = load_config(None, {"prompt.composition": "wavg"})
    for c in (cfg, RunConfig()):
        for section in (c.backbone, c.data, c.prompt):
            for key, value in section.__dict__.items():
                assert type(value) in (str, int, float, bool, list, type(None)) or hasattr(value, "model_dump"), key
    assert f"{cfg.prompt.composition}/{RunConfig().prompt.router}" == "wavg/task"
    assert "composition: wavg\n" in config_to_yaml(cfg) and "family: auto\n" in config_to_yaml(cfg)


@pytest.mark.parametrize("key,bad", [("backbone.family", "lstm"), ("backbone.pair_encoding", "cross"),
                                     ("prompt.router", "mlp"), ("prompt.init", "zeros"),
                                     ("prompt.label_semantics", "emoji"), ("data.shots_per", "epoch")])
def test_bad_option_names_the_key_and_the_choices(key, bad):
    with pytest.raises(ConfigError) as e:
        load_config(None, {key: bad})
    assert f"'{key}'" in str(e.value) and "Input should be" in str(e.value)


def test_a_source_bank_fixes_the_source_length(tmp_path):
    """A bank holds prompts of one length: searching prompt.source_len over it is refused up front (every
    trial asking another length failed at its first step)."""
    import yaml

    from crosspt.config.space import load_space

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "s", "base": {"prompt": {"n_sources": 1, "source_bank": "models:/b@current"}},
                                 "space": {"prompt.source_len": {"type": "choice", "values": [4, 8]}}}))
    with pytest.raises(ConfigError, match="source_len.*one length"):
        load_space(f)


def test_search_trials_cap_the_test_split_and_leave_generation_off():
    """A space's trials score at most `budget.max_test` test examples per task and skip the generated metrics,
    unless the base says otherwise; a plain run keeps the whole dev split and generation."""
    from crosspt.config.space import SearchSpace

    base = {"tasks": ["rte"], "backbone": {"name": "minilm"}}
    tree = {"name": "s", "base": base, "space": {"optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.1}}}
    cfg = SearchSpace.model_validate(tree).config_for({"optim.prompt_lr": 0.01})
    assert cfg.data.max_test == 1000 and cfg.train.generated_metrics is False
    assert SearchSpace.model_validate({**tree, "budget": {"max_test": 50}}).base_config().data.max_test == 50
    own = SearchSpace.model_validate({**tree, "base": {**base, "data": {"max_test": None},
                                                       "train": {"generated_metrics": True}}})
    assert own.base_config().data.max_test is None and own.base_config().train.generated_metrics is True
    plain = load_config(None, {})
    assert plain.data.max_test is None and plain.train.generated_metrics is True
    # whether the generated metrics are computed changes no learned value: the same configuration
    assert config_hash(load_config(None, {"train.generated_metrics": False})) == config_hash(plain)


def test_decoder_template_is_plain_for_stored_configs_and_only_read_on_decoders():
    """A config stored before `backbone.template` read the plain format: it keeps that meaning and its hash
    (a promoted decoder bundle would otherwise be rendered through the chat template it never saw); a new
    config defaults to auto; the key is dead on an encoder and live on a decoder."""
    import yaml

    from crosspt.config.liveness import is_live
    from crosspt.config.schema import build_config, upgrade_stored_tree

    text = (Path(__file__).parent / "stored_configs" / "default.yaml").read_text()
    cfg = build_config(upgrade_stored_tree(yaml.safe_load(text)), "default")
    assert cfg.backbone.template == "plain" and config_hash(cfg) == "84dbd5497af3acb9"
    fresh = load_config(None, {})
    assert fresh.backbone.template == "auto"
    assert config_hash(load_config(None, {"backbone.template": "chat"})) != config_hash(fresh)
    assert not is_live("backbone.template", fresh, family="encoder")
    assert is_live("backbone.template", fresh, family="decoder")
    with pytest.raises(ConfigError, match="backbone.template"):
        load_config(None, {"backbone.template": "jinja"})


def test_backbone_preset_fills_only_what_a_config_leaves_unset():
    """`--backbone smollm2` gets its preset (validation rows, epochs, patience, prompt lr) where the config says
    nothing; a value the config names wins, an explicit null too; other backbones and stored full dumps keep
    the schema's defaults / their own values."""
    from crosspt.config.schema import BACKBONE_PRESETS, build_config, config_to_dict

    preset = BACKBONE_PRESETS["smollm2"]
    cfg = load_config(None, ["backbone.name=smollm2", "data.shots=16"])
    assert (cfg.data.val_shots, cfg.train.epochs, cfg.train.patience, cfg.optim.prompt_lr) == (
        preset["data.val_shots"], preset["train.epochs"], preset["train.patience"], preset["optim.prompt_lr"])
    mine = load_config(None, ["backbone.name=SmolLM2", "train.epochs=2", "data.val_shots=null", "optim.prompt_lr=0.5"])
    assert (mine.data.val_shots, mine.train.epochs, mine.optim.prompt_lr) == (None, 2, 0.5)
    assert mine.train.patience == preset["train.patience"]
    default = load_config(None, {})
    assert (default.data.val_shots, default.train.epochs, default.train.patience, default.optim.prompt_lr) == \
        (None, 20, 5, 0.03)
    stored = config_to_dict(load_config(None, ["backbone.name=minilm"]))
    stored["backbone"]["name"] = "smollm2"              # a dump names every key: nothing is filled in
    assert build_config(stored).train.epochs == 20 and stored["train"]["epochs"] == 20
