"""Pretraining from Python: ``swav.pretrain`` with a network of one's own, loaded back with the same builder, and
progress that a script without logging set up still shows."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swav
from tests.train_helpers import InMemoryImages, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_with_a_network_of_ones_own_loads_back_with_its_builder(tmp_path):
    cfg = tiny_config(tmp_path / "run", **{"optim.epochs": 1})
    result = swav.pretrain(cfg, dataset=InMemoryImages(16), model_builder=tiny_model)
    assert isinstance(result, swav.TrainResult) and result.status == "complete"
    assert "the network of tiny_model()" in (tmp_path / "run" / "train.log").read_text()
    with pytest.raises(Exception, match="missing"):  # the registry's resnet50 is not this network
        swav.load_pretrained(tmp_path / "run" / "model.pt")
    model = swav.load_pretrained(tmp_path / "run" / "model.pt", model_builder=tiny_model)
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(TypeError, match="expected a swav.Config"):
        swav.pretrain({"run": {"output_dir": str(tmp_path / "x")}})
    assert {"pretrain", "Config", "with_values", "load_recipe", "load_pretrained"} <= set(dir(swav))


def test_a_script_without_logging_set_up_sees_the_progress(tmp_path):
    script = ("import swav; from tests.train_helpers import InMemoryImages, tiny_config, tiny_model; "
              f"swav.pretrain(tiny_config({str(tmp_path / 'run')!r}, **{{'optim.epochs': 1}}), "
              "dataset=InMemoryImages(16), model_builder=tiny_model); "
              "import logging; assert not logging.getLogger('swav').handlers")  # removed again afterwards
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1/1 step" in done.stderr and "training complete" in done.stderr


def test_library_inputs_that_would_mislead_are_refused(tmp_path):
    from swav.eval.knn import knn_accuracy
    from swav.eval.linear import linear_probe_features

    x, y = torch.randn(8, 4), torch.arange(8) % 2
    with pytest.raises(ValueError, match="train_labels: hold 4 negative label"):  # -1 would be trained as class 1
        linear_probe_features(x, y - 1, x, y, epochs=1, progress=False)
    with pytest.raises(ValueError, match="test_labels: hold 4 negative label"):  # would count as misses
        knn_accuracy(x, y, x, y - 1, k=2)
    if not torch.cuda.is_available():  # not "damaged": the file is fine, the device is missing
        model = swav.build_model(swav.ModelSpec("resnet-compact-8", small_images=True, hidden_dim=0, output_dim=4,
                                                num_prototypes=3))
        from swav.export import export_full
        path = export_full(model, tmp_path / "m.pt")
        with pytest.raises(ValueError, match="CUDA is not available here"):
            swav.load_pretrained(path, map_location="cuda")
        from swav.export import export_safetensors
        tensors = export_safetensors(model, tmp_path / "m.safetensors")
        with pytest.raises(ValueError, match="CUDA is not available here"):
            swav.load_pretrained(tensors, map_location="cuda:0")


def test_partial_without_resume_is_refused_as_on_the_command_line(tmp_path):
    from swav.usage import UsageError

    with pytest.raises(UsageError, match="partial=True applies with resume=True only"):
        swav.pretrain(tiny_config(tmp_path / "run"), dataset=InMemoryImages(8), model_builder=tiny_model,
                      partial=True)
    assert not (tmp_path / "run").exists()
