"""2 processes with batch b each == 1 process with batch 2b (issue 5; SPEC §3, §5, §9), and the sampler.

Both sides run the engine's own pieces (``swav.train._wrap``: cross-rank BatchNorm + DDP, ``SwAVStep``,
LARS) on identical precomputed crops, so augmentation randomness plays no part. fp32 throughout.

What "equal" means:
* loss: each rank's loss is the mean over its local batch; DDP averages gradients over ranks, so the
  global loss is the mean of the rank losses and the averaged gradient must be the single-process
  gradient of that global-mean loss.
* codes: rank r's codes are rows ``r*b .. (r+1)*b`` of the single process's codes.
* queue: each rank keeps a FIFO of L/2 rows; Sinkhorn sees ``[queue rows of all ranks; batch rows of
  all ranks]``. A single process with one FIFO of L rows would drop a different set of old rows after
  the first push (its oldest 2b rows, not each rank's oldest b), so the reference keeps its queue as the
  concatenation of the two per-rank queues and, after each step, rebuilds it the way two per-rank FIFOs
  evolve (:func:`_as_per_rank_fifos`). The Sinkhorn input is then the same multiset on both sides (row
  order does not change Sinkhorn's result). The queues start full (random unit rows) so that they are
  used from the first step.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from swav.config import Config, with_values
from swav.dist_setup import DistContext
from swav.lars import LARS
from swav.model import build_model
from swav.train import _wrap, model_spec_from_config
from swav.train_data import ResumableSampler
from swav.train_step import SwAVStep
from tests.distributed_helpers import run_distributed

B = 4  # per-device batch
WORLD = 2
STEPS = 3
QUEUE = 16  # global queue rows: 8 per rank = 2 local batches
LR = 4.8  # the official base learning rate, so that 3 LARS steps move the parameters measurably


def _config(queue: int) -> Config:
    return with_values(Config(), {
        "data.channels": 3, "crops.counts": [2, 2], "crops.sizes": [12, 8], "crops.min_scales": [0.3, 0.1],
        "crops.max_scales": [1.0, 0.3], "model.backbone": "resnet-compact-4", "model.hidden_dim": 16,
        "model.output_dim": 8, "model.num_prototypes": 10, "swav.queue_length": queue, "swav.queue_start_epoch": 0,
        "swav.freeze_prototypes_steps": 0, "optim.base_lr": LR, "optim.warmup_epochs": 0,
        "optim.batch_size_per_device": B, "run.device": "cpu",
        "run.precision": "fp32", "run.sync_bn": True, "run.nan_check": True})


def _global_crops(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(WORLD * B, 3, s, s, generator=g) for s in (12, 12, 8, 8)]


def _initial_queue() -> torch.Tensor:
    z = torch.randn(2, QUEUE, 8, generator=torch.Generator().manual_seed(7))
    return torch.nn.functional.normalize(z, dim=-1)


class _RecordingLARS(LARS):
    """LARS that keeps a copy of the (DDP-averaged) gradients it receives, before rescaling them."""

    def step(self, closure=None):  # type: ignore[override]
        self.recorded = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def _as_per_rank_fifos(before: torch.Tensor, after: torch.Tensor, ranks: int) -> torch.Tensor:
    """The single-process queue rebuilt as ``ranks`` per-rank FIFOs: rank r pushes its b rows in front of its
    own L/ranks rows and drops its own oldest b (``after`` starts with the pushed global batch)."""
    per_rank = before.shape[1] // ranks
    parts = []
    for r in range(ranks):
        pushed = after[:, r * B:(r + 1) * B]
        kept = before[:, r * per_rank:(r + 1) * per_rank][:, :per_rank - B]
        parts += [pushed, kept]
    return torch.cat(parts, dim=1)


def _train(rank: int, world_size: int, queue: int, simulate_ranks: int = 1) -> dict:
    """STEPS engine steps on this rank's share of the fixed crops; what the comparison needs."""
    cfg = _config(queue)
    torch.manual_seed(0)
    raw = build_model(model_spec_from_config(cfg))
    ctx = DistContext(rank, world_size, 0, torch.device("cpu"), "gloo" if world_size > 1 else None, False)
    optimizer = _RecordingLARS(raw.parameters(), lr=0.0)
    step_fn = SwAVStep(_wrap(raw, ctx, cfg), raw, optimizer, config=cfg, lr_schedule=np.full(STEPS, LR),
                       queue_length_per_rank=queue // world_size, precision="fp32", device=torch.device("cpu"),
                       rank=rank)
    step_fn.start_epoch(0)
    if step_fn.queue is not None:
        rows = queue // world_size
        step_fn.queue.push(_initial_queue()[:, rank * rows:(rank + 1) * rows])
        assert step_fn.queue.is_full
    part = slice(rank * B, (rank + 1) * B) if world_size > 1 else slice(None)
    steps = []
    for k in range(STEPS):
        before = None if step_fn.queue is None else step_fn.queue.embeddings.clone()
        out = step_fn([c[part] for c in _global_crops(k)], k)
        if before is not None and simulate_ranks > 1:
            step_fn.queue.embeddings.copy_(_as_per_rank_fifos(before, step_fn.queue.embeddings, simulate_ranks))
        steps.append({"loss": out.loss.clone(), "codes": out.codes_ABK.clone(), "grads": optimizer.recorded})
    names = [n for n, _ in raw.named_parameters()]
    return {"steps": steps, "names": names, "params": [p.detach().clone() for p in raw.parameters()],
            "running": {n: b.clone() for n, b in raw.named_buffers() if "running" in n},
            "queue": None if step_fn.queue is None else step_fn.queue.embeddings.clone()}


def _both_scenarios(rank: int, world_size: int) -> dict:
    return {queue: _train(rank, world_size, queue) for queue in (0, QUEUE)}


@pytest.fixture(scope="module")
def distributed():
    return run_distributed(_both_scenarios, WORLD)


# The head's first Linear feeds BatchNorm, which removes any constant: the gradient of its bias is zero
# up to rounding on both sides (checked), and LARS turns that noise into a step of fixed size
# (rate ~ ||p|| / ||g||), so that bias, and the running mean of the BatchNorm after it, are not comparable.
ZERO_GRADIENT = "projection_head.0.bias"
AFFECTED_BUFFER = "projection_head.1.running_mean"


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """|a - e| <= rtol |e| + rtol max|e|: relative, with entries near 0 judged at the tensor's scale."""
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.distributed
@pytest.mark.parametrize("queue", [0, QUEUE], ids=["no-queue", "queue"])
def test_two_processes_equal_one_process_with_the_whole_batch(distributed, queue):
    ranks = [d[queue] for d in distributed]
    ref = _train(0, 1, queue, simulate_ranks=WORLD)
    first = ref["steps"][0]
    # one step: loss (global mean = mean of rank means), codes (rank r = rows r*b..), averaged gradients
    _close(torch.stack([r["steps"][0]["loss"] for r in ranks]).mean(), first["loss"], 1e-5, "loss")
    _close(torch.cat([r["steps"][0]["codes"] for r in ranks], dim=1), first["codes"], 1e-5, "codes")
    largest = max(float(g.abs().max()) for g in first["grads"])
    for rank in ranks:
        for name, got, want in zip(ref["names"], rank["steps"][0]["grads"], first["grads"], strict=True):
            if name == ZERO_GRADIENT:
                assert float(want.abs().max()) < 1e-5 * largest and float(got.abs().max()) < 1e-5 * largest
            else:
                _close(got, want, 1e-5, f"gradient of {name}")
    # three steps: parameters, BatchNorm running statistics (of the global batch), losses, codes, queues
    moved = max(float((p - q).abs().max()) for p, q in zip(ref["params"], _train_init_params(), strict=True))
    assert moved > 1e-2  # the parameters did move, so agreeing to rtol 1e-4 means something
    for rank in ranks:
        for name, got, want in zip(ref["names"], rank["params"], ref["params"], strict=True):
            if name != ZERO_GRADIENT:
                _close(got, want, 1e-4, f"parameter {name} after {STEPS} steps")
        for name, want in ref["running"].items():
            if name != AFFECTED_BUFFER:
                _close(rank["running"][name], want, 1e-4, f"buffer {name} after {STEPS} steps")
    for k in range(1, STEPS):
        _close(torch.stack([r["steps"][k]["loss"] for r in ranks]).mean(), ref["steps"][k]["loss"], 1e-4,
               f"loss of step {k + 1}")
        _close(torch.cat([r["steps"][k]["codes"] for r in ranks], dim=1), ref["steps"][k]["codes"], 1e-4,
               f"codes of step {k + 1}")
    if queue:
        _close(torch.cat([r["queue"] for r in ranks], dim=1), ref["queue"], 1e-4, "queue after 3 steps")
    else:
        assert ref["queue"] is None and all(r["queue"] is None for r in ranks)


def _train_init_params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [p.detach().clone() for p in build_model(model_spec_from_config(_config(0))).parameters()]


def test_per_rank_fifo_reference_matches_two_real_fifos():
    """The helper that keeps the reference queue per-rank is itself checked against two EmbeddingQueues."""
    from swav.queue import EmbeddingQueue

    start, batch = _initial_queue(), torch.randn(2, WORLD * B, 8)
    queues = [EmbeddingQueue(2, QUEUE // WORLD, 8) for _ in range(WORLD)]
    for r, q in enumerate(queues):
        q.push(start[:, r * (QUEUE // WORLD):(r + 1) * (QUEUE // WORLD)])
        q.push(batch[:, r * B:(r + 1) * B])
    single = EmbeddingQueue(2, QUEUE, 8)
    single.push(start)
    single.push(batch)
    rebuilt = _as_per_rank_fifos(start, single.embeddings, WORLD)
    assert torch.equal(rebuilt, torch.cat([q.embeddings for q in queues], dim=1))
    assert not torch.equal(single.embeddings, rebuilt)  # one long FIFO would drop other rows


@pytest.mark.parametrize("size,world", [(24, 2), (24, 3), (25, 2), (31, 4)])
def test_sampler_ranks_cover_the_data_set_once_per_epoch(size, world):
    batch = 2
    seen = {}
    for epoch in (0, 1):
        samplers = [ResumableSampler(size, num_replicas=world, rank=r, seed=31, batch_size=batch) for r in range(world)]
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [[i for e, i in s if e == epoch] for s in samplers]
        flat = [i for p in per_rank for i in p]
        assert all(len(p) == size // world for p in per_rank)  # equal steps on every rank (DDP)
        assert len(set(flat)) == len(flat) == size - size % world  # disjoint; drop_last leaves out size % world
        if size % world == 0:
            assert sorted(flat) == list(range(size))  # the union is the data set
        # global batch k (batch k of every rank) is the k-th block of the one-process permutation: this is
        # what lets a resume on another world size continue after exactly the samples already seen
        order = _one_rank_order(size, epoch)
        for k in range(size // world // batch):
            block = {i for p in per_rank for i in p[k * batch:(k + 1) * batch]}
            assert block == set(order[k * batch * world:(k + 1) * batch * world])
        seen[epoch] = per_rank
    assert all(seen[0][r] != seen[1][r] for r in range(world))  # set_epoch changes every rank's order
    again = ResumableSampler(size, num_replicas=world, rank=0, seed=31, batch_size=batch)
    again.set_epoch(1)
    assert [i for _, i in again] == seen[1][0]  # and the same epoch gives the same order


def _one_rank_order(size: int, epoch: int) -> list[int]:
    s = ResumableSampler(size, num_replicas=1, rank=0, seed=31, batch_size=1)
    s.set_epoch(epoch)
    return [i for _, i in s]
