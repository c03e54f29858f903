"""Tests for swav/backbones.py: names, shapes, parameter counts, numerics (SPEC §8, §10)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from swav.backbones import ResNetTrunk, SmallMapConv2d, available_backbones, build_backbone

# key names and shapes of the original release (copied from the project's reference notes)
REFERENCE_DIR = Path(__file__).resolve().parent / "data"
META = torch.device("meta")
_AUX_MODELS = ("googlenet", "inception_v3")  # built by us without auxiliary classifiers


def _shapes(module: nn.Module) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in module.state_dict().items()}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _torchvision_trunk_shapes(name: str) -> dict[str, list[int]]:
    with META:
        reference = torchvision.models.get_model(name, weights=None)
    return {k: v for k, v in _shapes(reference).items() if not k.startswith("fc.")}


@pytest.mark.parametrize(
    ("name", "dim"),
    [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048),
     ("resnet152", 2048)],
)
def test_resnet_state_dict_equals_torchvision_minus_fc(name: str, dim: int) -> None:
    with META:
        trunk, feature_dim = build_backbone(name)
    assert feature_dim == dim
    assert _shapes(trunk) == _torchvision_trunk_shapes(name)  # same keys, order-free, same shapes
    assert not any(key.startswith("fc") for key in trunk.state_dict())
    assert trunk(torch.empty(2, 3, 224, 224, device=META)).shape == (2, dim)


@pytest.mark.parametrize(
    ("name", "num_params", "dim"),
    [("resnet50", 23_508_032, 2048), ("resnet50w2", 93_907_072, 4096),
     ("resnet50w4", 375_378_176, 8192), ("resnet50w5", 586_450_240, 10240)],
)
def test_wide_resnet_parameter_counts_and_dims(name: str, num_params: int, dim: int) -> None:
    with META:
        trunk, feature_dim = build_backbone(name)
        features = trunk(torch.empty(2, 3, 224, 224))
    assert _count(trunk) == num_params
    assert feature_dim == dim and features.shape == (2, dim)
    width = dim // 2048
    assert trunk.conv1.out_channels == 64 * width  # the stem is widened too (not torchvision's)


@pytest.mark.parametrize("name", ["resnet50", "resnet50w2", "resnet50w4", "resnet50w5"])
def test_keys_and_shapes_match_official_checkpoint(name: str) -> None:
    reference_file = REFERENCE_DIR / "official_checkpoint_keys.json"
    official = json.loads(reference_file.read_text())[name]["keys"]
    expected = {
        key: shape for key, shape in official.items()
        if not key.startswith(("module.projection_head.", "module.prototypes"))
    }
    with META:
        trunk, _ = build_backbone(name)
    assert {f"module.{key}": shape for key, shape in _shapes(trunk).items()} == expected


def test_wide_resnet_stage_resolutions_follow_resnet50() -> None:
    """Stride placement: 224 px -> 56, 28, 14, 7 at layer1..4, widths 256w..2048w."""
    with META:
        trunk, _ = build_backbone("resnet50w2")
    seen: dict[str, tuple[int, ...]] = {}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        getattr(trunk, stage).register_forward_hook(
            lambda _m, _i, out, stage=stage: seen.__setitem__(stage, tuple(out.shape))
        )
    trunk(torch.empty(1, 3, 224, 224, device=META))
    assert seen == {"layer1": (1, 512, 56, 56), "layer2": (1, 1024, 28, 28),
                    "layer3": (1, 2048, 14, 14), "layer4": (1, 4096, 7, 7)}


def _copy_state(source: nn.Module, target: nn.Module) -> None:
    """Load real tensors into a meta-built module (skips its random init; cloned, not shared)."""
    state = {key: value.clone() for key, value in source.state_dict().items()}
    target.load_state_dict(state, strict=True, assign=True)


def test_resnet50_is_numerically_torchvision() -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None)
    reference.fc = nn.Identity()
    with META:
        trunk, _ = build_backbone("resnet50")
    _copy_state(reference, trunk)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for train in (False, True):
            reference.train(train)
            trunk.train(train)
            actual = trunk(x)
            assert actual.shape == (2, 2048)
            torch.testing.assert_close(actual, reference(x), rtol=0, atol=1e-6)
    # train mode updated the batch-norm running statistics identically
    torch.testing.assert_close(trunk.layer4[2].bn3.running_var,
                               reference.layer4[2].bn3.running_var, rtol=0, atol=1e-6)


def test_small_image_stem_matches_hand_modified_torchvision() -> None:
    torch.manual_seed(0)
    trunk, dim = build_backbone("resnet18", small_images=True)
    assert (trunk.conv1.kernel_size, trunk.conv1.stride, trunk.conv1.padding) == (
        (3, 3), (1, 1), (1, 1))
    assert trunk.conv1.bias is None and isinstance(trunk.maxpool, nn.Identity)
    with META:
        reference = torchvision.models.resnet18(weights=None)
        reference.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    reference.fc = nn.Identity()
    _copy_state(trunk, reference)
    trunk.eval()
    reference.eval()
    seen = []
    trunk.layer4.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), reference(x), rtol=0, atol=1e-6)
    assert dim == 512 and seen == [torch.Size([2, 512, 4, 4])]  # total stride 8, not 32


def test_in_channels_one_for_grey_images() -> None:
    trunk, dim = build_backbone("resnet18", small_images=True, in_channels=1)
    assert trunk.conv1.weight.shape == (64, 1, 3, 3)
    assert trunk(torch.randn(2, 1, 28, 28)).shape == (2, dim)
    with META:
        wide, _ = build_backbone("resnet50w2", in_channels=1)
    assert wide.conv1.weight.shape == (128, 1, 7, 7)


def test_default_init_is_torchvision_and_zero_init_is_opt_in() -> None:
    torch.manual_seed(0)
    trunk, _ = build_backbone("resnet18")
    conv = trunk.layer4[1].conv2.weight  # 512 x 512 x 3 x 3: He normal with fan_out = 512 * 9
    assert conv.std().item() == pytest.approx(math.sqrt(2.0 / (512 * 9)), rel=0.02)
    assert abs(conv.mean().item()) < 1e-4
    for module in trunk.modules():
        if isinstance(module, nn.BatchNorm2d):  # last BN gamma of each block too: no zero-init
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    zeroed, _ = build_backbone("resnet18", zero_init_residual=True)
    blocks = [b for stage in (zeroed.layer1, zeroed.layer2, zeroed.layer3, zeroed.layer4)
              for b in stage]
    assert all(torch.all(b.bn2.weight == 0) for b in blocks)
    assert torch.all(zeroed.layer1[0].bn1.weight == 1)


@pytest.mark.parametrize(
    ("name", "dim"),
    [("efficientnet_b0", 1280), ("convnext_tiny", 768), ("vit_b_16", 768),
     ("mobilenet_v3_small", 1024), ("googlenet", 1024), ("inception_v3", 2048),
     ("swin_t", 768), ("maxvit_t", 512), ("densenet121", 1024), ("vgg11", 4096),
     ("squeezenet1_1", 512), ("torchvision:efficientnet_b0", 1280)],
)
def test_torchvision_models_feature_dim(name: str, dim: int) -> None:
    with META:
        trunk, feature_dim = build_backbone(name)
    size = getattr(trunk, "image_size", 224)
    trunk.train()  # train mode: googlenet/inception must not return auxiliary outputs
    features = trunk(torch.empty(2, 3, size, size, device=META))
    assert feature_dim == dim and isinstance(features, torch.Tensor)
    assert features.shape == (2, dim)
    plain_name = name.removeprefix("torchvision:")
    no_aux = {"aux_logits": False, "init_weights": True} if plain_name in _AUX_MODELS else {}
    with META:
        full = torchvision.models.get_model(plain_name, weights=None, **no_aux)  # 1000 classes
    classifier = [m for m in full.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    assert classifier.weight.shape[:2] == (1000, dim)  # its input is the feature we report
    assert _count(trunk) == _count(full) - _count(classifier)  # nothing else was removed


def test_regnet_built_on_cpu_feature_dim() -> None:
    trunk, dim = build_backbone("regnet_x_400mf")  # torchvision's regnet cannot build on meta
    trunk.eval()
    assert dim == 400 and trunk(torch.randn(1, 3, 32, 32)).shape == (1, 400)


def _load_into_torchvision(trunk: nn.Module, name: str) -> nn.Module:
    reference = torchvision.models.get_model(name, weights=None)
    missing, unexpected = reference.load_state_dict(trunk.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("classifier.") for k in missing)
    return reference.eval()


def test_torchvision_features_are_the_penultimate_activations() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        trunk, _ = build_backbone("mobilenet_v3_small")
        ref = _load_into_torchvision(trunk, "mobilenet_v3_small")
        pooled = torch.flatten(ref.avgpool(ref.features(x)), 1)
        torch.testing.assert_close(trunk.eval()(x), ref.classifier[:2](pooled))
        trunk, _ = build_backbone("squeezenet1_1")  # conv classifier: features = pooled maps
        ref = _load_into_torchvision(trunk, "squeezenet1_1")
        expected = torch.flatten(nn.functional.adaptive_avg_pool2d(ref.features(x), 1), 1)
        torch.testing.assert_close(trunk.eval()(x), expected)


def test_classifier_dropout_removed_so_train_features_are_deterministic() -> None:
    trunk, _ = build_backbone("mobilenet_v3_small")
    assert not any(isinstance(m, nn.Dropout) for m in trunk.classifier)
    trunk.train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), trunk(x), rtol=0, atol=0)


def test_torchvision_prefix_resnet_and_small_images() -> None:
    with META:
        trunk, dim = build_backbone("torchvision:resnet18")
        small, _ = build_backbone("torchvision:ResNet18", small_images=True, in_channels=1)
    assert dim == 512 and _shapes(trunk) == _torchvision_trunk_shapes("resnet18")
    assert small.conv1.weight.shape == (64, 1, 3, 3) and isinstance(small.maxpool, nn.Identity)


def test_in_channels_for_generic_torchvision_model() -> None:
    with META:
        trunk, dim = build_backbone("efficientnet_b0", in_channels=4)
        features = trunk(torch.empty(2, 4, 64, 64))
    assert trunk.features[0][0].weight.shape == (32, 4, 3, 3)
    assert features.shape == (2, dim)


def test_names_are_case_insensitive_and_listed() -> None:
    names = available_backbones()
    assert names == sorted(set(names))
    for expected in ("resnet18", "resnet50", "resnet152", "resnet50w2", "resnet50w4",
                     "resnet50w5", "efficientnet_b0", "convnext_tiny", "vit_b_16"):
        assert expected in names
    with META:
        trunk, dim = build_backbone("ResNet50W2")
    assert dim == 4096 and isinstance(trunk, ResNetTrunk)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_without_timm_names_the_install_command() -> None:
    with pytest.raises(ImportError, match="pip install timm"):
        build_backbone("timm:resnet50")


def test_unknown_names_raise_with_suggestions() -> None:
    with pytest.raises(ValueError, match=r"resnet50w2.*Available: .*resnet18") as info:
        build_backbone("resnet50w3")
    assert "'resnet50w3'" in str(info.value)
    with pytest.raises(ValueError, match="efficientnet_b0"):
        build_backbone("torchvision:efficientnet_bO")
    with pytest.raises(ValueError, match="prefix"):
        build_backbone("keras:resnet50")
    with pytest.raises(ValueError, match="name"):
        build_backbone("  ")


def test_invalid_options_raise() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("resnet18", in_channels=0)
    with pytest.raises(ValueError, match="small_images"):
        build_backbone("efficientnet_b0", small_images=True)
    with pytest.raises(ValueError, match="zero_init_residual"):
        build_backbone("vit_b_16", zero_init_residual=True)


@pytest.mark.parametrize("kernel,pixels,stride,fast", [
    (1, 7, 1, True), (1, 3, 1, True), (1, 8, 1, False), (1, 14, 2, True), (1, 13, 2, True), (1, 15, 2, False),
    (3, 7, 1, True), (3, 3, 1, True), (3, 8, 1, False), (3, 6, 2, True), (3, 7, 2, True), (3, 14, 2, False)])
@pytest.mark.parametrize("stride1_kxk", [True, False])
def test_small_map_convolution_as_a_matrix_product(monkeypatch, kernel: int, pixels: int, stride: int,
                                                   fast: bool, stride1_kxk: bool) -> None:
    """ResNet's convolutions run as one matrix product on small channels-last maps in CPU bf16 autocast
    (faster there than oneDNN's convolution), with the values and gradients of the convolution; stride-1
    k x k kernels only where KXK_STRIDE1_MATMUL says (by default on CPUs with AMX)."""
    from swav.backbones import SmallMapConv2d

    monkeypatch.setattr(SmallMapConv2d, "KXK_STRIDE1_MATMUL", stride1_kxk)
    fast = fast and (kernel == 1 or stride > 1 or stride1_kxk)
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or linear(*a))
    torch.manual_seed(0)
    padding = kernel // 2
    conv = SmallMapConv2d(64, 48, kernel, stride=stride, padding=padding, bias=False)
    x = torch.randn(5, 64, pixels, pixels).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert bool(calls) == fast
    out = (pixels + 2 * padding - kernel) // stride + 1
    assert y.shape == (5, 48, out, out) and y.is_contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(y.shape)
    y.float().backward(grad_out)
    ref_x = x.detach().clone().requires_grad_()
    ref_w = conv.weight.detach().clone().requires_grad_()
    torch.nn.functional.conv2d(ref_x, ref_w, stride=stride, padding=padding).backward(grad_out)
    reference = torch.nn.functional.conv2d(x.detach(), conv.weight.detach(), stride=stride, padding=padding)
    for got, want in ((y.float(), reference), (x.grad, ref_x.grad), (conv.weight.grad, ref_w.grad)):
        torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.02 * float(want.abs().max()))
    calls.clear()
    conv(x.detach().contiguous())  # fp32, contiguous: an ordinary convolution
    assert not calls


def test_every_resnet_convolution_is_a_small_map_convolution() -> None:
    from swav.backbones import SmallMapConv2d

    trunk, _ = build_backbone("resnet50")
    # 1x1: conv1 + conv3 per block and the downsampling ones (36); 3x3: conv2 per block (16); the 7x7 stem
    assert sum(isinstance(m, SmallMapConv2d) for m in trunk.modules()) == 36 + 16 + 1


@pytest.mark.parametrize("amx", [True, False])
def test_stride1_kxk_matrix_products_follow_the_cpu_by_default(monkeypatch, amx: bool) -> None:
    """With AMX, oneDNN's 3x3 kernels are slow on small maps and the matrix product wins; without it (an
    AVX512-BF16 CPU such as AMD's Zen 4) oneDNN wins on stride-1 3x3 convolutions, so they stay there."""
    from swav import backbones

    monkeypatch.setattr(backbones, "_CPU_HAS_AMX", amx)
    assert backbones.SmallMapConv2d.KXK_STRIDE1_MATMUL is None
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    stride1 = backbones.SmallMapConv2d(16, 8, 3, padding=1, bias=False)
    strided = backbones.SmallMapConv2d(16, 8, 3, stride=2, padding=1, bias=False)
    pointwise = backbones.SmallMapConv2d(16, 8, 1, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stride1._fast(x) == amx
        assert strided._fast(x) and pointwise._fast(x)


@pytest.mark.parametrize("name", ["resnet18", "resnet-compact-16-g4"])
@pytest.mark.parametrize("bf16_channels_last", [False, True])
def test_trunks_compile_into_one_graph(name: str, bf16_channels_last: bool) -> None:
    """``run.compile`` must not break the graph at the CPU-specific choices (SmallMapConv2d's rule, the compact
    trunk's pooling): they read plain Python values, never ask the CPU during tracing."""
    import torch._dynamo

    channels = 1 if name.startswith("resnet-compact") else 3
    trunk, _ = build_backbone(name, in_channels=channels)
    size = 28 if channels == 1 else 64  # ResNet-18 at 64 px: 3x3 convolutions on 4x4 and 2x2 maps
    x = torch.randn(2, channels, size, size)
    if bf16_channels_last:
        trunk, x = trunk.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(trunk, backend="eager", fullgraph=True)  # fullgraph: a break raises
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_channels_last):
        got, want = compiled(x), trunk(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["resnet50", "resnet-compact-16-g4", "resnet-compact-s2-16-x4"])
def test_trunks_script_with_torchscript(name: str) -> None:
    """torch.jit.script of a backbone (deployment code that still uses TorchScript) compiles the plain
    convolutions and pooling; the eager CPU speed-ups stay in the eager model, which is left unchanged."""
    import warnings

    channels = 1 if name.startswith("resnet-compact") else 3
    trunk, _ = build_backbone(name, in_channels=channels)
    trunk.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in favour of torch.export
        scripted = torch.jit.script(trunk)
    x = torch.randn(2, channels, 64, 64)
    torch.testing.assert_close(scripted(x), trunk(x))
    assert any(type(m) is SmallMapConv2d for m in trunk.modules()) == (name == "resnet50")  # still swapped in
