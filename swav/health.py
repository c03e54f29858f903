"""Training health signals of SPEC §13: collapse, prototypes in use, NaN/Inf.

* Collapse: a model whose embeddings are all equal gets uniform codes and a loss of exactly ln K
  (SPEC §4). :class:`CollapseMonitor` warns once when the logged loss stays near or above ln K for a
  while after warm-up, with the remedies users report (a loss above ln K: predictions worse than uniform).
* Prototypes in use: how many distinct prototypes win the argmax of the batch's codes; 1 (or a
  handful) means the assignments collapsed even if the loss looks fine.
* NaN/Inf: :func:`nonfinite_parameter_names` names the parameters whose gradients are not finite,
  :func:`swapped_prediction_terms` recomputes the loss terms l(a, v) of SPEC §4 (only when something
  already went wrong, to say where); :class:`NonFiniteError` carries the step, the loss, the terms and
  those names.

Legend: A assignment crops, B batch, K prototypes.

Example:
    >>> import math, torch
    >>> prototypes_in_use(torch.eye(4)[[0, 1, 1, 3]].unsqueeze(0))
    3
    >>> monitor = CollapseMonitor(math.log(100), start_step=0, patience=2)
    >>> monitor.update(10, 4.6) is None, monitor.update(20, 4.6) is not None
    (True, True)
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["COLLAPSE_ADVICE", "DIVERGENCE_ADVICE", "CollapseMonitor", "loss_floor", "NonFiniteError", "NonFiniteStateError", "prototype_counts", "prototypes_in_use", "prototypes_in_use_globally",
           "gradients_finite", "nonfinite_parameter_names", "nonfinite_state_names", "swapped_prediction_terms"]

COLLAPSE_ADVICE = (
    "lower swav.epsilon (e.g. 0.03), freeze the prototypes longer (swav.freeze_prototypes_steps), use fewer "
    "or milder crops (crops.counts / crops.min_scales), start the queue later or shorten it "
    "(swav.queue_start_epoch / swav.queue_length), lower the learning rate, or check swav.temperature (0.1: a "
    "high temperature keeps the loss near ln K by construction)")
DIVERGENCE_ADVICE = (
    "lower the learning rate (optim.base_lr) or lengthen the warm-up (optim.warmup_epochs), and freeze the "
    "prototypes longer (swav.freeze_prototypes_steps); if the loss rose when the queue started, start it later "
    "or shorten it (swav.queue_start_epoch / swav.queue_length)")


def loss_floor(num_prototypes: int, temperature: float) -> float:
    """The lowest swapped-prediction loss a model can reach with ``num_prototypes`` prototypes at
    ``temperature``: one-hot codes, a cosine of 1 to the right prototype and -1 to all others. A loss near ln K
    only means collapse if this is well below ln K.

    >>> round(loss_floor(3000, 0.1), 6), round(loss_floor(3000, 5.0), 2)
    (6e-06, 7.61)
    """
    return math.log1p((num_prototypes - 1) * math.exp(-2.0 / temperature))


def prototypes_in_use(codes_ABK: torch.Tensor) -> int:
    """Number of distinct prototypes that are the argmax of some code (all assignment crops)."""
    return int(torch.unique(codes_ABK.argmax(dim=-1)).numel())


def prototype_counts(codes_ABK: torch.Tensor) -> torch.Tensor:
    """How many codes (all assignment crops) have each prototype as their argmax: a ``(K,)`` int64 tensor, which
    ranks sum to count the prototypes in use over the global batch.

    >>> prototype_counts(torch.eye(4)[[0, 1, 1, 3]].unsqueeze(0)).tolist()
    [1, 2, 0, 1]
    """
    return torch.bincount(codes_ABK.argmax(dim=-1).flatten(), minlength=codes_ABK.shape[-1])


def prototypes_in_use_globally(codes_ABK: torch.Tensor) -> int:
    """:func:`prototypes_in_use` over every rank's codes (one all-reduce of ``K`` counts; a collective: every rank
    calls it). Counted on one rank, 64 ranks x 64 images could never show more than 128 of 3000 prototypes."""
    from swav.distributed import all_reduce_sum_

    return int((all_reduce_sum_(prototype_counts(codes_ABK)) > 0).sum())


class CollapseMonitor:
    """Warn once when the loss sits at or above ln K (within ``tolerance``, relative) for ``patience`` updates.

    Near ln K, the codes are uniform (collapse); well above it, the predictions are worse than uniform
    (diverging, often with collapsing embeddings): either way the model is not learning. Updates before
    ``start_step`` (warm-up, prototype freezing) are ignored: early training naturally starts near ln K. A
    non-finite loss (only possible with ``run.nan_check=false``) is reported once as well.
    """

    def __init__(self, collapse_loss: float, *, start_step: int, patience: int = 5, tolerance: float = 0.02,
                 nan_check: bool = True) -> None:
        if patience < 1 or not 0 < tolerance < 1:
            raise ValueError(f"patience={patience} must be >= 1 and tolerance={tolerance} in (0, 1)")
        self.collapse_loss = collapse_loss
        self.start_step = start_step
        self.patience = patience
        self.tolerance = tolerance
        self._streak = 0
        self.warned = False
        self.warned_nonfinite = False
        self.nan_check = nan_check  # on: a non-finite step is skipped and stops the run (no warning needed here)

    def update(self, step: int, loss: float) -> str | None:
        """Record one logged loss; returns the warning text the first time collapse is detected."""
        if not math.isfinite(loss):
            if self.warned_nonfinite or self.nan_check:
                return None
            self.warned_nonfinite = True
            return (f"the loss is {loss} at step {step} (run.nan_check=false lets such steps update the model): "
                    "the weights are probably damaged; the run stops before it would save non-finite weights")
        if step < self.start_step:
            return None
        stuck = loss >= (1.0 - self.tolerance) * self.collapse_loss
        self._streak = self._streak + 1 if stuck else 0
        if self._streak >= self.patience and not self.warned:
            self.warned = True
            if loss > (1.0 + self.tolerance) * self.collapse_loss:
                return (f"training is not learning: the loss has stayed at or above ln K = {self.collapse_loss:.3f} "
                        f"(uniform predictions) for {self._streak} logged steps (now {loss:.4f} at step {step}), "
                        f"so the model predicts worse than chance and its embeddings may collapse; "
                        f"{DIVERGENCE_ADVICE}")
            return (f"possible collapse: the loss has stayed within {self.tolerance:.0%} of ln K = "
                    f"{self.collapse_loss:.3f} for {self._streak} logged steps (now {loss:.4f} at step {step}); "
                    f"try to {COLLAPSE_ADVICE}")
        return None


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/Inf; raised before the optimiser step (nothing is saved).

    ``terms`` (optional): the loss terms by name (see :func:`swapped_prediction_terms`), shown in the message.
    """

    def __init__(self, step: int, loss: float, parameter_names: list[str], detail: str = "",
                 terms: dict[str, float] | None = None) -> None:
        self.step, self.loss, self.parameter_names = step, loss, parameter_names
        self.terms = dict(terms or {})
        shown = ", ".join(parameter_names[:10]) + (" ..." if len(parameter_names) > 10 else "")
        where = f"non-finite gradients in {len(parameter_names)} parameter(s): {shown}" if parameter_names \
            else "gradients finite"
        if self.terms:
            listed = ", ".join(f"{k} = {int(v)}" if "non-finite" in k else f"{k} = {v:.4g}"
                               for k, v in list(self.terms.items())[:12])  # counts of entries, values of terms
            more = f" ... ({len(self.terms)} in all)" if len(self.terms) > 12 else ""
            detail = f"; loss terms {listed}{more}{detail}"
        super().__init__(
            f"training stopped in step {step}: loss = {loss} ({where}){detail}. The optimiser step was not "
            f"taken and nothing was saved; the newest checkpoint (if any was written: it is from step {step - 1} or earlier) is the resume "
            "point. "
            "Common causes: "
            "learning rate too high, fp16 overflow (try run.precision=bf16 or fp32)")


class NonFiniteStateError(NonFiniteError):
    """The model's parameters or buffers hold NaN/Inf although every step's loss and gradients were finite
    (an update or a BatchNorm running statistic overflowed); raised before a checkpoint or ``model.pt`` would
    be written, so no saved file holds them."""

    def __init__(self, step: int, names: list[str], newest: str | None, *, nan_check: bool = True) -> None:
        self.step, self.loss, self.parameter_names, self.terms = step, float("nan"), names, {}
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        what = f"{len(names)} parameter or BatchNorm statistic tensor(s) of the model hold NaN/Inf ({shown})" \
            if names else "parameters or BatchNorm statistics of the model hold NaN/Inf on another rank"
        checked = ("although the loss and gradients were finite" if nan_check else
                   "(run.nan_check=false: losses and gradients were not checked; turn it on to stop at the first "
                   "bad step, before its update)")
        where = (f"the newest checkpoint is {newest}; resume from it with a lower learning rate "
                 f"(`swav pretrain --output-dir RUN --resume --set optim.base_lr=...`), or start again if it "
                 "fails at the same step (the weights may already be out of range)" if newest
                 else "no checkpoint was written before it; start again with a lower learning rate")
        RuntimeError.__init__(
            self, f"training stopped after step {step}: {what} {checked}. Nothing was saved; {where}. "
            "Common causes: learning rate too high, fp16 overflow (try run.precision=bf16 or fp32)")


def nonfinite_state_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and BatchNorm running statistics of ``model`` that hold a NaN or an Inf (one
    fused norm over all of them; names are looked up only when one is not finite). Other buffers are left
    alone: a model may keep constant non-finite ones (an attention mask of -inf)."""
    named = [(n, t) for n, t in model.named_parameters() if t.is_floating_point()]
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase):
            named += [(f"{prefix}.{n}" if prefix else n, t) for n, t in module.named_buffers(recurse=False)
                      if t is not None and t.is_floating_point()]
    if not named:
        return []
    norms = torch._foreach_norm([t.detach() for _, t in named])
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return []
    return [n for n, t in named if not bool(torch.isfinite(t).all())]


def gradients_finite(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """A 0-d bool tensor on the gradients' device: all gradients finite (no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    norms = torch._foreach_norm(grads)
    return torch.isfinite(torch.stack([n.float() for n in norms])).all()


def nonfinite_parameter_names(named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an Inf."""
    return [name for name, p in named_parameters
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())]


@torch.no_grad()
def swapped_prediction_terms(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], *, num_crops: int,
                             crops_for_assign: Sequence[int], temperature: float) -> dict[str, float]:
    """Every term l(a, v) = -mean_b sum_k q_a[b, k] log softmax(s_v[b] / temperature)[k] of SPEC §4.

    ``scores``: one ``(V*B, K)`` tensor per prototype head (crop-major); ``codes``: one ``(A, B, K)``
    tensor per head. Keys are ``"l(a,v)"`` (``"head h l(a,v)"`` with several heads), plus, only where
    some are NaN/Inf, ``"non-finite scores(v)"`` and ``"non-finite codes(a)"`` = how many entries of crop
    ``v``'s scores or crop ``a``'s codes are not finite (non-finite codes with finite scores point at
    Sinkhorn, SPEC §3). Meant for error messages (float64 on the CPU, the slow obvious way).

    Example:
        >>> terms = swapped_prediction_terms([torch.zeros(2 * 3, 4)], [torch.full((1, 3, 4), 0.25)], num_crops=2,
        ...                                  crops_for_assign=[0], temperature=0.1)
        >>> {k: round(v, 4) for k, v in terms.items()}   # uniform scores and codes: ln 4
        {'l(0,1)': 1.3863}
    """
    terms: dict[str, float] = {}
    for h, (head_scores, head_codes) in enumerate(zip(scores, codes)):
        prefix = f"head {h} " if len(scores) > 1 else ""
        s = head_scores.detach().double().cpu()
        q_all = head_codes.detach().double().cpu()
        batch = s.shape[0] // num_crops
        for v in range(num_crops):
            bad = int((~torch.isfinite(s[v * batch:(v + 1) * batch])).sum())
            if bad:
                terms[f"{prefix}non-finite scores({v})"] = float(bad)
        for i, a in enumerate(crops_for_assign):
            q = q_all[i]
            bad = int((~torch.isfinite(q)).sum())
            if bad:
                terms[f"{prefix}non-finite codes({a})"] = float(bad)
            for v in range(num_crops):
                if v != a:
                    log_p = F.log_softmax(s[v * batch:(v + 1) * batch] / temperature, dim=1)
                    terms[f"{prefix}l({a},{v})"] = float(-(q * log_p).sum(dim=1).mean())
    return terms
