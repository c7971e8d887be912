"""The recipes (YAML + command line through one parser) and the shipped launch configs, on a tiny saved model."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from trainer_setup import POOL_FILE, REPO, TARGET_FILE, demo_tokenizer, tiny_model

from hfinfluence.errors import ConfigError, MissingColumnError
from hfinfluence.trainer import InfluenceTrainingArguments

sys.path.insert(0, str(REPO / "recipes"))
import finetune  # noqa: E402
import pretrain  # noqa: E402
from recipe_utils import ModelArguments, parse_with_config  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    tiny_model(dtype=torch.float32).save_pretrained(folder)
    demo_tokenizer().save_pretrained(folder)
    return folder


def common_flags(tmp_path, checkpoint) -> list[str]:
    return [
        "--model_name_or_path", str(checkpoint),
        "--train_file", str(POOL_FILE),
        "--target_file", str(TARGET_FILE),
        "--output_dir", str(tmp_path / "out"),
        "--report_to", "none",
        "--max_steps", "3",
        "--per_device_train_batch_size", "2",
        "--max_target_rows", "8",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def test_yaml_gives_defaults_and_flags_override_them(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "selection": "reweight", "tau": 0.5, "lora_r": 4}))
    model_args, args = parse_with_config(
        (ModelArguments, InfluenceTrainingArguments), ["--config", str(config), "--tau", "2.0"]
    )
    assert (args.selection, args.tau, model_args.lora_r) == ("reweight", 2.0, 4)

    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "keep_ration": 0.5}))
    with pytest.raises(ConfigError, match="keep_ration"):
        parse_with_config((ModelArguments, InfluenceTrainingArguments), ["--config", str(config)])


@pytest.mark.parametrize("config", ["finetune_demo", "finetune_reweight", "finetune_lora", "pretrain_demo"])
def test_shipped_recipe_configs_parse(config):
    recipe = pretrain if config.startswith("pretrain") else finetune
    data_class = pretrain.TextArguments if recipe is pretrain else finetune.DataArguments
    parsed = parse_with_config(
        (ModelArguments, data_class, InfluenceTrainingArguments),
        ["--config", str(REPO / "recipes" / "configs" / f"{config}.yaml"), "--report_to", "none"],
    )
    assert parsed[2].influence_config() is not None


def test_finetune_recipe_runs_and_summarises(tmp_path, tiny_checkpoint, capsys):
    flags = common_flags(tmp_path, tiny_checkpoint)
    summary = finetune.main(
        [
            *flags,
            "--config",
            str(REPO / "recipes/configs/finetune_demo.yaml"),
            "--max_length",
            "32",
            "--modules",
            "*.mlp.*_proj",
            "*.self_attn.*_proj",
        ]
    )

    assert summary["examples_seen"] == 3 * 8 and summary["examples_kept"] == 3 * 2
    assert summary["target_families"] == ["gsm8k"]
    assert summary["family_share"]["pool"] == pytest.approx(60 / 324)
    assert 0 <= summary["family_share"]["kept"] <= 1
    assert summary["target_loss_before"] > 0 and summary["target_loss_after"] > 0
    saved = json.loads((tmp_path / "out" / "influence_summary.json").read_text())
    assert saved["examples_seen"] == 24
    printed = capsys.readouterr().out
    assert "gsm8k share   pool 18.5%" in printed and "target loss" in printed


def test_finetune_recipe_refuses_a_target_without_the_prompt_field(tmp_path, tiny_checkpoint):
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"question": "1 + 1 ?", "completion": " 2"}) + "\n" for _ in range(4)))
    flags = common_flags(tmp_path, tiny_checkpoint)
    flags[flags.index("--target_file") + 1] = str(target)
    with pytest.raises(MissingColumnError, match="prompt"):
        finetune.main(flags)
    assert not (tmp_path / "out" / "influence_summary.json").exists()


def test_pretrain_recipe_packs_blocks_and_runs(tmp_path, tiny_checkpoint):
    flags = common_flags(tmp_path, tiny_checkpoint)
    summary = pretrain.main([*flags, "--block_size", "24", "--selection_method", "boltzmann"])
    assert summary["blocks"] > 100 and summary["examples_seen"] == 3 * 8
    assert summary["kept_fraction"] == 0.25


@pytest.mark.parametrize("name", ["cpu", "single_gpu", "multi_gpu", "fsdp", "multi_node"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "accelerate_configs" / f"{name}.yaml"))
    expected = {"cpu": 2, "single_gpu": 1, "multi_gpu": 8, "fsdp": 8, "multi_node": 16}[name]
    assert config.num_processes == expected
    if name == "cpu":
        assert config.use_cpu and (REPO / config.mpirun_config["mpirun_hostfile"]).is_file()


@pytest.mark.slow
def test_demo_config_on_the_bundled_model_for_two_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    flags = ["--config", "recipes/configs/finetune_demo.yaml", "--output_dir", str(tmp_path), "--report_to", "none"]
    summary = finetune.main([*flags, "--max_steps", "2", "--max_target_rows", "4"])
    assert summary["examples_seen"] == 8 and summary["examples_kept"] == 2
    assert 0 < summary["target_loss_before"] < 10 and summary["target_loss_after"] != summary["target_loss_before"]
