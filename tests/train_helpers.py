"""Shared pieces of the training tests: a tiny network, an in-memory data set, a tiny config."""
from __future__ import annotations

import torch
from torch import nn
from PIL import Image
from torch.utils.data import Dataset

from swav.checkpoint import list_checkpoints, load_checkpoint
from swav.config import Config, with_values
from swav.model import SwAVModel

# every device this machine has: the CPU always, a CUDA GPU as well where one is present (CI has none)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_model(spec):
    """A two-conv trunk: the engine does not care what the backbone is, and this one is fast."""
    trunk = nn.Sequential(nn.Conv2d(spec.in_channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return SwAVModel(trunk, 8, spec.hidden_dim, spec.output_dim, spec.num_prototypes, spec.head_batch_norm)


class InMemoryImages(Dataset):
    """A data set that keeps its images as one uint8 tensor, like the IDX/CIFAR readers (tensor pipeline)."""

    def __init__(self, n: int = 24, size: int = 12) -> None:
        g = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=g)
        self.targets = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.fromarray(self.data[i].numpy()), int(self.targets[i])


def tiny_config(out, data=None, **values) -> Config:
    base = {"data.path": str(data) if data else None, "data.workers": 0, "data.channels": 3,
            "crops.counts": [2, 2], "crops.sizes": [12, 8], "crops.min_scales": [0.3, 0.1],
            "crops.max_scales": [1.0, 0.3], "model.hidden_dim": 16, "model.output_dim": 8,
            "model.num_prototypes": 10, "swav.queue_length": 0, "swav.freeze_prototypes_steps": 0,
            "optim.epochs": 3, "optim.batch_size_per_device": 4, "optim.base_lr": 0.5, "optim.final_lr": 0.005,
            "optim.warmup_epochs": 0, "run.output_dir": str(out), "run.device": "cpu", "run.precision": "fp32",
            "run.log_every_steps": 1, "run.tensorboard": False, "run.checkpoint_every_epochs": 1}
    base.update(values)
    return with_values(Config(), base)


def final_state(out):
    ckpt = load_checkpoint(list_checkpoints(out)[0])
    return ckpt


def assert_same_state(a, b):
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert (a["queues"][0] is None) == (b["queues"][0] is None)
    if a["queues"][0] is not None:
        assert torch.equal(a["queues"][0]["embeddings"], b["queues"][0]["embeddings"])
        assert int(a["queues"][0]["filled"]) == int(b["queues"][0]["filled"])


