"""The config's augmentation settings reach every pipeline's stages, crops change from epoch to epoch, and each
rank's data-loader workers draw their own random numbers (SPEC §7, §13)."""
from __future__ import annotations

import pytest
import torch

from swav.batch_augment import FastMultiCrop
from swav.config import Config, with_values
from swav.multicrop import CropGroup, MultiCropTransform
from swav.train_data import CropDataset, build_train_loader, colour_stage, per_image_stages


def test_every_pipeline_takes_the_configs_colour_settings(monkeypatch) -> None:
    import swav.tensor_multicrop as tm

    cfg = with_values(Config(), {"crops.color_jitter_strength": 0.5, "crops.grayscale_prob": 0.3,
                                 "crops.blur_prob": 0.1, "data.channels": 3, "data.workers": 0,
                                 "optim.batch_size_per_device": 2})
    for stage in (colour_stage(cfg), per_image_stages(cfg, "pil")[0]):  # batched/device, and per-image PIL
        assert (stage.grayscale_prob, stage.blur_prob) == (0.3, 0.1)
        # strength 0.5: brightness/contrast/saturation 0.8 x 0.5, hue 0.2 x 0.5
        assert stage.jitter_ranges[0] == pytest.approx((0.6, 1.4)) and stage.jitter_ranges[-1] == pytest.approx((-0.1, 0.1))
    made = {}
    real = tm.TensorMultiCrop.__init__

    def spy(self, *args, **kwargs):
        made.update(kwargs)
        real(self, *args, **kwargs)
    monkeypatch.setattr(tm.TensorMultiCrop, "__init__", spy)

    class InMemory(torch.utils.data.Dataset):
        data = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
        targets = torch.zeros(8)

        def __len__(self) -> int:
            return 8

        def __getitem__(self, i):
            return self.data[i], 0
    build_train_loader(cfg, InMemory(), pipeline="tensor", rank=0, world_size=1, device=torch.device("cpu"))
    assert (made["jitter_strength"], made["grayscale_prob"], made["blur_prob"]) == (pytest.approx(0.4), 0.3, 0.1)


def test_fast_multicrop_passes_its_probabilities_on() -> None:
    fast = FastMultiCrop([CropGroup(8, 1, 0.5, 1.0)], grayscale_prob=0.3, blur_prob=0.1, color_jitter_strength=0.5)
    assert (fast.augment.grayscale_prob, fast.augment.blur_prob) == (0.3, 0.1)
    assert fast.augment.jitter_ranges[0] == pytest.approx((0.6, 1.4))


def test_per_image_crops_change_from_epoch_to_epoch_and_repeat_within_one() -> None:
    base = [torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))]
    dataset = CropDataset(base, MultiCropTransform([CropGroup(8, 1, 0.1, 0.5)], seed=0))
    first, second, again = dataset[(0, 0)][0], dataset[(1, 0)][0], dataset[(0, 0)][0]
    assert not torch.equal(first, second) and torch.equal(first, again)


def test_data_loader_workers_of_two_ranks_draw_different_numbers(monkeypatch) -> None:
    """Ranks started with the same seed get the same DataLoader base seeds: the rank is mixed into the workers'
    seeds (SPEC §13: identical augmentations on every rank)."""
    import swav.multicrop as multicrop

    def draw(rank: int) -> float:
        monkeypatch.setattr(multicrop, "current_rank", lambda: rank)
        torch.manual_seed(123)
        multicrop.seed_worker(0)
        return torch.rand(1).item()
    assert draw(0) != draw(1) and draw(1) == draw(1)
