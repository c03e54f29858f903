import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from swav.head import ProjectionHead
from swav.lars import LARS
from swav.model import ModelSpec, SwAVModel
from swav.prototypes import Prototypes
from swav.queue import EmbeddingQueue
from swav.schedule import warmup_cosine_schedule


def tiny_backbone():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_projection_head_layouts():
    head = ProjectionHead(16, 32, 8)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert set(head.state_dict()) >= {"0.weight", "1.running_mean", "3.weight", "3.bias"}
    assert len(ProjectionHead(16, 0, 8)) == 1
    assert isinstance(ProjectionHead(16, 32, 8, batch_norm=False)[1], nn.Identity)
    with pytest.raises(ValueError, match="hidden_dim"):
        ProjectionHead(16, -1, 8)


def test_prototypes_no_bias_unit_rows_and_heads():
    protos = Prototypes(16, 50)
    assert list(protos.state_dict()) == ["weight"]
    with torch.no_grad():
        protos.weight.mul_(7.0)
    protos.normalize_()
    torch.testing.assert_close(protos.weight.norm(dim=1), torch.ones(50), atol=1e-6, rtol=0)
    multi = Prototypes(16, [5, 7])
    assert sorted(multi.state_dict()) == ["prototypes0.weight", "prototypes1.weight"]
    assert [s.shape[1] for s in multi(torch.randn(3, 16))] == [5, 7]
    with pytest.raises(ValueError, match="num_prototypes"):
        Prototypes(16, 0)


def test_grouped_forward_equals_crop_by_crop():
    model = SwAVModel(tiny_backbone(), 8, hidden_dim=16, output_dim=4, num_prototypes=10).eval()
    crops = [torch.randn(3, 3, 24, 24), torch.randn(3, 3, 24, 24), torch.randn(3, 3, 12, 12), torch.randn(3, 3, 12, 12)]
    out = model(crops)
    one_by_one = torch.cat([model.forward_embeddings(c) for c in crops])
    torch.testing.assert_close(out.embeddings, one_by_one, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(12), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.scores[0], one_by_one @ model.prototypes.weight.t(), atol=1e-6, rtol=1e-5)


def test_embeddings_and_scores_are_float32_under_autocast():
    """Sinkhorn's exp(score / eps) magnifies a score's rounding 1 / eps times: under bf16 autocast the
    embeddings and their prototype scores are still computed in float32 from the head's output."""
    model = SwAVModel(tiny_backbone(), 8, hidden_dim=16, output_dim=4, num_prototypes=(10, 7)).eval()
    crops = [torch.randn(3, 3, 24, 24), torch.randn(3, 3, 12, 12)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(crops)
    assert out.embeddings.dtype == torch.float32 and all(s.dtype == torch.float32 for s in out.scores)
    for scores, weight in zip(out.scores, model.prototypes.weights(), strict=True):
        torch.testing.assert_close(scores, out.embeddings @ weight.t(), atol=1e-6, rtol=1e-6)


def test_one_backbone_pass_per_resolution_run():
    calls = []
    backbone = tiny_backbone()
    backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    model = SwAVModel(backbone, 8, hidden_dim=16, output_dim=4, num_prototypes=10)
    model([torch.randn(2, 3, 24, 24)] * 2 + [torch.randn(2, 3, 12, 12)] * 6)
    assert calls == [torch.Size([4, 3, 24, 24]), torch.Size([12, 3, 12, 12])]


def test_model_spec_validation_and_round_trip():
    spec = ModelSpec(backbone="resnet18", num_prototypes=[30, 40])
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown model spec keys"):
        ModelSpec.from_dict({"backbon": "resnet50"})
    with pytest.raises(ValueError, match="num_prototypes"):
        ModelSpec(num_prototypes=0)


def test_queue_fifo_order_and_round_trip():
    q = EmbeddingQueue(num_assign_crops=2, length=5, dim=3)
    batches = [torch.full((2, 2, 3), float(i)) for i in range(1, 4)]
    for b in batches[:2]:
        q.push(b)
    assert not q.is_full and int(q.filled) == 4
    q.push(batches[2])
    assert q.is_full
    # newest first: rows 0-1 = batch 3, rows 2-3 = batch 2, row 4 = first row of batch 2's predecessor
    assert q.embeddings[0, :, 0].tolist() == [3, 3, 2, 2, 1]
    restored = EmbeddingQueue(2, 5, 3)
    restored.load_state_dict(q.state_dict())
    assert restored.is_full and torch.equal(restored.embeddings, q.embeddings)
    with pytest.raises(ValueError, match="push expects"):
        q.push(torch.zeros(3, 2, 3))


def naive_lars_step(params, grads, bufs, lr, momentum, wd, trust, eps=1e-8):
    out = []
    for p, g, buf in zip(params, grads, bufs):
        p, g = p.clone(), g.clone()
        pn, gn = p.norm().item(), g.norm().item()
        if pn != 0 and gn != 0:
            rate = trust * pn / (gn + wd * pn + eps)
            g = (g + wd * p) * rate
        buf = g if buf is None else momentum * buf + g
        out.append((p - lr * buf, buf))
    return out


def test_lars_matches_reference():
    torch.manual_seed(1)
    layer = nn.Linear(5, 3)
    with torch.no_grad():
        layer.bias.zero_()  # zero norm: the gradient must pass through unscaled
    opt = LARS(layer.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.001)
    bufs = [None, None]
    for _ in range(3):
        x = torch.randn(4, 5)
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        params = [p.detach() for p in layer.parameters()]
        grads = [p.grad.detach() for p in layer.parameters()]
        expected = naive_lars_step(params, grads, bufs, 0.5, 0.9, 1e-2, 0.001)
        bufs = [b for _, b in expected]
        opt.step()
        for p, (ref, _) in zip(layer.parameters(), expected):
            torch.testing.assert_close(p.detach(), ref, atol=1e-6, rtol=1e-5)


def test_lars_honours_each_groups_weight_decay_and_other_dtypes():
    torch.manual_seed(2)
    layer = nn.Linear(5, 3)
    opt = LARS([{"params": [layer.weight]}, {"params": [layer.bias], "weight_decay": 0.0}], lr=0.5, momentum=0.9,
               weight_decay=1e-2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]  # SGD's own decay stays off
    x = torch.randn(4, 5)
    layer(x).pow(2).sum().backward()
    params = [p.detach().clone() for p in layer.parameters()]
    grads = [p.grad.detach().clone() for p in layer.parameters()]
    weight_ref = naive_lars_step(params[:1], grads[:1], [None], 0.5, 0.9, 1e-2, 0.001)[0][0]
    bias_ref = naive_lars_step(params[1:], grads[1:], [None], 0.5, 0.9, 0.0, 0.001)[0][0]  # no decay for it
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), weight_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.bias.detach(), bias_ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="weight_decay of a parameter group must be >= 0"):
        LARS([{"params": [layer.bias], "weight_decay": -1.0}], lr=0.1)
    # groups keep the fused CPU step; groups added later translate their weight_decay the same way
    other = nn.Linear(2, 2)
    opt = LARS([{"params": [other.weight]}], lr=0.1, weight_decay=0.5)
    opt.add_param_group({"params": [other.bias], "weight_decay": 0.0})
    opt.add_param_group({"params": [nn.Parameter(torch.ones(2))]})
    assert [(g["lars_weight_decay"], g["weight_decay"]) for g in opt.param_groups] == [(0.5, 0.0), (0.0, 0.0),
                                                                                       (0.5, 0.0)]
    assert all(g["fused"] for g in opt.param_groups)
    for dtype in (torch.float64, torch.bfloat16):  # the fused CPU step's scale is float32 whatever the dtype
        net = nn.Linear(4, 2).to(dtype)
        before = net.weight.detach().clone()
        opt = LARS(net.parameters(), lr=100.0)  # trust ratio 1e-3: a step bf16 weights can represent
        net(torch.randn(3, 4, dtype=dtype)).sum().backward()
        opt.step()
        assert net.weight.dtype == dtype and not torch.equal(net.weight.detach(), before)


def test_schedule_official_formula():
    base, final, epochs, spe, warm, start = 4.8, 0.0048, 5, 7, 2, 0.3
    lrs = warmup_cosine_schedule(base, final, epochs, spe, warm, start)
    assert len(lrs) == epochs * spe
    wsteps = warm * spe
    for i in range(wsteps):
        assert abs(lrs[i] - (start + (base - start) * i / (wsteps - 1))) < 1e-12
    T = epochs * spe - wsteps
    for t in range(T):
        assert abs(lrs[wsteps + t] - (final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / T)))) < 1e-12
    np.testing.assert_allclose(warmup_cosine_schedule(1.0, 0.0, 2, 3)[0], 1.0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        warmup_cosine_schedule(1.0, 0.0, 2, 3, warmup_epochs=3)


def test_a_fractional_warm_up_lasts_the_nearest_whole_number_of_steps():
    """0.7 epochs of 5 steps: 4 warm-up steps (3.5 rounds to 4), the base lr reached at the last of them."""
    lrs = warmup_cosine_schedule(1.0, 0.0, 2, 5, warmup_epochs=0.7, start_warmup=0.1)
    np.testing.assert_allclose(lrs[:4], [0.1, 0.4, 0.7, 1.0])
    assert lrs[4] == 1.0 and lrs[5] < 1.0  # the cosine starts at the base lr
    assert len(warmup_cosine_schedule(1.0, 0.0, 2, 5, warmup_epochs=0.5)) == 10


def test_lars_fused_update_equals_the_foreach_update_when_a_parameter_starts_late():
    """The fused SGD kernel (default on CPU) gives the same parameters as the per-tensor path, also when
    one parameter gets its first gradient steps after the others (prototypes during freezing)."""
    torch.manual_seed(3)
    layers = [nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3)) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    opts = [LARS(layers[0].parameters(), lr=0.3, weight_decay=1e-4, fused=True),
            LARS(layers[1].parameters(), lr=0.3, weight_decay=1e-4, fused=False)]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    for step in range(6):
        x = torch.randn(5, 6)
        for layer, opt in zip(layers, opts):
            opt.zero_grad(set_to_none=True)
            layer(x).pow(2).sum().backward()
            if step < 2:
                layer[1].weight.grad = None  # frozen for the first two steps
            opt.step()
        for a, b in zip(layers[0].parameters(), layers[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert LARS(nn.Linear(2, 2).parameters(), lr=0.1).defaults["fused"]  # the default on CPU


def test_lars_fused_cpu_update_on_channels_last_weights_equals_the_reference():
    """The CPU path hands channels-last weights, gradients and buffers to the fused kernel as 1-d views of
    their memory: the update must be the per-tensor one, element for element in the right place."""
    torch.manual_seed(5)
    nets = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    nets[0].to(memory_format=torch.channels_last)
    opts = [LARS(nets[0].parameters(), lr=0.4, weight_decay=1e-3, fused=True),
            LARS(nets[1].parameters(), lr=0.4, weight_decay=1e-3, fused=False)]
    for _ in range(3):
        x = torch.randn(2, 3, 6, 6)
        for net, opt, inp in zip(nets, opts, (x.contiguous(memory_format=torch.channels_last), x)):
            opt.zero_grad(set_to_none=True)
            net(inp).pow(2).sum().backward()
            opt.step()
        assert nets[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lars_reuses_the_gradient_norms_of_its_finiteness_check_only_for_the_same_gradients():
    torch.manual_seed(4)
    layers = [nn.Linear(5, 3) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    opts = [LARS(layer.parameters(), lr=0.2, weight_decay=1e-3) for layer in layers]
    for step in range(4):
        x = torch.randn(6, 5)
        for k, (layer, opt) in enumerate(zip(layers, opts)):
            opt.zero_grad(set_to_none=True)
            layer(x).pow(2).sum().backward()
            if k == 0:
                assert bool(opt.gradients_finite())
                if step == 2:  # new gradient tensors after the check: the kept norms must not be used
                    for p in layer.parameters():
                        p.grad = p.grad * 3.0
            elif step == 2:
                for p in layer.parameters():
                    p.grad = p.grad * 3.0
            opt.step()
        for a, b in zip(layers[0].parameters(), layers[1].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    layers[0].weight.grad = torch.full_like(layers[0].weight, float("nan"))
    assert not bool(opts[0].gradients_finite())


# --- LARS: decay inside the trust ratio (LA1), group decay (LA4), zero gradient passes untouched (LA2),
#     1-d parameters decayed too (LA8)
@pytest.mark.parametrize("fused", [True, False])
def test_lars_decay_dominated_update_groups_and_zero_gradients(fused):
    g = torch.Generator().manual_seed(0)
    a, b, c = (nn.Parameter(torch.randn(10, generator=g)) for _ in range(3))
    w = nn.Parameter(torch.randn(3, 4, generator=g))
    opt = LARS([{"params": [a, w]}, {"params": [b], "weight_decay": 0.0}, {"params": [c]}], lr=1.0,
               weight_decay=0.5, fused=fused)
    grads = {p: 1e-3 * torch.randn(p.shape, generator=g) for p in (a, b, w)}
    for p, gr in grads.items():
        p.grad = gr.clone()
    c.grad = torch.zeros(10)
    before = {p: p.detach().clone() for p in (a, b, c, w)}
    opt.step()
    for p, wd in ((a, 0.5), (w, 0.5), (b, 0.0)):
        (ref, _), = naive_lars_step([before[p]], [grads[p]], [None], 1.0, 0.9, wd, 0.001)
        torch.testing.assert_close(p.detach() - before[p], ref - before[p], rtol=1e-5, atol=0)
    assert torch.equal(c.detach(), before[c])  # LARC: no decay where ||g|| = 0


# --- prototypes: every head re-normalised (P2)
def test_every_prototype_head_is_normalised():
    multi = Prototypes(16, [5, 7, 3])
    with torch.no_grad():
        for w in multi.weights():
            w.mul_(3.0)
    multi.normalize_()
    for w in multi.weights():
        torch.testing.assert_close(w.norm(dim=1), torch.ones(len(w)), atol=1e-6, rtol=0)


# --- the head runs once over all crops, so its BatchNorm sees large and small crops together (SPEC §2) (MO3)
def test_head_batch_norm_sees_all_crops_together_in_training():
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = SwAVModel(tiny_backbone(), 8, hidden_dim=16, output_dim=4, num_prototypes=10).train()
    crops = [torch.randn(3, 3, 24, 24), torch.randn(3, 3, 24, 24), torch.randn(3, 3, 12, 12), torch.randn(3, 3, 12, 12)]
    out = model(crops)
    feats = torch.cat([model.backbone(torch.cat(crops[:2])), model.backbone(torch.cat(crops[2:]))])
    torch.testing.assert_close(out.embeddings, F.normalize(model.projection_head(feats), dim=1), atol=1e-6, rtol=1e-5)
