"""Evaluation protocols of SPEC §11 on a trained backbone's pooled features.

* :func:`knn_accuracy` / :func:`knn_classify` (``swav.eval.knn``): weighted k-NN, k=20, T=0.07.
* :func:`linear_probe` (full, official) and :func:`linear_probe_features` (fast, pre-extracted
  features) in ``swav.eval.linear``.
* :func:`finetune` with :class:`FinetuneClassifier` (``swav.eval.finetune``) on a labelled subset
  from :func:`stratified_fraction` or :func:`read_subset_file` (``swav.eval.subsets``).
* :func:`eval_transforms` / :func:`transforms_for_spec` (``swav.eval.transforms``).

Feature extraction itself lives in :mod:`swav.features`. Names are imported lazily, so that
``import swav.eval`` stays light.

Example:
    >>> import torch
    >>> from swav.eval import knn_accuracy
    >>> knn_accuracy(torch.eye(2), torch.tensor([0, 1]), torch.eye(2), torch.tensor([0, 1]), k=1)["top1"]
    100.0
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "knn_classify": "swav.eval.knn",
    "knn_accuracy": "swav.eval.knn",
    "LinearClassifier": "swav.eval.linear",
    "linear_probe": "swav.eval.linear",
    "linear_probe_features": "swav.eval.linear",
    "FinetuneClassifier": "swav.eval.finetune",
    "finetune": "swav.eval.finetune",
    "default_learning_rates": "swav.eval.finetune",
    "scaled_milestones": "swav.eval.finetune",
    "stratified_fraction": "swav.eval.subsets",
    "read_subset_file": "swav.eval.subsets",
    "ClassifierResult": "swav.eval.epochs",
    "topk_accuracy": "swav.eval.accuracy",
    "eval_transforms": "swav.eval.transforms",
    "transforms_for_spec": "swav.eval.transforms",
    "pretraining_normalization": "swav.eval.transforms",
    "transforms_for_checkpoint": "swav.eval.transforms",
    "eval_sizes": "swav.eval.transforms",
}

__all__ = [
    "ClassifierResult",
    "FinetuneClassifier",
    "LinearClassifier",
    "default_learning_rates",
    "eval_transforms",
    "finetune",
    "knn_accuracy",
    "knn_classify",
    "linear_probe",
    "linear_probe_features",
    "pretraining_normalization",
    "read_subset_file",
    "scaled_milestones",
    "stratified_fraction",
    "topk_accuracy",
    "transforms_for_checkpoint",
    "transforms_for_spec",
    "eval_sizes",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'swav.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
