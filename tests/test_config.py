"""The run schema: defaults validate, bad input names the key."""
import pytest

from crosspt.config.schema import config_hash, flatten, load_config, config_to_dict
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
