"""Config: defaults, YAML, --set, every official flag of SPEC §9, validation errors, recipes, derived values."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math

import pytest

from swav.cli.pretrain import _add_arguments, resolve_config
from swav.config import (Config, apply_overrides, config_from_dict, config_keys, config_to_dict, load_config_file,
                         save_config, with_values)
from swav.derived import derive_values
from swav.official_flags import OFFICIAL_FLAGS
from swav.recipes import available_recipes, load_recipe, recipe_dict


def parse(argv):
    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    args = parser.parse_args(argv)
    args.demo = False
    return resolve_config(args)[0]


def test_defaults_are_the_official_script_defaults():
    c = Config()
    assert (c.crops.counts, c.crops.sizes, c.crops.min_scales, c.crops.max_scales) == ((2,), (224,), (0.14,), (1.0,))
    assert (c.swav.crops_for_assign, c.swav.temperature, c.swav.epsilon, c.swav.sinkhorn_iterations) == ((0, 1), 0.1, 0.05, 3)
    assert (c.model.output_dim, c.model.num_prototypes, c.model.hidden_dim, c.model.backbone) == (128, (3000,), 2048, "resnet50")
    assert (c.swav.queue_length, c.swav.queue_start_epoch, c.swav.freeze_prototypes_steps) == (0, 15, 313)
    o = c.optim
    assert (o.epochs, o.batch_size_per_device, o.base_lr, o.final_lr, o.weight_decay) == (100, 64, 4.8, 0.0, 1e-6)
    assert (o.warmup_epochs, o.start_warmup, o.momentum, o.lars, o.trust_coefficient) == (10, 0.0, 0.9, True, 0.001)
    assert (c.data.workers, c.run.seed, c.run.sync_bn, c.run.sync_bn_group_size, c.run.keep_every_epochs) == (10, 31, True, 8, 25)


# every official flag with a value different from its default, and the field it must land in
OFFICIAL_ARGV = [
    ("--data_path", ["/data/imagenet"], "data.path", "/data/imagenet"),
    ("--nmb_crops", ["2", "6"], "crops.counts", (2, 6)),
    ("--size_crops", ["224", "96"], "crops.sizes", (224, 96)),
    ("--min_scale_crops", ["0.14", "0.05"], "crops.min_scales", (0.14, 0.05)),
    ("--max_scale_crops", ["1.", "0.14"], "crops.max_scales", (1.0, 0.14)),
    ("--crops_for_assign", ["0", "1"], "swav.crops_for_assign", (0, 1)),
    ("--temperature", ["0.2"], "swav.temperature", 0.2),
    ("--epsilon", ["0.03"], "swav.epsilon", 0.03),
    ("--sinkhorn_iterations", ["5"], "swav.sinkhorn_iterations", 5),
    ("--feat_dim", ["64"], "model.output_dim", 64),
    ("--nmb_prototypes", ["300"], "model.num_prototypes", (300,)),
    ("--queue_length", ["3840"], "swav.queue_length", 3840),
    ("--epoch_queue_starts", ["10"], "swav.queue_start_epoch", 10),
    ("--epochs", ["200"], "optim.epochs", 200),
    ("--batch_size", ["32"], "optim.batch_size_per_device", 32),
    ("--base_lr", ["0.6"], "optim.base_lr", 0.6),
    ("--final_lr", ["0.0006"], "optim.final_lr", 0.0006),
    ("--freeze_prototypes_niters", ["5005"], "swav.freeze_prototypes_steps", 5005),
    ("--wd", ["1e-5"], "optim.weight_decay", 1e-5),
    ("--warmup_epochs", ["5"], "optim.warmup_epochs", 5.0),
    ("--start_warmup", ["0.3"], "optim.start_warmup", 0.3),
    ("--dist_url", ["tcp://10.0.0.1:40000"], "run.dist_url", "tcp://10.0.0.1:40000"),
    ("--world_size", ["64"], "run.world_size", 64),
    ("--rank", ["3"], "run.rank", 3),
    ("--local_rank", ["2"], "run.local_rank", 2),
    ("--arch", ["resnet50w2"], "model.backbone", "resnet50w2"),
    ("--hidden_mlp", ["8192"], "model.hidden_dim", 8192),
    ("--workers", ["4"], "data.workers", 4),
    ("--checkpoint_freq", ["10"], "run.keep_every_epochs", 10),
    ("--use_fp16", ["false"], "run.precision", "fp32"),
    ("--sync_bn", ["none"], "run.sync_bn", False),
    ("--syncbn_process_group_size", ["4"], "run.sync_bn_group_size", 4),
    ("--dump_path", ["/exp/swav"], "run.output_dir", "/exp/swav"),
    ("--seed", ["7"], "run.seed", 7),
]


def field(config, key):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def test_every_official_flag_lands_in_its_field():
    assert {flag[2:] for flag, *_ in OFFICIAL_ARGV} == set(OFFICIAL_FLAGS)
    argv = [item for flag, values, *_ in OFFICIAL_ARGV for item in (flag, *values)]
    config = parse(argv)
    for flag, _, key, expected in OFFICIAL_ARGV:
        assert field(config, key) == expected, flag
    # an official launch line of the batch-256 run, unchanged
    line = ("--data_path /d --epochs 200 --base_lr 0.6 --final_lr 0.0006 --warmup_epochs 0 --batch_size 64 "
            "--size_crops 224 96 --nmb_crops 2 6 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14 "
            "--use_fp16 true --freeze_prototypes_niters 5005 --queue_length 3840 --epoch_queue_starts 15")
    c = parse(line.split())
    assert (c.run.precision, c.swav.queue_length, c.crops.counts, c.optim.warmup_epochs) == ("fp16", 3840, (2, 6), 0)


def test_sync_bn_pytorch_is_global_and_apex_uses_the_group_size():
    # the original: pytorch converts BatchNorm over all processes; apex uses --syncbn_process_group_size (8)
    assert (parse(["--sync_bn", "pytorch"]).run.sync_bn_group_size, parse(["--sync_bn", "apex"]).run.sync_bn_group_size) \
        == (0, 8)
    assert parse(["--sync_bn", "pytorch", "--syncbn_process_group_size", "4"]).run.sync_bn_group_size == 4
    from swav.train import _sync_bn_group
    assert _sync_bn_group(0, 64) is None  # None: every rank together
    with pytest.raises(ValueError, match="or 0 for all ranks"):
        apply_overrides(Config(), ["run.sync_bn_group_size=-1"])


@pytest.mark.parametrize("word,value", [("true", True), ("false", False), ("on", True), ("off", False),
                                        ("1", True), ("0", False), ("True", True), ("OFF", False)])
def test_booleans_in_every_spelling(word, value):
    assert apply_overrides(Config(), [f"run.sync_bn={word}"]).run.sync_bn is value
    assert parse(["--sync_bn", word]).run.sync_bn is value
    assert parse(["--use_fp16", word]).run.precision == ("fp16" if value else "fp32")


def test_contract_flags_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  base_lr: 0.3\n  epochs: 7\ncrops:\n  counts: [2, 4]\n  sizes: [64, 32]\n"
                    "  min_scales: [0.2, 0.1]\n  max_scales: [1, 0.4]\n")
    c = parse(["--recipe", "swav_200ep_bs256", "--config", str(path), "--data", "/imgs", "--output-dir", "/o",
               "--epochs", "9", "--batch-size", "16", "--workers", "2", "--seed", "5", "--device", "cpu",
               "--set", "optim.epochs=11", "--set", "model.num_prototypes=[30, 40]"])
    assert c.swav.queue_length == 3840  # from the recipe
    assert c.optim.base_lr == 0.3 and c.crops.sizes == (64, 32)  # the file overrides the recipe
    assert (c.data.path, c.run.output_dir, c.optim.batch_size_per_device, c.data.workers, c.run.seed) == \
        ("/imgs", "/o", 16, 2, 5)
    assert c.optim.epochs == 11  # --set wins over --epochs
    assert c.model.num_prototypes == (30, 40) and c.run.device == "cpu"


def test_unknown_keys_suggest_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.base_lrr'; did you mean 'optim\.base_lr'"):
        apply_overrides(Config(), ["optim.base_lrr=0.1"])
    with pytest.raises(ValueError, match=r"'swav\.epsillon'.*'swav\.epsilon'.*valid keys of section 'swav'"):
        config_from_dict({"swav": {"epsillon": 0.03}})
    with pytest.raises(ValueError, match=r"unknown config key 'optimizer'.*valid sections: data, crops"):
        config_from_dict({"optimizer": {}})
    path = tmp_path / "bad.yaml"
    path.write_text("crops:\n  count: [2]\n")
    with pytest.raises(ValueError, match=rf"{path}.*'crops\.count'.*did you mean 'crops\.counts'"):
        load_config_file(path)
    with pytest.raises(ValueError, match="expected section.key=value"):
        apply_overrides(Config(), ["base_lr=3"])


@pytest.mark.parametrize("values,message", [
    ({"crops.counts": [2, 6]}, r"crops\.sizes=\[224\] has 1 entries but crops\.counts=\[2, 6\] has 2"),
    ({"crops.min_scales": [0.5], "crops.max_scales": [0.4]}, r"crops\.min_scales\[0\]=0\.5 is larger than crops\.max_scales\[0\]=0\.4"),
    ({"crops.max_scales": [1.5]}, r"crops\.min_scales\[0\]/max_scales\[0\]"),
    ({"swav.crops_for_assign": [0, 2]}, r"crops_for_assign=\[0, 2\] has ids \[2\] out of range.*0\.\.1"),
    ({"swav.crops_for_assign": [1, 1]}, r"crops_for_assign.*distinct"),
    ({"crops.counts": [1]}, r"at least 2 crops"),
    ({"model.num_prototypes": 0}, r"model\.num_prototypes"),
    ({"model.num_prototypes": [100, 0]}, r"model\.num_prototypes"),
    ({"swav.queue_length": 10}, r"swav\.queue_length=10 is shorter than one batch"),
    ({"swav.epsilon": 0}, r"swav\.epsilon=0\.0 is invalid"),
    ({"optim.warmup_epochs": 200}, r"optim\.warmup_epochs=200\.0 is invalid: expected a value in \[0, optim\.epochs=100\]"),
    ({"optim.epochs": "ten"}, r"optim\.epochs='ten' is invalid: expected an integer"),
    ({"run.sync_bn": "maybe"}, r"run\.sync_bn='maybe' is invalid: expected a boolean"),
    ({"run.precision": "fp8"}, r"run\.precision='fp8'"),
    ({"data.channels": 2}, r"data\.channels=2"),
    ({"data.mean": [0.5, 0.5]}, r"data\.mean=\(0\.5, 0\.5\) is invalid: expected 3 value"),
])
def test_inconsistent_values_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        with_values(Config(), values)


def test_config_is_frozen_and_round_trips(tmp_path):
    c = load_recipe("swav_400ep_bs256")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.optim.base_lr = 1.0  # type: ignore[misc]
    save_config(c, tmp_path / "c.yaml")
    assert load_config_file(tmp_path / "c.yaml") == c
    assert config_from_dict(config_to_dict(c)) == c
    assert len(config_keys()) == len(set(config_keys())) > 60


# SPEC §9 table: epochs, global batch (per device x devices), crops, lr, warm-up, queue, freeze
SPEC_TABLE = {
    "swav_100ep": (100, 64, (2, 6), (224, 96), 4.8, 0.0048, 10, 0.3, 0, 313),
    "swav_200ep": (200, 64, (2, 6), (224, 96), 4.8, 0.0048, 10, 0.3, 0, 313),
    "swav_400ep": (400, 64, (2, 6), (224, 96), 4.8, 0.0048, 10, 0.3, 0, 313),
    "swav_800ep": (800, 64, (2, 6), (224, 96), 4.8, 0.0048, 10, 0.3, 0, 313),
    "swav_400ep_2x224": (400, 64, (2,), (224,), 4.8, 0.0048, 10, 0.3, 0, 313),
    "swav_200ep_bs256": (200, 64, (2, 6), (224, 96), 0.6, 0.0006, 0, 0.0, 3840, 5005),
    "swav_400ep_bs256": (400, 64, (2, 6), (224, 96), 0.6, 0.0006, 0, 0.0, 3840, 5005),
    "swav_rn50w2_400ep": (400, 32, (2, 4), (224, 96), 4.8, 0.0048, 10, 0.3, 0, 313),
    "swav_rn50w4_400ep": (400, 40, (2, 4), (224, 96), 4.8, 0.0048, 10, 0.3, 2560, 313),
}


def test_every_recipe_loads_validates_and_matches_spec():
    names = available_recipes()
    assert set(SPEC_TABLE) | {"cifar10", "fashion_mnist_cpu"} <= set(names)
    for name in names:
        config = load_recipe(name)
        assert isinstance(config, Config) and recipe_dict(name)
    for name, row in SPEC_TABLE.items():
        c = load_recipe(name)
        got = (c.optim.epochs, c.optim.batch_size_per_device, c.crops.counts, c.crops.sizes, c.optim.base_lr,
               c.optim.final_lr, c.optim.warmup_epochs, c.optim.start_warmup, c.swav.queue_length,
               c.swav.freeze_prototypes_steps)
        assert got == row, name
        assert (c.swav.temperature, c.swav.epsilon, c.swav.sinkhorn_iterations, c.model.output_dim,
                c.model.num_prototypes, c.optim.weight_decay) == (0.1, 0.05, 3, 128, (3000,), 1e-6), name
    assert load_recipe("swav_rn50w4_400ep").swav.queue_start_epoch == 0
    assert load_recipe("swav_rn50w4_400ep").crops.min_scales == (0.08, 0.08)  # --min_scale_crops 0.08 0.08
    assert load_recipe("swav_400ep_2x224").crops.min_scales == (0.08,)
    assert load_recipe("swav_rn50w2_400ep").model.hidden_dim == 8192
    assert load_recipe("fashion_mnist_cpu").data.channels == 1
    with pytest.raises(ValueError, match="unknown recipe 'swav_100'.*Did you mean swav_100ep"):
        load_recipe("swav_100")


def test_derived_values_and_queue_rounding(caplog):
    c = with_values(Config(), {"swav.queue_length": 4000, "optim.batch_size_per_device": 64})
    with caplog.at_level(logging.WARNING):
        d = derive_values(c, world_size=4, dataset_size=1_281_167, device="cpu", precision="fp32", pipeline="pil")
    assert "rounded down to 3840" in caplog.text
    assert (d.global_batch_size, d.queue_length_global, d.queue_length_per_rank) == (256, 3840, 960)
    assert d.steps_per_epoch == 1_281_167 // 4 // 64 and d.total_steps == 100 * d.steps_per_epoch
    assert d.warmup_steps == 10 * d.steps_per_epoch and math.isclose(d.collapse_loss, math.log(3000))
    heads = with_values(Config(), {"model.num_prototypes": [10, 1000]})
    assert math.isclose(derive_values(heads, world_size=1, dataset_size=640, device="cpu", precision="fp32",
                                      pipeline="pil").collapse_loss, (math.log(10) + math.log(1000)) / 2)
    with pytest.raises(ValueError, match="queue_length=100 is shorter than the global batch 256"):
        derive_values(with_values(c, {"swav.queue_length": 100}), world_size=4, dataset_size=10_000, device="cpu",
                      precision="fp32", pipeline="pil")
    with pytest.raises(ValueError, match="fewer than one batch"):
        derive_values(c, world_size=4, dataset_size=200, device="cpu", precision="fp32", pipeline="pil")


@pytest.mark.parametrize("values,warned", [({"swav.epsilon": 0.01, "swav.log_domain": False}, True),
                                           ({"swav.epsilon": 0.01}, False),
                                           ({"swav.epsilon": 0.03, "swav.log_domain": False}, False)])
def test_exp_form_forced_below_its_safe_epsilon_is_warned(caplog, values, warned):
    c = with_values(Config(), values)
    with caplog.at_level(logging.WARNING):
        derive_values(c, world_size=1, dataset_size=640, device="cpu", precision="fp32", pipeline="pil")
    assert ("can underflow" in caplog.text) == warned
    assert with_values(Config(), {"swav.log_domain": "null"}).swav.log_domain is None


def test_a_temperature_that_keeps_the_loss_at_ln_k_is_warned(caplog):
    for temperature, warned in ((5.0, True), (0.1, False), (1.0, False)):
        caplog.clear()
        c = with_values(Config(), {"swav.temperature": temperature, "model.num_prototypes": 300})
        with caplog.at_level(logging.WARNING):
            derive_values(c, world_size=1, dataset_size=640, device="cpu", precision="fp32", pipeline="pil")
        assert ("predictions cannot sharpen" in caplog.text) == warned, temperature


def test_a_queue_as_long_as_the_data_set_is_warned(caplog):
    c = with_values(Config(), {"swav.queue_length": 512, "optim.batch_size_per_device": 64})
    for size, warned in ((512, True), (5120, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            derive_values(c, world_size=1, dataset_size=size, device="cpu", precision="fp32", pipeline="pil")
        assert ("holds at least a whole epoch" in caplog.text) == warned, size


def test_an_old_run_with_log_domain_false_is_the_same_run_where_the_exp_form_runs_anyway():
    from swav.config import config_to_dict
    from swav.run_folder import resume_differences, run_differences
    saved = config_to_dict(with_values(Config(), {"swav.log_domain": False}))  # the default before null existed
    assert run_differences(saved, Config()) == [] and resume_differences(saved, Config()) == ([], [])
    small = {"swav.epsilon": 0.01}  # there null means the log domain: a real difference
    saved = config_to_dict(with_values(Config(), {**small, "swav.log_domain": False}))
    assert run_differences(saved, with_values(Config(), small)) == [
        "swav.log_domain: folder False, this command True"]


def test_a_requeued_job_on_other_nodes_is_the_same_run():
    """Official SLURM launch lines pass --dist_url tcp://$master_node:40000 and --world_size from the
    allocation: a requeue on another first node or node count still continues the run by itself."""
    from swav.config import config_to_dict
    from swav.run_folder import run_differences
    saved = config_to_dict(with_values(Config(), {"run.dist_url": "tcp://node017:40000", "run.world_size": 16}))
    again = with_values(Config(), {"run.dist_url": "tcp://node023:40000", "run.world_size": 8,
                                   "run.dist_timeout_minutes": 5.0})
    assert run_differences(saved, again) == []
    assert run_differences(saved, with_values(again, {"run.seed": 4})) == ["run.seed: folder 31, this command 4"]


def test_a_checkpoint_written_before_a_setting_existed_compares_as_its_default():
    from swav.config import config_to_dict
    from swav.run_folder import resume_differences
    saved = config_to_dict(Config())
    del saved["data"]["compile_colour"], saved["data"]["prefetch_batches"]  # added by later versions
    assert resume_differences(saved, Config()) == ([], [])
    changed = with_values(Config(), {"data.prefetch_batches": 2})
    assert resume_differences(saved, changed) == ([], ["data.prefetch_batches: checkpoint None, config 2"])
    assert resume_differences(saved, with_values(Config(), {"data.compile_colour": True})) == ([], [])  # ignored


@pytest.mark.parametrize("key", ["run.precision", "run.check_sync", "data.pipeline", "run.device"])
def test_null_for_a_word_setting_says_to_write_auto(key):
    from swav.config import Config, with_values

    with pytest.raises(ValueError, match=f"{key}=None is invalid: expected a string .*, not null .* write auto"):
        with_values(Config(), {key: None})
    section, name = key.split(".")
    assert getattr(getattr(with_values(Config(), {key: "auto"}), section), name) == "auto"  # the word is accepted


def test_config_files_apply_in_order_and_a_key_given_twice_is_refused(tmp_path):
    """--config twice: both files apply, the later one's values win (the first used to be dropped silently);
    a YAML key given twice in one file is an error (PyYAML would keep the last one silently)."""
    base, change = tmp_path / "base.yaml", tmp_path / "change.yaml"
    base.write_text("swav:\n  epsilon: 0.03\n  temperature: 0.2\n")
    change.write_text("swav:\n  temperature: 0.15\n")
    config = parse(["--config", str(base), "--config", str(change), "--data", "x"])
    assert (config.swav.epsilon, config.swav.temperature) == (0.03, 0.15)
    twice = tmp_path / "twice.yaml"
    twice.write_text("swav:\n  epsilon: 0.03\n  temperature: 0.2\n  epsilon: 0.05\n")
    with pytest.raises(ValueError, match="'epsilon' is given twice \\(first at line 2\\)"):
        parse(["--config", str(twice), "--data", "x"])
    twice.write_text("swav:\n  epsilon: 0.03\noptim:\n  epochs: 2\nswav:\n  temperature: 0.2\n")
    with pytest.raises(ValueError, match="'swav' is given twice"):
        load_config_file(twice)


@pytest.mark.parametrize("key,value", [("swav.epsilon", float("inf")), ("swav.temperature", float("inf")),
                                       ("run.time_budget_minutes", float("nan")),
                                       ("crops.color_jitter_strength", float("-inf"))])
def test_no_setting_takes_nan_or_an_infinity(key, value):
    """swav.epsilon=.inf trained silently on uniform codes (prototypes in use 1 of K)."""
    with pytest.raises(ValueError, match=f"{key}=.* is invalid: expected a finite number"):
        with_values(Config(), {key: value})


def test_an_original_flag_name_in_a_config_file_points_to_its_key(tmp_path):
    path = tmp_path / "official.yaml"
    path.write_text("nmb_crops: [2, 6]\n")
    with pytest.raises(ValueError, match="did you mean 'crops.counts'\\? \\('nmb_crops' is the original --nmb_crops"):
        load_config_file(path)
    path.write_text("model:\n  arch: resnet50\n")
    with pytest.raises(ValueError, match="did you mean 'model.backbone'"):
        load_config_file(path)


def test_paths_may_be_pathlib_objects(tmp_path):
    config = with_values(Config(), {"data.path": tmp_path / "images", "run.output_dir": tmp_path / "run"})
    assert (config.data.path, config.run.output_dir) == (str(tmp_path / "images"), str(tmp_path / "run"))


def test_a_run_on_another_global_batch_than_its_recipe_is_warned(caplog):
    """swav_800ep's base_lr 4.8 is for 64 x 64 = 4096 images per step: on 8 GPUs (512) it may not fit."""
    import logging

    config = load_recipe("swav_800ep")
    assert config.optim.lr_global_batch == 4096
    for world, warned in ((64, False), (8, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            derive_values(config, world_size=world, dataset_size=1_281_167, device="cuda", precision="bf16",
                          pipeline="device")
        assert ("was set for a global batch of 4096" in caplog.text) == warned, world
    assert "Run on 64 processes of 64" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # not stated (the defaults, a user's own config): no warning
        derive_values(Config(), world_size=1, dataset_size=10_000, device="cpu", precision="fp32", pipeline="pil")
    assert "was set for a global batch" not in caplog.text


def test_zero_sinkhorn_iterations_are_accepted_as_by_the_original():
    assert with_values(Config(), {"swav.sinkhorn_iterations": 0}).swav.sinkhorn_iterations == 0
    with pytest.raises(ValueError, match="swav.sinkhorn_iterations=-1 is invalid"):
        with_values(Config(), {"swav.sinkhorn_iterations": -1})


def test_yaml_merge_keys_still_load_and_may_be_overridden(tmp_path):
    """The duplicate-key check must not break YAML anchors and merge keys (`<<: *base`), whose merged keys a
    mapping may override."""
    path = tmp_path / "anchors.yaml"
    path.write_text("swav: &swav\n  epsilon: 0.03\n  temperature: 0.2\n")
    from swav.config import load_yaml_text
    assert load_yaml_text("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  y: 3\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 3}}
    with pytest.raises(Exception, match="'y' is given twice"):
        load_yaml_text("b:\n  <<: {x: 1}\n  y: 3\n  y: 4\n")
    assert load_config_file(path).swav.epsilon == 0.03
