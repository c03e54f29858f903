"""Background batch making (``data.prefetch_batches``) for the tensor, batched and device pipelines."""
from __future__ import annotations

import threading

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

    closed = []

    def endless_with_cleanup():
        try:
            yield from endless()
        finally:
            closed.append(threading.current_thread().name)

    before = {t.ident for t in threading.enumerate()}
    stream = prefetched(endless_with_cleanup(), depth=1)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    # close() returns once the thread has ended (joined), and the source was closed in that thread (where a
    # DataLoader iterator's workers are shut down), not left to the garbage collector at exit
    assert not any(t.name == "swav-prefetch" and t.ident not in before for t in threading.enumerate())
    assert closed == ["swav-prefetch"]
    assert len(made) <= 6  # at most the queue depth plus the item in hand ahead of the consumer


@pytest.mark.parametrize("pipeline", ["tensor", "batched", "device"])
def test_training_with_prefetch_is_bit_identical(tmp_path, pipeline: str) -> None:
    if pipeline == "tensor":
        dataset, folder = InMemoryImages(20), None
    else:  # an image folder of JPEGs (the device pipeline reads files)
        from PIL import Image
        dataset, folder = None, tmp_path / "images"
        folder.mkdir()
        g = torch.Generator().manual_seed(3)
        for i in range(20):
            small = torch.randint(0, 256, (8, 10, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(small).resize((30, 24), Image.BICUBIC).save(folder / f"{i}.jpg")
    values = {"data.pipeline": pipeline, "optim.epochs": 2}
    states = []
    for prefetch in (0, 2):
        out = tmp_path / f"p{prefetch}"
        result = train(tiny_config(out, folder, **values, **{"data.prefetch_batches": prefetch}), dataset=dataset,
                       model_builder=tiny_model)
        assert result.status == "complete" and result.step == 10
        states.append(torch.load(out / "model.pt", weights_only=False)["model"])
    assert states[0].keys() == states[1].keys() and len(states[0]) > 5
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_prefetch_default_is_auto_one_for_the_gpu_device_pipeline_only() -> None:
    from swav.config import Config, with_values
    from swav.train_data import prefetch_depth

    auto = Config()
    assert auto.data.prefetch_batches is None
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert prefetch_depth(auto, "device", cuda) == 1  # the GPU decoder blocks its thread: decode beside the step
    assert [prefetch_depth(auto, p, d) for p, d in (("device", cpu), ("batched", cuda), ("tensor", cuda))] == [0, 0, 0]
    assert prefetch_depth(with_values(auto, {"data.prefetch_batches": 0}), "device", cuda) == 0
    assert prefetch_depth(with_values(auto, {"data.prefetch_batches": "3"}), "tensor", cpu) == 3
    assert with_values(auto, {"data.prefetch_batches": "null"}).data.prefetch_batches is None
    with pytest.raises(ValueError, match=r"data.prefetch_batches=-1 is invalid: expected an integer >= 0 or null"):
        with_values(auto, {"data.prefetch_batches": -1})


def test_the_batch_thread_takes_the_consumers_gpu_and_stream_for_a_device_without_index(monkeypatch) -> None:
    """``torch.device("cuda")`` has no index, which ``torch.cuda.set_device`` refuses: the thread takes the GPU of the
    consumer's current stream. The CUDA calls are stubbed so that this runs on a machine without a GPU."""
    class FakeStream:
        device = torch.device("cuda", 1)

    consumer_stream, calls = FakeStream(), []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: consumer_stream)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("device", device)))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: calls.append(("stream", stream)))
    assert list(prefetched(iter(range(3)), 1, torch.device("cuda"))) == [0, 1, 2]
    assert calls == [("device", torch.device("cuda", 1)), ("stream", consumer_stream)]
