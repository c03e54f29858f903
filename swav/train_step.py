"""One SwAV optimisation step, in the paper's order (DESIGN; SPEC §2-§6, §9).

learning rate from the per-step schedule -> normalise prototypes -> multi-crop forward (one backbone
pass per resolution) -> codes with the queue (score the queue with the current prototypes if it is
full, push the batch's embeddings, Sinkhorn on ``[queue; batch]``, keep the last B) -> swapped-
prediction loss -> backward -> drop prototype gradients while ``step < freeze_prototypes_steps`` ->
NaN/Inf check agreed by all ranks (before the optimiser step) -> optimiser step -> metrics.

Mixed precision has one code path: ``torch.autocast`` with the resolved dtype (none for fp32) and a
``GradScaler`` that is enabled only for fp16. Sinkhorn always runs in float32 (inside ``swav_loss``);
queue scores are computed in float32 too. The step's checks end in one all-reduced flag tensor
``[non-finite, stop signal, time budget over]`` (skipped when ``run.nan_check`` is off, except every
``run.log_every_steps`` steps). ``run.check_sync: step`` reads it on the host in the same step (one
host-device synchronisation per step); ``deferred`` (the default on CUDA) reads it one step later, so
the step has no synchronisation at all: the optimiser (LARS, fused kernel) skips the update on the
device when the flag says non-finite, and the error is raised one step later, naming the bad step,
before anything more is applied or saved (:meth:`SwAVStep.flush` runs before every save).

Legend: V crops, B batch per device, K prototypes, A assignment crops, L queue rows, D embedding dim.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from swav.config import Config
from swav.cpu_features import cpu_supports_bf16  # re-exported: part of this module's API
from swav.distributed import all_gather_cat, all_reduce_max_
from swav.health import NonFiniteError, gradients_finite, nonfinite_parameter_names, swapped_prediction_terms
from swav.lars import LARS
from swav.loss import swav_loss
from swav.model import SwAVModel
from swav.queue import EmbeddingQueue

__all__ = ["cpu_supports_bf16", "resolve_precision", "resolve_channels_last", "bf16_gradients_agree", "autocast_dtype", "InjectedFailure",
           "StepOutput", "SwAVStep"]

logger = logging.getLogger(__name__)



def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA with bf16 support or a bf16-capable CPU, else fp32; fp16 needs CUDA.

    Example:
        >>> resolve_precision("fp32", torch.device("cpu"))
        'fp32'
    """
    if requested == "fp32":
        return "fp32"
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "bf16" if bf16_ok else "fp32"
        if requested == "bf16" and not bf16_ok:
            raise ValueError("run.precision='bf16' but this GPU does not support bfloat16; use fp16 or fp32")
        return requested
    if requested == "fp16":
        resolved = "bf16" if cpu_supports_bf16() else "fp32"
        logger.warning("run.precision='fp16' (--use_fp16 true) needs a GPU; on this CPU using %s instead", resolved)
        return resolved
    if requested == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return requested


def resolve_channels_last(requested: bool | None, device: torch.device, precision: str) -> bool:
    """``run.channels_last``: null (auto) -> channels-last on GPUs and wherever autocast runs in bf16/fp16
    (their convolution kernels are fastest in that layout: 1.25x for the CPU default job's step, see the
    README's Speed section), the contiguous layout for fp32 on a CPU.

    Example:
        >>> resolve_channels_last(None, torch.device("cpu"), "bf16"), resolve_channels_last(None, torch.device("cpu"), "fp32")
        (True, False)
    """
    if requested is not None:
        return bool(requested)
    return device.type == "cuda" or precision in ("bf16", "fp16")


def bf16_gradients_agree(model: nn.Module, crop_shapes: Sequence[tuple[int, int, int]], *, batch: int = 16,
                         tolerance: float = 4.0, channels_last: bool = False) -> list[str]:
    """Parameters whose bf16-autocast gradient is non-finite or ``tolerance`` x larger than in fp32.

    Some CPU bf16 kernels return garbage weight gradients for degenerate shapes (seen with torch 2.x
    on AMX CPUs: a 3x3 stride-2 convolution on a 1x1 input gives gradients of 1e11 or inf), which
    would silently corrupt training. One tiny forward/backward of a copy of ``model`` in each
    precision finds them; ``crop_shapes`` are ``(channels, height, width)``, one per crop size (the bug
    shows from 8 images per backbone pass on); ``channels_last``: the memory layout training will use.
    """
    import copy

    generator = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    crops = [torch.randn(batch, *shape, generator=generator).contiguous(memory_format=layout)
             for shape in crop_shapes]
    norms: list[dict[str, float]] = []
    for dtype in (None, torch.bfloat16):
        probe = copy.deepcopy(model).train().to(memory_format=layout)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = probe(crops)
        torch.stack([s.float().logsumexp(dim=1).mean() for s in out.scores]).sum().backward()
        norms.append({n: float(p.grad.float().norm()) for n, p in probe.named_parameters() if p.grad is not None})
    fp32, bf16 = norms
    return [n for n, v in bf16.items() if not np.isfinite(v) or v > tolerance * fp32.get(n, 0.0) + 1e-3]


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class InjectedFailure(RuntimeError):
    """Raised by ``debug.inject_error_step`` to test how a failing rank stops the job (issue 5)."""


@dataclass
class StepOutput:
    """What the loop needs after a step; tensors stay on the device (no sync)."""

    loss: torch.Tensor  # 0-d, detached
    codes_ABK: torch.Tensor  # codes of the first prototype head
    lr: float
    stop_signal: int  # the stop signal any rank received (0: none), agreed by all ranks
    time_over: bool  # some rank's time budget ran out (agreed)
    skipped: bool  # fp16: the scaler skipped the update (inf/NaN gradients)


@dataclass
class _PostedFlags:
    """A step's all-reduced flags on their way to the host (``run.check_sync: deferred``)."""

    step: int
    on_device: torch.Tensor  # [non-finite, stop signal, time over], all-reduced
    host: torch.Tensor  # the same, copied without blocking
    ready: torch.cuda.Event | None
    loss: torch.Tensor
    gradient_norms: list[tuple[list[torch.Tensor], torch.Tensor | None]]  # to name parameters on failure
    terms: Callable[[], dict[str, float]] | None


def resolve_check_sync(mode: str, device: torch.device, optimizer: torch.optim.Optimizer, fp16: bool) -> str:
    """``run.check_sync`` -> "step" or "deferred". Deferred needs the fused LARS kernel (it skips a
    non-finite update on the device) and no fp16 gradient scaler (which synchronises anyway)."""
    possible = isinstance(optimizer, LARS) and all(g.get("fused") for g in optimizer.param_groups) and not fp16
    if mode == "auto":
        return "deferred" if possible and device.type == "cuda" else "step"
    if mode == "deferred" and not possible:
        raise ValueError("run.check_sync=deferred needs optim.lars=true with parameters on CPU or CUDA and "
                         "run.precision bf16 or fp32 (fp16's gradient scaler synchronises every step anyway); "
                         "use run.check_sync=step")
    return mode


class SwAVStep:
    """Holds the training objects of one rank and runs :meth:`__call__` once per batch.

    Example:
        >>> from swav.config import Config, with_values
        >>> from swav.lars import LARS
        >>> cfg = with_values(Config(), {"crops.sizes": [16], "model.num_prototypes": 10,
        ...                              "swav.freeze_prototypes_steps": 0})
        >>> trunk = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> model = SwAVModel(trunk, 8, hidden_dim=16, output_dim=4, num_prototypes=10)
        >>> step = SwAVStep(model, model, LARS(model.parameters(), lr=0.1), config=cfg, lr_schedule=np.full(5, 0.1),
        ...                 queue_length_per_rank=0, precision="fp32", device=torch.device("cpu"), rank=0)
        >>> out = step([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], step=0)
        >>> out.codes_ABK.shape, out.lr
        (torch.Size([2, 4, 10]), 0.1)
    """

    def __init__(self, model: nn.Module, raw_model: SwAVModel, optimizer: torch.optim.Optimizer, *,
                 config: Config, lr_schedule: np.ndarray, queue_length_per_rank: int, precision: str,
                 device: torch.device, rank: int, channels_last: bool | None = None) -> None:
        self.model, self.raw_model, self.optimizer = model, raw_model, optimizer
        self.config = config
        self.lr_schedule = lr_schedule
        self.queue_length = queue_length_per_rank
        self.device = device
        self.rank = rank
        self.precision = precision
        self.dtype = autocast_dtype(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.queue: EmbeddingQueue | None = None
        self.consecutive_skips = 0
        # the crops' layout: the engine's decision (which a network that cannot take channels-last overrides), else
        # run.channels_last resolved
        self.channels_last = resolve_channels_last(config.run.channels_last if channels_last is None else channels_last,
                                                   device, precision)
        self.check_sync = resolve_check_sync(config.run.check_sync, device, optimizer, precision == "fp16")
        self._posted: _PostedFlags | None = None
        self._carried: tuple[int, bool] = (0, False)  # flags read by flush(), for the next step's output
        self._queue_in_use_logged = False

    def start_epoch(self, epoch: int) -> None:
        """Create the (empty) queue at the start of epoch ``swav.queue_start_epoch`` (SPEC §5)."""
        s = self.config.swav
        if self.queue is None and self.queue_length > 0 and epoch >= s.queue_start_epoch:
            self.queue = EmbeddingQueue(len(s.crops_for_assign), self.queue_length,
                                        self.config.model.output_dim).to(self.device)
            logger.info("queue started at epoch %d: %d embeddings per rank per assignment crop (used in the codes "
                        "once full, after %d steps)", epoch, self.queue_length, -(-self.queue_length // max(
                            self.config.optim.batch_size_per_device, 1)))

    @torch.no_grad()
    def _queue_scores(self, z_ND: torch.Tensor, batch: int) -> list[list[torch.Tensor] | None]:
        """Per head: queue scores (one L x K per assignment crop) if the queue is full, then push the batch."""
        heads = len(self.raw_model.num_prototypes)
        if self.queue is None:
            return [None] * heads
        scores: list[list[torch.Tensor] | None] = [None] * heads
        if self.queue.is_full:
            if not self._queue_in_use_logged:
                self._queue_in_use_logged = True
                logger.info("queue full: its %d embeddings per rank now enter the codes", self.queue.length)
            scores = [[self.queue.embeddings[i].float() @ w.detach().float().t()
                       for i in range(self.queue.embeddings.shape[0])]
                      for w in self.raw_model.prototypes.weights()]
        ids = self.config.swav.crops_for_assign
        z = z_ND.detach().float()
        self.queue.push(torch.stack([z[a * batch:(a + 1) * batch] for a in ids]))
        return scores

    def _set_lr(self, step: int) -> float:
        lr = float(self.lr_schedule[min(step, len(self.lr_schedule) - 1)])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def __call__(self, crops: Sequence[torch.Tensor], step: int, *, stop_signal: int = 0,
                 time_over: bool = False) -> StepOutput:
        """One optimisation step; ``step`` = steps done so far (this is step ``step + 1`` in messages)."""
        cfg = self.config
        lr = self._set_lr(step)
        self.raw_model.normalize_prototypes()
        if self.channels_last:
            crops = [x.contiguous(memory_format=torch.channels_last) for x in crops]
        else:  # the layout asked for (the CPU's OpenCV colour stage hands over channels-last crops)
            crops = [x.contiguous() for x in crops]
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.model(list(crops))
        batch = crops[0].shape[0]
        with torch.autocast(self.device.type, enabled=False):
            queue_scores = self._queue_scores(out.embeddings, batch)
            loss, codes = swav_loss([s.float() for s in out.scores], cfg.num_crops, cfg.swav.crops_for_assign,
                                    cfg.swav.temperature, cfg.swav.epsilon, cfg.swav.sinkhorn_iterations,
                                    queue_scores, cfg.swav.log_domain, return_codes=True)
        if step + 1 == cfg.debug.inject_nan_step and cfg.debug.inject_nan_rank in (-1, self.rank):
            loss = loss * float("nan")
        if step + 1 == cfg.debug.inject_error_step and cfg.debug.inject_error_rank in (-1, self.rank):
            raise InjectedFailure(f"debug.inject_error_step={step + 1}: failure injected on rank {self.rank}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if step < cfg.swav.freeze_prototypes_steps:
            for p in self.raw_model.prototypes.parameters():
                p.grad = None
        self.scaler.unscale_(self.optimizer)
        terms = lambda: swapped_prediction_terms(  # noqa: E731 - evaluated only on failure
            out.scores, codes, num_crops=cfg.num_crops, crops_for_assign=cfg.swav.crops_for_assign,
            temperature=cfg.swav.temperature)
        if self.check_sync == "deferred":
            posted = self._post_flags(loss, step, stop_signal, time_over, terms)
            # the previous step's flags: the device is past them by now (no stall), and a failure there
            # raises before this step's update is queued
            self.flush()
            stop_signal, time_over = self._carried
            self._carried = (0, False)
            self._posted = posted
            skip = posted.on_device[0:1] if posted is not None and cfg.run.nan_check else None
            skipped = self._optimizer_step(step, skip_if=skip)
        else:
            stop_signal, time_over = self._agree(loss, step, stop_signal, time_over, terms)
            skipped = self._optimizer_step(step)
        return StepOutput(loss.detach(), codes[0], lr, stop_signal, time_over, skipped)

    def flush(self) -> None:
        """Read the flags of the last posted step (``run.check_sync: deferred``) and raise NonFiniteError if
        it was not finite; its stop signal and time-budget flag come out with the next step. The loop calls
        this before every checkpoint, so that nothing after a non-finite step is saved."""
        posted, self._posted = self._posted, None
        if posted is None:
            return
        if posted.ready is not None:
            posted.ready.synchronize()
        nonfinite, signal_value, over = posted.host.tolist()
        if nonfinite:
            names = {p: n for n, p in self.raw_model.named_parameters()}
            bad = [names.get(p, "?") for params, norms in posted.gradient_norms if norms is not None
                   for p, ok in zip(params, torch.isfinite(norms).tolist()) if not ok]
            self._raise_nonfinite(posted.loss, posted.step, bad, posted.terms)
        self._carried = (max(self._carried[0], int(signal_value)), self._carried[1] or bool(over))

    def _raise_nonfinite(self, loss: torch.Tensor, step: int, names: list[str],
                         loss_terms: Callable[[], dict[str, float]] | None) -> None:
        losses = all_gather_cat(loss.detach().float().reshape(1)).tolist()
        value = losses[0] if len(losses) == 1 else losses
        detail = "" if len(losses) == 1 else " (loss per rank)"
        raise NonFiniteError(step + 1, value, names, detail, terms=loss_terms() if loss_terms else None)

    def _flags(self, loss: torch.Tensor, stop_signal: int, time_over: bool,
               finite_gradients: torch.Tensor | None) -> torch.Tensor:
        flags = torch.zeros(3, device=self.device)  # filled on the device: no host-to-device copy, no extra sync
        if stop_signal:
            flags[1] = float(stop_signal)
        if time_over:
            flags[2] = 1.0
        if self.config.run.nan_check:
            bad = ~torch.isfinite(loss.detach())
            if finite_gradients is not None:
                bad = bad | ~finite_gradients
            flags[0] = bad.float()
        all_reduce_max_(flags)
        return flags

    def _post_flags(self, loss: torch.Tensor, step: int, stop_signal: int, time_over: bool,
                    terms: Callable[[], dict[str, float]]) -> _PostedFlags | None:
        """Deferred mode: all-reduce this step's flags and start copying them to the host."""
        run = self.config.run
        if not (run.nan_check or step % run.log_every_steps == 0):
            return None
        norms: list[tuple[list[torch.Tensor], torch.Tensor | None]] = []
        finite = None
        if run.nan_check:
            norms = self.optimizer.gradient_norms()  # type: ignore[attr-defined] - LARS (resolve_check_sync)
            finite = self.optimizer.gradients_finite(norms)  # type: ignore[attr-defined]
        flags = self._flags(loss, stop_signal, time_over, finite)
        pinned = self.device.type == "cuda"
        host = torch.empty(3, pin_memory=pinned)
        host.copy_(flags, non_blocking=pinned)
        ready = None
        if pinned:
            ready = torch.cuda.Event()
            ready.record()
        return _PostedFlags(step, flags, host, ready, loss.detach(), norms, terms)

    def _agree(self, loss: torch.Tensor, step: int, stop_signal: int, time_over: bool,
               loss_terms: Callable[[], dict[str, float]] | None = None) -> tuple[int, bool]:
        """All-reduce [non-finite, stop signal, time over] and read it now; raise NonFiniteError (with this
        rank's loss terms) on every rank if needed."""
        run = self.config.run
        if not (run.nan_check or step % run.log_every_steps == 0):
            return 0, False
        finite = None
        if run.nan_check and not self.scaler.is_enabled():  # fp16: inf gradients are the scaler's business
            finite = (self.optimizer.gradients_finite() if isinstance(self.optimizer, LARS)
                      else gradients_finite(self.raw_model.parameters()))
        nonfinite, signal_value, over = self._flags(loss, stop_signal, time_over, finite).tolist()
        if nonfinite:
            self._raise_nonfinite(loss, step, nonfinite_parameter_names(self.raw_model.named_parameters()),
                                  loss_terms)
        return int(signal_value), bool(over)

    def _optimizer_step(self, step: int, skip_if: torch.Tensor | None = None) -> bool:
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if skip_if is not None:
            # the fused SGD kernel's on-device skip (the protocol GradScaler uses): a non-finite step changes
            # neither parameters nor momentum buffers, and the host need not know yet
            self.optimizer.found_inf = skip_if  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
            return False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is None:
            return False
        skipped = self.scaler.get_scale() < scale
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        limit = self.config.run.max_scaler_skips
        if limit and self.consecutive_skips > limit:
            raise NonFiniteError(step + 1, float("nan"), [], f"; fp16 gradient scaler skipped {self.consecutive_skips} "
                                 f"consecutive steps (run.max_scaler_skips={limit})")
        return skipped
