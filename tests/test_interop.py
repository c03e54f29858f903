"""Official-release checkpoints: format detection, spec inference, strict/partial loading (SPEC §10, §13)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torchvision

from swav.interop import (
    IncompatibleCheckpointError,
    StateDictDiff,
    diff_state_dict,
    infer_backbone,
    infer_spec,
    is_official_state_dict,
    load_state_checked,
    official_to_ours,
    ours_to_official,
)
from swav.model import ModelSpec, build_model
from swav.pretrained import load_pretrained, read_checkpoint, resolve_pretrained

REFERENCE = Path(__file__).resolve().parent / "data" / "official_checkpoint_keys.json"
HEAD_PREFIXES = ("projection_head.", "prototypes.")


def _reference() -> dict:
    return json.loads(REFERENCE.read_text())


def _random_tensor(key: str, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    """Random values with sane scales, so a 50-layer eval-mode forward stays O(1)."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1000, dtype=torch.long)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if key.endswith("running_mean"):
        return torch.randn(shape, generator=gen) * 0.1
    if len(shape) >= 2:
        return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    if key.endswith(".weight"):
        return torch.rand(shape, generator=gen) * 0.5 + 0.5
    return torch.randn(shape, generator=gen) * 0.1


def _our_key(official_key: str) -> str:
    """Independent statement of the renaming: strip 'module.', prefix the trunk with 'backbone.'."""
    key = official_key.removeprefix("module.")
    return key if key.startswith(HEAD_PREFIXES) else "backbone." + key


@pytest.fixture(scope="module")
def official_resnet50(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    keys = _reference()["resnet50"]["keys"]
    state = {key: _random_tensor(key, shape, gen) for key, shape in keys.items()}
    path = tmp_path_factory.mktemp("official") / "swav_test_pretrain.pth.tar"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def official_resnet18() -> dict[str, torch.Tensor]:
    """A resnet18 in the release's layout, built from torchvision (not from our converter)."""
    trunk = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    state = {f"module.{k}": v for k, v in trunk.items()}
    state.update({
        "module.projection_head.0.weight": torch.randn(32, 512), "module.projection_head.0.bias": torch.randn(32),
        "module.projection_head.1.weight": torch.rand(32), "module.projection_head.1.bias": torch.randn(32),
        "module.projection_head.1.running_mean": torch.randn(32), "module.projection_head.1.running_var": torch.rand(32) + 0.5,
        "module.projection_head.1.num_batches_tracked": torch.tensor(5),
        "module.projection_head.3.weight": torch.randn(8, 32), "module.projection_head.3.bias": torch.randn(8),
        "module.prototypes.weight": torch.randn(20, 8),
    })
    return state


def test_official_resnet50_loads_exactly_and_matches_torchvision(official_resnet50):
    path, state = official_resnet50
    model = load_pretrained(path)
    assert model.spec == ModelSpec("resnet50", hidden_dim=2048, output_dim=128, num_prototypes=3000)
    ours = model.state_dict()
    assert len(ours) == len(state)
    assert all(torch.equal(ours[_our_key(k)], v) for k, v in state.items())

    reference = torchvision.models.resnet50()
    stripped = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("module.projection", "module.proto"))}
    result = reference.load_state_dict(stripped, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    reference.fc = torch.nn.Identity()
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = reference(x), model.forward_features(x)
        out = model([x])
    assert expected.abs().mean() > 1e-2  # a meaningful, non-degenerate feature
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert out.embeddings.shape == (1, 128) and out.scores[0].shape == (1, 3000)


@pytest.mark.parametrize("arch", ["resnet50w2", "resnet50w4", "resnet50w5"])
def test_wide_spec_inferred_from_shapes_without_allocating(arch):
    entry = _reference()[arch]
    meta = {k: torch.empty(shape, device="meta") for k, shape in entry["keys"].items()}
    assert is_official_state_dict(meta)
    ours = official_to_ours(meta)
    spec = infer_spec(ours)
    assert spec == ModelSpec(arch, hidden_dim=entry["projection_hidden_dim"], output_dim=128, num_prototypes=3000)
    with torch.device("meta"):
        model = build_model(spec)
    assert not diff_state_dict(model.state_dict(), ours)  # every key and shape fits the built model


def test_official_training_checkpoint_with_state_dict(tmp_path, official_resnet18):
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 12, "state_dict": official_resnet18,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
                "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 3}}}, path)
    assert read_checkpoint(path).kind == "official-training"
    model = load_pretrained(path)
    assert (model.spec.backbone, model.spec.hidden_dim, model.spec.output_dim, model.spec.num_prototypes) == ("resnet18", 32, 8, (20,))
    ours = model.state_dict()
    assert all(torch.equal(ours[_our_key(k)], v) for k, v in official_resnet18.items())


def test_multi_head_prototypes_and_single_linear_head(tmp_path, official_resnet18):
    state = {k: v for k, v in official_resnet18.items() if not k.startswith(("module.projection", "module.proto"))}
    state.update({"module.projection_head.weight": torch.randn(16, 512), "module.projection_head.bias": torch.randn(16),
                  "module.prototypes.prototypes0.weight": torch.randn(10, 16),
                  "module.prototypes.prototypes1.weight": torch.randn(7, 16)})
    path = tmp_path / "dcv2_pretrain.pth.tar"
    torch.save(state, path)
    model = load_pretrained(path)
    assert (model.spec.hidden_dim, model.spec.output_dim, model.spec.num_prototypes) == (0, 16, (10, 7))
    assert torch.equal(model.projection_head[0].weight, state["module.projection_head.weight"])
    assert torch.equal(model.prototypes.prototypes1.weight, state["module.prototypes.prototypes1.weight"])
    with torch.no_grad():
        scores = model([torch.randn(2, 3, 32, 32)]).scores
    assert [s.shape for s in scores] == [torch.Size([2, 10]), torch.Size([2, 7])]
    assert set(ours_to_official(model.state_dict())) == set(state)  # and back to the release's names


def test_wrong_architecture_fails_naming_the_keys(tmp_path, official_resnet18):
    path = tmp_path / "r18_pretrain.pth.tar"
    torch.save(official_resnet18, path)
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_pretrained(path, spec=ModelSpec("resnet50", hidden_dim=32, output_dim=8, num_prototypes=20))
    message, diff = str(info.value), info.value.diff
    assert "backbone.layer1.0.conv3.weight" in diff.missing
    assert ("backbone.layer4.0.conv1.weight", (512, 256, 3, 3), (512, 1024, 1, 1)) in diff.mismatched
    assert "backbone.layer1.0.conv3.weight" in message  # named in the message, too
    assert "backbone.layer1.0.conv1.weight: [64, 64, 3, 3] vs [64, 64, 1, 1]" in message
    assert "more" in message and "strict=False" in message and str(path) in message


def test_strict_failure_changes_nothing_and_partial_load_warns(official_resnet18, caplog):
    ours = official_to_ours(official_resnet18)
    ours["prototypes.weight"] = torch.randn(30, 8)  # a different K
    ours["extra.weight"] = torch.randn(2)
    model = build_model(ModelSpec("resnet18", hidden_dim=32, output_dim=8, num_prototypes=20))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleCheckpointError):
        load_state_checked(model, ours, strict=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    with caplog.at_level(logging.WARNING, logger="swav.interop"):
        diff = load_state_checked(model, ours, strict=False, source="test file")
    assert diff.unexpected == ["extra.weight"] and diff.skipped() == ["prototypes.weight"]
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "PARTIAL" in warning and "prototypes.weight: [30, 8] vs [20, 8]" in warning and "extra.weight" in warning
    after = model.state_dict()
    assert torch.equal(after["prototypes.weight"], before["prototypes.weight"])
    assert all(torch.equal(after[k], v) for k, v in ours.items() if k not in ("prototypes.weight", "extra.weight"))


def test_partial_load_through_load_pretrained_is_never_silent(tmp_path, official_resnet18, caplog):
    path = tmp_path / "r18_pretrain.pth.tar"
    torch.save(official_resnet18, path)
    spec = ModelSpec("resnet18", hidden_dim=32, output_dim=8, num_prototypes=50)
    with pytest.raises(IncompatibleCheckpointError, match="prototypes.weight"):
        load_pretrained(path, spec=spec)
    with caplog.at_level(logging.WARNING):
        model = load_pretrained(path, spec=spec, strict=False)
    assert "prototypes.weight" in caplog.text and model.num_prototypes == (50,)
    assert torch.equal(model.backbone.conv1.weight, official_resnet18["module.conv1.weight"])


def test_diff_matches_a_naive_comparison_and_describe_truncates():
    expected = {f"backbone.layer1.{i}.w": torch.zeros(i + 1) for i in range(30)}
    given = {f"backbone.layer1.{i}.w": torch.zeros(1 if i % 3 else i + 1) for i in range(0, 30, 2)}
    given["stray.w"] = torch.zeros(1)
    diff = diff_state_dict(expected, given)
    naive_missing = [k for k in expected if k not in given]
    naive_bad = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    assert diff.missing == naive_missing and [k for k, _, _ in diff.mismatched] == naive_bad
    assert diff.unexpected == ["stray.w"]
    text = StateDictDiff(missing=naive_missing).describe(limit=4)
    assert "15 missing" in text and "backbone.layer1 x15" in text and "... and 11 more" in text


def test_key_renaming_round_trips_for_both_head_layouts():
    for hidden in (0, 16):
        model = build_model(ModelSpec("resnet18", small_images=True, hidden_dim=hidden, output_dim=8, num_prototypes=[5, 6]))
        state = model.state_dict()
        official = ours_to_official(state)
        assert all(k.startswith("module.") for k in official)
        assert ("module.projection_head.weight" in official) == (hidden == 0)
        assert official_to_ours(official).keys() == state.keys()
        assert infer_spec(official_to_ours(official)) == model.spec


def test_infer_backbone_rejects_unknown_layouts():
    meta = lambda *s: torch.empty(*s, device="meta")
    state = {"conv1.weight": meta(96, 3, 7, 7), **{f"layer{i}.0.conv1.weight": meta(1) for i in (1, 2, 3, 4)}}
    with pytest.raises(ValueError, match="unrecognised ResNet layout.*known layouts"):
        infer_backbone(state)
    with pytest.raises(ValueError, match="spec=ModelSpec"):
        infer_backbone({"features.0.weight": meta(3)})


@pytest.mark.parametrize("name", ["wide_resnet50_2", "resnext50_32x4d", "resnext101_64x4d"])
def test_wide_and_grouped_torchvision_layouts_are_told_from_resnet50(name):
    """Their stems are 64 wide like ResNet-50's: layer1's inner width and groups tell them apart (they were read
    as resnet50 and then failed to load with 'a different shape')."""
    meta = torchvision.models.get_model(name, weights=None).to("meta").state_dict()
    assert infer_backbone({k: v for k, v in meta.items() if not k.startswith("fc.")}) == (name, False, 3)
    meta["layer1.0.conv2.weight"] = torch.empty(96, 96, 3, 3, device="meta")  # a width no known layout has
    with pytest.raises(ValueError, match="inner convolutions are 96 wide in 1 group.*spec=ModelSpec"):
        infer_backbone(meta)


def test_a_wide_resnet_exported_for_torchvision_loads_back(tmp_path):
    from swav.export import export_backbone_torchvision

    model = build_model(ModelSpec("wide_resnet50_2", hidden_dim=0, output_dim=8, num_prototypes=5))
    path = export_backbone_torchvision(model, tmp_path / "wide.pth")
    loaded = load_pretrained(path)
    assert loaded.spec.backbone == "wide_resnet50_2"
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in loaded.backbone.state_dict().items())


def test_torchvision_backbone_only_state_dict(tmp_path, caplog):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18_supervised.pth"
    torch.save(reference.state_dict(), path)
    with caplog.at_level(logging.WARNING):
        model = load_pretrained(path)
    assert model.spec.backbone == "resnet18" and model.spec.num_prototypes == (3000,)
    assert "fc.weight" in caplog.text and "freshly initialised" in caplog.text
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.backbone.state_dict().items())
    model = load_pretrained(path, spec=ModelSpec("resnet18", hidden_dim=0, output_dim=4, num_prototypes=6))
    assert model.num_prototypes == (6,) and model.projection_head[0].out_features == 4


def test_unrecognised_file_is_refused(tmp_path):
    path = tmp_path / "weird.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a recognised SwAV file.*encoder.weight"):
        load_pretrained(path)


def test_names_resolve_only_to_local_files(tmp_path, monkeypatch, official_resnet18):
    monkeypatch.setenv("SWAV_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained("swav_800ep")
    message = str(info.value)
    assert "swav_800ep_pretrain.pth.tar" in message and str(tmp_path) in message and "https://" in message
    torch.save(official_resnet18, tmp_path / "swav_800ep_pretrain.pth.tar")
    assert resolve_pretrained("swav_800ep") == tmp_path / "swav_800ep_pretrain.pth.tar"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "missing" / "model.pt"))


def test_run_folder_given_as_checkpoint_points_at_its_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWAV_HOME", str(tmp_path / "home"))
    run = tmp_path / "run1"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="'run1' is a folder, not a checkpoint file"):
        load_pretrained("run1")
    torch.save({"w": torch.zeros(1)}, run / "checkpoints" / "step_00000010.pt")
    torch.save({"w": torch.zeros(1)}, run / "checkpoints" / "step_00000020.pt")
    with pytest.raises(IsADirectoryError, match="without model.pt.*run1/checkpoints/step_000000[12]0.pt"):
        load_pretrained("run1")
    model = build_model(ModelSpec("resnet-compact-8", small_images=True, hidden_dim=0, output_dim=4,
                                  num_prototypes=3))
    from swav.export import export_full

    export_full(model, run / "model.pt")
    for given in ("run1", "run1/", str(run)):
        with pytest.raises(IsADirectoryError) as info:
            load_pretrained(given)
        assert str(info.value) == f"{given!r} is a run folder: pass {Path(given) / 'model.pt'}"
    assert load_pretrained("run1/model.pt").spec == model.spec


def test_file_holding_no_dict_is_a_type_error_of_swav(tmp_path):
    from swav.pretrained import NotAStateDictError

    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(NotAStateDictError, match="holds a Tensor, expected a dict") as info:
        read_checkpoint(path)
    assert isinstance(info.value, TypeError)


def test_config_yaml_given_as_checkpoint_is_named(tmp_path):
    run = tmp_path / "run1"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  backbone: resnet50\n")
    (run / "model.pt").write_bytes(b"")  # its presence is enough for the hint
    with pytest.raises(ValueError) as info:
        load_pretrained(run / "config.yaml")
    assert str(info.value) == (f"{str(run / 'config.yaml')!r} is not a checkpoint (YAML file); "
                               f"pass the run's model.pt ({str(run / 'model.pt')!r})")


def test_a_head_without_batch_norm_tensors_is_read_as_such_with_a_warning(tmp_path, caplog):
    spec = ModelSpec("resnet18", small_images=True, hidden_dim=16, output_dim=8, num_prototypes=(5,))
    state = ours_to_official(build_model(spec).state_dict())
    for key in [k for k in state if k.startswith("module.projection_head.1.")]:
        del state[key]
    torch.save(state, tmp_path / "no_head_bn.pth.tar")
    with caplog.at_level(logging.WARNING):
        model = load_pretrained(tmp_path / "no_head_bn.pth.tar")
    assert model.spec.head_batch_norm is False
    assert "projection head has no BatchNorm tensors" in caplog.text
    caplog.clear()
    torch.save(ours_to_official(build_model(spec).state_dict()), tmp_path / "with_head_bn.pth.tar")
    with caplog.at_level(logging.WARNING):
        assert load_pretrained(tmp_path / "with_head_bn.pth.tar").spec.head_batch_norm
    assert "projection head has no BatchNorm" not in caplog.text
