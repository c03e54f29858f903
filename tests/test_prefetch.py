"""Background batch making for the in-memory pipeline (``data.prefetch_batches``)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from swav.train import train
from swav.train_data import prefetched

from train_helpers import InMemoryImages, tiny_config, tiny_model


def test_prefetched_keeps_order_and_reraises_errors() -> None:
    assert list(prefetched(iter(range(20)), depth=3)) == list(range(20))

    def failing():
        yield 1
        raise KeyError("broken batch")

    got = []
    with pytest.raises(KeyError, match="broken batch"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1]


def test_closing_the_consumer_stops_the_thread() -> None:
    made = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield i
            i += 1

    before = {t.ident for t in threading.enumerate()}
    stream = prefetched(endless(), depth=1)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
            t.name == "swav-prefetch" and t.ident not in before for t in threading.enumerate()):
        time.sleep(0.05)
    assert not any(t.name == "swav-prefetch" and t.ident not in before for t in threading.enumerate())
    assert len(made) <= 6  # at most the queue depth plus the item in hand ahead of the consumer


def test_training_with_prefetch_is_bit_identical(tmp_path) -> None:
    dataset = InMemoryImages(20)
    values = {"data.pipeline": "tensor", "optim.epochs": 2}
    states = []
    for prefetch in (0, 2):
        out = tmp_path / f"p{prefetch}"
        result = train(tiny_config(out, None, **values, **{"data.prefetch_batches": prefetch}), dataset=dataset,
                       model_builder=tiny_model)
        assert result.status == "complete"
        states.append(torch.load(out / "model.pt", weights_only=False)["model"])
    assert states[0].keys() == states[1].keys() and len(states[0]) > 5
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
