"""Export round trips: torchvision, safetensors, full, official layout, CLI and torch.hub (issue 7)."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from swav.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    MODEL_FORMAT,
    load_model,
    save_checkpoint,
    save_model_file,
)
from swav.cli.export import main as export_main
from swav.export import (
    export_backbone_torchvision,
    export_full,
    export_official,
    export_safetensors,
    to_torchvision_resnet,
)
from swav.model import ModelSpec, SwAVModel, build_model
from swav.pretrained import load_pretrained, read_checkpoint
from swav.safe_load import read_safetensors_metadata, safe_torch_load

REPO = Path(__file__).resolve().parents[1]


def _randomise_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so that eval-mode features depend on them."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                module.num_batches_tracked.fill_(7)
    return model.eval()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def resnet50_model() -> SwAVModel:
    return _randomise_statistics(build_model(ModelSpec("resnet50", hidden_dim=64, output_dim=16, num_prototypes=10)))


@pytest.fixture(scope="module")
def small_model() -> SwAVModel:
    spec = ModelSpec("resnet18", small_images=True, hidden_dim=32, output_dim=8, num_prototypes=[6, 5])
    return _randomise_statistics(build_model(spec))


@pytest.fixture(scope="module")
def resnet50_full_file(resnet50_model, tmp_path_factory) -> Path:
    return export_full(resnet50_model, tmp_path_factory.mktemp("r50") / "model.pt")


def test_torchvision_export_gives_identical_features(resnet50_model, tmp_path):
    path = export_backbone_torchvision(resnet50_model, tmp_path / "resnet50_swav.pth")
    reference = torchvision.models.resnet50()
    result = reference.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    reference.fc = nn.Identity()
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = resnet50_model.forward_features(x), reference(x)
    assert ours.abs().mean() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-6)


def test_to_torchvision_resnet_and_hub_entry_points(resnet50_model, resnet50_full_file, tmp_path, monkeypatch):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = resnet50_model.forward_features(x)
        net = to_torchvision_resnet(resnet50_model).eval()
        torch.testing.assert_close(net(x), expected, atol=1e-6, rtol=1e-6)

        backbone = torch.hub.load(str(REPO), "swav_resnet50", source="local", pretrained_path=str(resnet50_full_file))
        assert isinstance(backbone, torchvision.models.ResNet) and isinstance(backbone.fc, nn.Identity)
        torch.testing.assert_close(backbone(x), expected, atol=1e-6, rtol=1e-6)

        # the original hub name reads the released file from $SWAV_HOME (nothing downloads)
        monkeypatch.setenv("SWAV_HOME", str(tmp_path))
        export_official(resnet50_model, tmp_path / "swav_800ep_pretrain.pth.tar")
        official = torch.hub.load(str(REPO), "resnet50", source="local")
        torch.testing.assert_close(official(x), expected, atol=1e-6, rtol=1e-6)


def test_hubconf_declares_dependencies_and_entry_points():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dependencies == ["torch", "torchvision"]
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert {"swav_model", "swav_resnet50", "swav_resnet50w2", "swav_resnet50w4", "swav_resnet50w5", "resnet50"} <= entries
    fresh = hubconf.swav_model(backbone="resnet18", small_images=True, hidden_dim=0, output_dim=4, num_prototypes=3)
    assert isinstance(fresh, SwAVModel) and fresh.num_prototypes == (3,)


def test_hub_full_model_and_architecture_check(small_model, tmp_path):
    path = export_full(small_model, tmp_path / "r18.pt")
    _assert_same_state(torch.hub.load(str(REPO), "swav_model", source="local", pretrained_path=str(path)), small_model)
    with pytest.raises(ValueError, match="resnet18 model, not resnet50; use the swav_model entry point"):
        torch.hub.load(str(REPO), "swav_resnet50", source="local", pretrained_path=str(path))  # no swav_resnet18


def test_safetensors_full_round_trip(small_model, tmp_path):
    path = export_safetensors(small_model, tmp_path / "model.safetensors")
    metadata = read_safetensors_metadata(path)
    assert metadata["swav_content"] == "full"
    assert ModelSpec.from_dict(json.loads(metadata["swav_model_spec"])) == small_model.spec
    loaded = load_pretrained(path)
    assert loaded.spec == small_model.spec
    _assert_same_state(loaded, small_model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = loaded([x]), small_model([x])
    assert all(torch.equal(s, t) for s, t in zip(a.scores, b.scores))


def test_safetensors_backbone_only_is_torchvision_named(tmp_path, caplog):
    model = _randomise_statistics(build_model(ModelSpec("resnet18", hidden_dim=0, output_dim=8, num_prototypes=4)))
    path = export_safetensors(model, tmp_path / "backbone.safetensors", backbone_only=True)
    reference = torchvision.models.resnet18()
    result = reference.load_state_dict(load_file(str(path)), strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    with caplog.at_level(logging.WARNING):
        loaded = load_pretrained(path)
    assert loaded.spec == model.spec and "freshly initialised" in caplog.text
    _assert_same_state(loaded.backbone, model.backbone)


def test_full_export_is_read_by_both_loaders(small_model, tmp_path):
    path = export_full(small_model, tmp_path / "model.pt")
    assert isinstance(safe_torch_load(path), dict)
    _assert_same_state(load_pretrained(path), small_model)
    _assert_same_state(load_model(path), small_model)  # the engine's own loader (swav.checkpoint)


def test_training_checkpoint_and_model_file_of_a_run(small_model, tmp_path):
    state = {k: v.clone() for k, v in small_model.state_dict().items()}
    checkpoint = save_checkpoint({
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": state,
        "model_spec": small_model.spec.to_dict(), "optimizer": {"state": {}, "param_groups": []}, "step": 3, "epoch": 1,
    }, tmp_path / "checkpoints" / "step_00000003.pt")
    assert read_checkpoint(checkpoint).kind == "swav"
    _assert_same_state(load_pretrained(checkpoint), small_model)
    model_file = save_model_file(tmp_path / "model.pt", small_model, small_model.spec.to_dict())
    _assert_same_state(load_pretrained(model_file), small_model)


@pytest.mark.parametrize("fmt", ["full", "safetensors"])
def test_cli_export_keeps_the_training_config_for_evaluation(small_model, tmp_path, fmt):
    """Evaluation sizes and normalises test images from the training config (eval_transforms): an export of a
    run's model keeps it, so the export evaluates like the run's model.pt."""
    from swav.eval.transforms import pretraining_config, transforms_for_checkpoint

    config = {"data": {"mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2]}, "crops": {"sizes": [32, 16]}}
    model_file = save_model_file(tmp_path / "model.pt", small_model, small_model.spec.to_dict(), config=config)
    output = tmp_path / f"exported.{fmt}"
    assert export_main(["--checkpoint", str(model_file), "--output", str(output), "--format", fmt]) == 0
    assert pretraining_config(output) == config
    from torchvision.transforms import v2

    steps = transforms_for_checkpoint(output, small_model.spec)[1].transforms
    assert next(t for t in steps if isinstance(t, v2.Normalize)).mean == [0.3, 0.3, 0.3]
    crops = [list(t.size) for t in steps if isinstance(t, v2.CenterCrop)]
    assert crops == [[32, 32]]  # the pretraining's crop size (small-image models: images of other sizes fit to it)


def test_official_layout_export_round_trip(small_model, tmp_path):
    path = export_official(nn.DataParallel(small_model), tmp_path / "mine_pretrain.pth.tar")
    raw = safe_torch_load(path)
    assert all(k.startswith("module.") for k in raw) and "module.conv1.weight" in raw
    assert "module.prototypes.prototypes1.weight" in raw and "module.projection_head.3.weight" in raw
    assert read_checkpoint(path).kind == "official"
    loaded = load_pretrained(path)
    assert loaded.spec == small_model.spec
    _assert_same_state(loaded, small_model)


def test_export_needs_a_spec_and_a_swav_model(tmp_path):
    model = SwAVModel(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), feature_dim=4, hidden_dim=0, output_dim=3, num_prototypes=2)
    with pytest.raises(ValueError, match="spec"):
        export_safetensors(model, tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="SwAVModel"):
        export_full(nn.Linear(2, 2), tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("fmt", ["torchvision", "safetensors", "full", "official"])
def test_cli_export_every_format(small_model, tmp_path, fmt, capsys):
    source = export_full(small_model, tmp_path / "source.pt")
    output = tmp_path / f"out_{fmt}.bin"
    assert export_main(["--checkpoint", str(source), "--output", str(output), "--format", fmt]) == 0
    assert "wrote" in capsys.readouterr().out
    if fmt == "torchvision":
        state = safe_torch_load(output)
        assert state.keys() == small_model.backbone.state_dict().keys()
    else:  # the safetensors file is recognised by content, whatever its suffix
        _assert_same_state(load_pretrained(output), small_model)


def test_cli_export_errors_are_clear(small_model, tmp_path, capsys):
    source = export_full(small_model, tmp_path / "source.pt")
    assert export_main(["--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "o.pt")]) == 1
    assert "missing.pt" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(source), "--output", str(source)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(source), "--output", str(tmp_path / "o.pt"), "--backbone-only"]) == 2
    assert "--backbone-only" in capsys.readouterr().err


def test_swav_command_line_has_export():
    from swav import cli

    assert cli.main(["export", "--help"]) == 0
    assert "export" in cli.build_parser().format_help()


def test_exports_that_could_not_be_read_back_are_refused_and_files_are_ordinary(tmp_path, capsys):
    """A compact ResNet has no torchvision counterpart and no place in the original layout: both refused
    (nothing written), as is a failed write (disk full); written files get the usual permissions."""
    import os
    import subprocess
    import sys

    compact = build_model(ModelSpec("resnet-compact-8", hidden_dim=16, output_dim=8, num_prototypes=5))
    source = export_full(compact, tmp_path / "compact.pt")
    for fmt, message in (("official", "original release's layout holds its ResNets only"),
                         ("torchvision", "has no torchvision counterpart")):
        assert export_main(["--checkpoint", str(source), "--output", str(tmp_path / f"o.{fmt}"), "--format", fmt]) == 1
        assert message in capsys.readouterr().err and not (tmp_path / f"o.{fmt}").exists()
    written = export_safetensors(compact, tmp_path / "m.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask
    # a real "file too large" from a file-size limit: one clear line, no temporary file left
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); from swav.cli import main; "
              f"sys.exit(main(['export', '--checkpoint', {str(source)!r}, '--output', {str(tmp_path / 'big.pt')!r}, "
              "'--format', 'full']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "could not write" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compact.pt", "m.safetensors"]


def test_partial_export_never_writes_untrained_tensors_as_if_trained(small_model, tmp_path, capsys):
    """--partial loads what fits; an export of the whole model would then load strictly later with no trace of
    the freshly initialised part, so it is refused, while the backbone (complete in the file) can be exported."""
    state = {k: v for k, v in small_model.state_dict().items() if not k.startswith("prototypes.")}
    partial = tmp_path / "no_prototypes.pt"
    torch.save({"format": MODEL_FORMAT, "version": CHECKPOINT_VERSION, "model": state,
                "model_spec": small_model.spec.to_dict()}, partial)
    for fmt in ("full", "safetensors", "official"):
        out = tmp_path / f"p.{fmt}"
        assert export_main(["--checkpoint", str(partial), "--output", str(out), "--format", fmt, "--partial"]) == 1
        err = capsys.readouterr().err
        assert "would be written untrained (prototypes." in err and not out.exists()
        assert "the backbone (safetensors --backbone-only" in err
    # a tensor of the backbone missing: no export of it is trained, and the message does not suggest one
    no_conv = {k: v for k, v in small_model.state_dict().items() if k != "backbone.conv1.weight"}
    torch.save({"format": MODEL_FORMAT, "version": CHECKPOINT_VERSION, "model": no_conv,
                "model_spec": small_model.spec.to_dict()}, tmp_path / "no_conv1.pt")
    assert export_main(["--checkpoint", str(tmp_path / "no_conv1.pt"), "--output", str(tmp_path / "b.safetensors"),
                        "--format", "safetensors", "--backbone-only", "--partial"]) == 1
    err = capsys.readouterr().err
    assert "(backbone.conv1.weight)" in err and "the backbone itself is incomplete" in err and "--backbone-only" not in err
    out = tmp_path / "backbone.safetensors"
    assert export_main(["--checkpoint", str(partial), "--output", str(out), "--format", "safetensors",
                        "--backbone-only", "--partial"]) == 0
    assert load_file(str(out)).keys() == small_model.backbone.state_dict().keys()
