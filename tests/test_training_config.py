"""Training configs: shipped YAMLs load, unknown keys and bad values fail with one line."""
from __future__ import annotations

from pathlib import Path

import pytest

from supernet.training.config import ConfigError, config_from_dict, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "training" / "configs").glob("*.yaml"))
BASE = {"teacher": {"path": "t"}, "data": {"train": ["x.jsonl"]}}


def test_shipped_configs_load():
    assert len(CONFIGS) >= 3
    stages = {load_config(p).stage for p in CONFIGS}
    assert stages == {"distill", "sft", "transfer"}


def test_overrides_and_stage_check(tmp_path):
    cfg = load_config(CONFIGS[0], ["loss.kl_weight=0.5", "train.max_steps=7", "data.train=[a.jsonl, b.jsonl]"])
    assert cfg.loss.kl_weight == 0.5 and cfg.train.max_steps == 7 and cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    sft = next(p for p in CONFIGS if load_config(p).stage == "sft")
    with pytest.raises(ConfigError, match="says stage 'sft' but this command runs 'distill'"):
        load_config(sft, stage="distill")


@pytest.mark.parametrize("data,message", [
    ({"loss": {"kl_wieght": 1}}, "unknown config key 'loss.kl_wieght'"),
    ({"loss": {"kind": "kl"}}, "loss.kind' is 'kl'; choose one of fkl, rkl, jsd"),
    ({"train": {"max_steps": "many"}}, "train.max_steps' must be an integer"),
    ({"sampling": {"mixers": ["fa", "mamba"]}}, "unknown mixer 'mamba'"),
    ({"teacher": {"source": "self-fa", "path": "t"}}, "self-fa needs frozen fa mixers"),
    ({"teacher": {"source": "offline", "path": "t"}}, "teacher.cache_dir is required"),
    ({"loss": {"kl_weight": 0, "ce_weight": 0}}, "all loss weights are zero"),
    ({"sampling": {"preset_prob": 0.5}}, "needs sampling.presets"),
    ({"distributed": {"layers_per_unit": -1}}, "distributed.layers_per_unit must be >= 0"),
])
def test_bad_configs_name_the_problem(data, message):
    merged = {**BASE, **{k: {**BASE.get(k, {}), **v} for k, v in data.items()}}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_from_dict(merged)


def test_missing_or_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
