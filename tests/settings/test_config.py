"""Settings: one error listing every problem, unknown keys rejected, DeepSpeed configs filled and checked."""

import pytest
import yaml

from dsunlearn.runtime.ds_config import build_policy_ds_config, build_reference_ds_config, load_ds_config
from dsunlearn.settings.config import (
    ConfigError,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    TrainConfig,
    parse_run_config,
)


def test_every_problem_is_listed_in_one_error():
    with pytest.raises(ConfigError) as info:
        RunConfig(
            objective=ObjectiveConfig(forget_weight=-1.0, num_random_answers=0),
            train=TrainConfig(max_steps=0, lr=0.0, deepspeed_config="nope.json"),
        )
    message = str(info.value)
    for expected in ("objective.forget_weight=-1.0", "num_random_answers", "train.max_steps=0", "train.lr=0.0",
                     "nope.json"):
        assert expected in message
    assert len(info.value.problems) == 5


def test_cli_and_yaml_parse_with_overrides(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"train": {"lr": 1e-5, "max_steps": 7}, "model": {"precision": "fp32"}}))
    cfg, resolved = parse_run_config(["--config", str(config_file), "--train.lr", "2e-6", "--local_rank=1"])
    assert cfg.train.lr == 2e-6 and cfg.train.max_steps == 7 and cfg.model.precision == "fp32"
    assert cfg.data.forget.format == "pku_saferlhf"
    # The resolved YAML reproduces the run when passed back as --config.
    again, _ = parse_run_config(["--config", _write(tmp_path / "resolved.yaml", resolved)])
    assert again == cfg


def test_unknown_key_and_bad_value_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_run_config(["--train.learning_rate", "1e-5"])
    assert "learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_run_config(["--model.precision", "fp8"])
    with pytest.raises(ConfigError, match="train.max_steps=-3"):
        parse_run_config(["--train.max_steps", "-3"])


def test_ds_config_auto_fields_are_filled_from_the_settings():
    cfg = RunConfig(train=TrainConfig(forget_batch_size=3, gradient_accumulation_steps=2, max_grad_norm=1.0))
    ds = build_policy_ds_config(load_ds_config("ds_configs/zero3.json"), cfg, world_size=4, hidden_size=16)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == 256
    assert "auto" not in str(ds)
    reference = build_reference_ds_config(ds, offload=True)
    assert "optimizer" not in reference and reference["zero_optimization"]["stage"] == 3
    assert reference["zero_optimization"]["offload_param"]["device"] == "cpu"

    offload = build_policy_ds_config(load_ds_config("ds_configs/zero3_offload.json"), cfg, world_size=1, hidden_size=16)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_ds_config_contradicting_the_settings_lists_every_field():
    template = load_ds_config("ds_configs/zero3.json")
    template["train_micro_batch_size_per_gpu"] = 8
    template["bf16"]["enabled"] = False
    template["zero_optimization"]["stage"] = 2
    template["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    cfg = RunConfig(model=ModelConfig(precision="bf16"), train=TrainConfig(forget_batch_size=2))
    with pytest.raises(ConfigError) as info:
        build_policy_ds_config(template, cfg, world_size=1, hidden_size=16)
    message = str(info.value)
    assert "train_micro_batch_size_per_gpu=8" in message and "bf16.enabled=False" in message
    assert "stage" in message and "'optimizer' section" in message


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", ["demo", "demo-copyright", "demo-hallucination", "opt-1.3b-harmful", "hallucination"])
def test_shipped_application_configs_parse(name, tmp_path):
    cfg, _ = parse_run_config(["--config", f"configs/{name}.yaml", "--model.name_or_path", str(tmp_path)])
    expected = {"demo-copyright": "copyright", "demo-hallucination": "hallucination", "hallucination": "hallucination"}
    assert cfg.data.application == expected.get(name, "harmful")


def test_copyright_config_parses_once_its_paths_are_set(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_run_config(["--config", "configs/copyright.yaml"])
    assert any("/path/to/book.txt" in p for p in info.value.problems)  # the placeholders say what to set
    book = tmp_path / "book.txt"
    book.write_text("word " * 200)
    (tmp_path / "model").mkdir()
    cfg, _ = parse_run_config(["--config", "configs/copyright.yaml", "--data.forget.source", str(book),
                               "--model.name_or_path", str(tmp_path / "model")])
    assert (cfg.data.application, cfg.data.forget.format, cfg.data.normal.format) == ("copyright", "book", "book")
    with pytest.raises(ConfigError, match="has 200 words, fewer than one window of 250"):
        parse_run_config(["--config", "configs/copyright.yaml", "--data.forget.source", str(book),
                          "--model.name_or_path", str(tmp_path / "model"), "--data.forget.prefix_words", "150"])
