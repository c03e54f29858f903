"""The ``device`` pipeline: batched decode + roi_align crops (issue "Speed"), checked on the CPU."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align

from swav.batch_augment import MultiCropCropper
from swav.device_crops import (DeviceMultiCrop, EncodedImageDataset, encoded_collate, header_size,
                               split_encoded)
from swav.multicrop import CropGroup, crop_generator
from swav.train import train
from swav.train_data import resolve_pipeline

from train_helpers import InMemoryImages, tiny_config, tiny_model

GROUPS = [CropGroup(48, 2, 0.14, 1.0), CropGroup(24, 3, 0.05, 0.14)]


def smooth_image(seed: int, size=(120, 90)) -> Image.Image:
    """A photo-like RGB image: upsampled noise (smooth regions and edges)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    return small.resize(size, Image.BICUBIC)


def encode(image: Image.Image, fmt: str = "JPEG") -> torch.Tensor:
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=95) if fmt == "JPEG" else image.save(buffer, fmt)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_same_boxes_as_the_per_image_cropper_and_close_pixels() -> None:
    images = [smooth_image(i) for i in range(6)]
    encoded = [encode(im) for im in images]
    crops = DeviceMultiCrop(GROUPS, seed=4)(encoded, list(range(6)), epoch=2)
    assert [tuple(c.shape) for c in crops] == [(6, 3, 48, 48)] * 2 + [(6, 3, 24, 24)] * 3
    assert all(c.dtype == torch.uint8 for c in crops)
    cropper = MultiCropCropper(GROUPS, seed=4)
    cropper.set_epoch(2)
    # the reference decodes the same JPEG bytes and resizes with antialiased bilinear
    reference = [cropper(bytes(e.numpy()), index=i) for i, e in enumerate(encoded)]
    for v, batch in enumerate(crops):
        expected = torch.stack([reference[b][v] for b in range(6)]).float()
        diff = (batch.float() - expected).abs()
        assert diff.mean() < 2.0, (v, float(diff.mean()))
    # a different epoch cuts other rectangles
    other = DeviceMultiCrop(GROUPS, seed=4)(encoded, list(range(6)), epoch=3)
    assert not torch.equal(other[0], crops[0])
    again = DeviceMultiCrop(GROUPS, seed=4)(encoded, list(range(6)), epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(again, crops))


def test_png_and_mixed_sizes_are_decoded_on_the_cpu_and_cropped_alike() -> None:
    images = [smooth_image(0, (120, 90)), smooth_image(1, (70, 100)), smooth_image(2, (120, 90))]
    encoded = [encode(images[0]), encode(images[1], "PNG"), encode(images[2])]
    cropper = DeviceMultiCrop(GROUPS, seed=0)
    crops = cropper(encoded, [0, 1, 2])
    assert cropper.cpu_decoded == 1
    reference = MultiCropCropper(GROUPS, seed=0)(images[1], index=1)
    for v in range(5):  # the PNG is lossless: compare with the decoded image's crops
        assert (crops[v][1].float() - reference[v].float()).abs().mean() < 2.0


def test_many_source_sizes_give_exactly_the_crops_of_one_roi_align_per_box() -> None:
    """The batch is planned once across source sizes (as ImageNet's): every crop must still be exactly the
    roi_align of its own box on its own image, in (crop, image) order."""
    sizes = [(120, 90), (70, 100), (120, 90), (64, 64), (70, 100), (99, 77), (120, 90), (64, 64)]
    encoded = [encode(smooth_image(i, size)) for i, size in enumerate(sizes)]
    indices = [5, 3, 11, 0, 7, 2, 9, 4]
    cropper = DeviceMultiCrop(GROUPS, seed=6)
    crops = cropper(encoded, indices, epoch=1)
    images = cropper.decode(encoded)
    boxes = [cropper.cropper.sample_boxes(im.shape[1], im.shape[2], crop_generator(6, 1, index, 0))
             for im, index in zip(images, indices)]
    sizes_out = [g.size for g in GROUPS for _ in range(g.count)]
    for v, batch in enumerate(crops):
        assert tuple(batch.shape) == (len(sizes), 3, sizes_out[v], sizes_out[v])
        for b, image in enumerate(images):
            box = boxes[b][v]
            roi = torch.tensor([[0.0, box.left, box.top, box.left + box.width, box.top + box.height]])
            expected = roi_align(image[None].float(), roi, output_size=sizes_out[v], spatial_scale=1.0,
                                 sampling_ratio=-1, aligned=True).round().clamp(0, 255).to(torch.uint8)[0]
            assert torch.equal(batch[b], expected), (v, b)


def test_grayscale_output_has_one_channel() -> None:
    crops = DeviceMultiCrop(GROUPS, channels=1, seed=0)([encode(smooth_image(0))], [0])
    assert tuple(crops[0].shape) == (1, 1, 48, 48)


def test_corrupt_file_names_the_fix() -> None:
    good = encode(smooth_image(0))
    bad = torch.cat([good[:40], torch.zeros(200, dtype=torch.uint8)])  # JPEG header, garbage body
    with pytest.raises(ValueError, match="swav scan"):
        DeviceMultiCrop(GROUPS, seed=0)([good, bad], [0, 1])
    with pytest.raises(ValueError, match="'photos/b.jpg' cannot be decoded"):
        DeviceMultiCrop(GROUPS, seed=0)([good, bad], [0, 1], names=["photos/a.jpg", "photos/b.jpg"])


def test_encoded_dataset_reads_bytes_and_collates(tmp_path) -> None:
    from swav.datasets import ImageFolderDataset
    for i in range(3):
        smooth_image(i).save(tmp_path / f"{i}.jpg")
    dataset = EncodedImageDataset(ImageFolderDataset(tmp_path))
    items = [dataset[(5, i)] for i in range(3)]
    buffer, ends, indices, epoch = encoded_collate(items)
    assert indices == [0, 1, 2] and epoch == 5
    data = split_encoded(buffer, ends)
    assert bytes(data[1].numpy()) == (tmp_path / "1.jpg").read_bytes()
    with pytest.raises(ValueError, match="folder of image files"):
        EncodedImageDataset(InMemoryImages(4))


def test_boxes_drawn_in_workers_give_the_same_crops(tmp_path) -> None:
    """Workers draw the boxes from the header's size; the main process redraws where the decoded size differs."""
    from swav.datasets import ImageFolderDataset
    sizes = [(120, 90), (70, 100), (120, 90), (64, 64)]
    for i, size in enumerate(sizes):
        smooth_image(i, size).save(tmp_path / f"{i}.jpg")
    (tmp_path / "4.png").write_bytes(bytes(encode(smooth_image(4, (50, 80)), "PNG").numpy()))
    dataset = EncodedImageDataset(ImageFolderDataset(tmp_path), GROUPS, seed=7)
    buffer, ends, indices, epoch, boxes, header = encoded_collate([dataset[(3, i)] for i in range(5)])
    assert tuple(boxes.shape) == (5, 5, 4) and header.tolist() == [[h, w, 1, i] for i, (w, h) in enumerate(sizes + [(50, 80)])]
    encoded = split_encoded(buffer, ends)
    inline = DeviceMultiCrop(GROUPS, seed=7)(encoded, indices, epoch)
    from_workers = DeviceMultiCrop(GROUPS, seed=7)(encoded, indices, epoch, boxes=boxes, sizes=header)
    assert all(torch.equal(a, b) for a, b in zip(inline, from_workers, strict=True))
    # a header size that does not match the decoded image (a header PIL misreads, say): boxes redrawn, same crops
    wrong = header.clone()
    wrong[1, :2] = torch.tensor([70, 100])  # the true size is 100 x 70
    garbage = boxes.clone()
    garbage[1] = 0.0
    redrawn = DeviceMultiCrop(GROUPS, seed=7)(encoded, indices, epoch, boxes=garbage, sizes=wrong)
    assert all(torch.equal(a, b) for a, b in zip(inline, redrawn, strict=True))
    # the given boxes are the ones used where the sizes match
    moved = boxes.clone()
    moved[0, 0] = torch.tensor([0.0, 0.0, 30.0, 30.0])
    other = DeviceMultiCrop(GROUPS, seed=7)(encoded, indices, epoch, boxes=moved, sizes=header)
    assert not torch.equal(other[0][0], inline[0][0]) and torch.equal(other[0][1:], inline[0][1:])
    assert header_size(b"not an image") == (-1, -1)


def test_device_pipeline_needs_an_image_folder() -> None:
    with pytest.raises(ValueError, match="data.pipeline='device'"):
        resolve_pipeline("device", InMemoryImages(4), 3)


def test_pretrain_with_device_pipeline_resumes_bit_identically(tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        smooth_image(i, (30, 24)).save(folder / f"{i}.jpg")
    values = {"data.pipeline": "device", "optim.epochs": 2}
    straight = train(tiny_config(tmp_path / "straight", folder, **values), model_builder=tiny_model)
    assert straight.status == "complete" and straight.step == 6
    train(tiny_config(tmp_path / "split", folder, **values, **{"run.max_steps": 4}), model_builder=tiny_model)
    resumed = train(tiny_config(tmp_path / "split", folder, **values), model_builder=tiny_model, resume=True)
    assert resumed.step == 6
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=False) for d in ("straight", "split"))
    state_a, state_b = a["model"], b["model"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 10
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_an_empty_batch_gives_empty_crops() -> None:
    crops = DeviceMultiCrop(GROUPS, seed=0).crop([], [], 0)
    assert [tuple(c.shape) for c in crops] == [(0, 3, 48, 48)] * 2 + [(0, 3, 24, 24)] * 3


def _exif_jpeg(path, orientation: int, size=(64, 40)) -> None:
    image = smooth_image(orientation, size)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)


def test_exif_orientation_is_applied_as_the_other_pipelines_apply_it(tmp_path) -> None:
    from torchvision.transforms.v2.functional import pil_to_tensor

    from swav.datasets import ImageFolderDataset
    from swav.images import load_image
    for o in range(1, 9):
        _exif_jpeg(tmp_path / f"{o}.jpg", o)
    dataset = EncodedImageDataset(ImageFolderDataset(tmp_path), GROUPS, seed=2)
    items = [dataset[(0, i)] for i in range(8)]
    buffer, ends, indices, epoch, boxes, header = encoded_collate(items)
    encoded = split_encoded(buffer, ends)
    cropper = DeviceMultiCrop(GROUPS, seed=2)
    for given in (header[:, 2].tolist(), None):  # from the workers, or read from the headers here
        images = cropper.decode(encoded, orientations=given)
        for i, path in enumerate(dataset.paths):
            expected = pil_to_tensor(load_image(path))
            assert images[i].shape == expected.shape, (path, images[i].shape)
            assert (images[i].float() - expected.float()).abs().mean() < 1.0, path
    assert [tuple(h[:2]) for h in header.tolist()] == [tuple(pil_to_tensor(load_image(p)).shape[1:])
                                                        for p in dataset.paths]
    # the crops match the batched pipeline's (same boxes, resize kernels differ slightly)
    crops = cropper(encoded, indices, epoch, boxes=boxes, sizes=header)
    reference = MultiCropCropper(GROUPS, seed=2)
    for b, path in enumerate(dataset.paths):
        ref = reference(load_image(path), index=indices[b])
        for v in range(5):
            assert (crops[v][b].float() - ref[v].float()).abs().mean() < 3.0, (path, v)


def test_non_jpeg_files_decode_as_load_image_decodes_them() -> None:
    from torchvision.transforms.v2.functional import pil_to_tensor

    from swav.images import load_image
    rgb = smooth_image(3, (20, 16))
    keyed = io.BytesIO()
    rgb.save(keyed, "PNG", transparency=tuple(rgb.getpixel((0, 0))))  # a colour key: composited on white
    gray16 = io.BytesIO()
    Image.fromarray((np.arange(320, dtype=np.uint16).reshape(16, 20) * 200)).save(gray16, "PNG")
    for data in (keyed.getvalue(), gray16.getvalue()):
        image = DeviceMultiCrop(GROUPS, seed=0).decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)])[0]
        assert torch.equal(image, pil_to_tensor(load_image(data)))


def test_unreadable_files_are_skipped_and_listed_in_the_device_pipeline(tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(13):  # 16 files, 4 batches of 4: every file is met in the epoch
        smooth_image(i, (30, 24)).save(folder / f"{i}.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_text("<html>not an image</html>")
    good = (folder / "0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[:200] + bytes(300))  # a readable header, a broken body
    values = {"data.pipeline": "device", "optim.epochs": 1, "data.max_bad_fraction": 0.5}
    result = train(tiny_config(tmp_path / "run", folder, **values), model_builder=tiny_model)
    assert result.status == "complete"
    listed = sorted((tmp_path / "run" / "bad_images.txt").read_text().splitlines())
    assert listed == sorted(str(folder / name) for name in ("empty.jpg", "page.jpg", "truncated.jpg"))


def test_a_stand_in_for_an_unreadable_file_gets_crops_of_its_own(tmp_path) -> None:
    from swav.datasets import ImageFolderDataset
    (tmp_path / "0.jpg").write_bytes(b"")  # unreadable: file 1 stands in for it
    for i in (1, 2):
        smooth_image(i).save(tmp_path / f"{i}.jpg")
    dataset = EncodedImageDataset(ImageFolderDataset(tmp_path, max_bad_fraction=1.0), GROUPS, seed=3)
    stand_in, own = dataset[(0, 0)], dataset[(0, 1)]
    assert stand_in[1] == 0 and stand_in[4].tolist()[3] == 1  # the sample index, and the file read
    assert bytes(stand_in[0].numpy()) == bytes(own[0].numpy())
    assert not torch.equal(stand_in[3], own[3])  # boxes keyed by the requested index, as in the other pipelines


def test_an_orientation_tag_that_is_not_a_number_is_ignored_as_pil_ignores_it() -> None:
    from swav.device_crops import read_header
    import struct
    image = smooth_image(0, (30, 20))
    # raw EXIF: one IFD entry, Orientation (0x0112) of type ASCII holding "6"
    ifd = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", 1) + struct.pack("<HHI4s", 0x0112, 2, 2, b"6\0\0\0")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=b"Exif\0\0" + ifd + struct.pack("<I", 0))
    with Image.open(io.BytesIO(buffer.getvalue())) as check:
        assert check.getexif().get(0x0112) == "6"
    assert read_header(buffer.getvalue()) == (20, 30, 1)


def test_device_pipeline_counts_bad_files_against_the_files_used(tmp_path) -> None:
    from swav.datasets import ImageFolderDataset
    for i in range(6):
        smooth_image(i).save(tmp_path / f"{i}.jpg")
    folder = ImageFolderDataset(tmp_path)
    folder.tracker.total = 4  # data.limit=4
    assert EncodedImageDataset(folder, GROUPS).tracker.total == 4


def test_an_orientation_stored_as_a_fraction_counts_as_pil_counts_it() -> None:
    import struct

    from swav.device_crops import read_header
    from swav.images import load_image
    image = smooth_image(0, (30, 20))
    # Orientation (0x0112) of type RATIONAL (5), 6/1, stored after the IFD
    ifd = (struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 5, 1, 26)
           + struct.pack("<I", 0) + struct.pack("<II", 6, 1))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=b"Exif\0\0" + ifd)
    shown = load_image(buffer.getvalue()).size  # (width, height) after PIL's exif_transpose
    height, width, orientation = read_header(buffer.getvalue())
    assert shown == (20, 30) and (width, height, orientation) == (20, 30, 6)


def test_a_device_decoder_that_fails_on_every_jpeg_hands_over_to_the_cpu_once(monkeypatch, caplog) -> None:
    """A decoder that rejects every JPEG of a batch (torchvision without nvJPEG) is not asked again: the CPU
    decodes, the same crops come out, and one warning says so."""
    encoded = [encode(smooth_image(i)) for i in range(4)]
    want = DeviceMultiCrop(GROUPS, seed=2)(encoded, list(range(4)))
    cropper, calls = DeviceMultiCrop(GROUPS, seed=2), []

    def broken(data, mode):
        calls.append(data)
        raise RuntimeError("not compiled with nvJPEG support")

    monkeypatch.setattr(cropper, "_device_decode", broken)
    with caplog.at_level("WARNING", logger="swav"):
        first = cropper(encoded, list(range(4)))
        second = cropper(encoded, list(range(4)))
    assert len(calls) == 5 and not cropper.device_decode  # one batched call, four single ones, then none
    assert cropper.cpu_decoded == 8 and "decoding on the CPU from now on" in caplog.text
    for a, b, c in zip(first, second, want):
        assert torch.equal(a, b) and (a.float() - c.float()).abs().mean() < 2.0


def test_a_full_gpu_is_not_taken_for_bad_files(monkeypatch) -> None:
    cropper = DeviceMultiCrop(GROUPS, seed=2)

    def full(data, mode):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cropper, "_device_decode", full)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cropper([encode(smooth_image(i)) for i in range(2)], [0, 1])


def test_a_batch_of_corrupt_jpegs_leaves_the_device_decoder_on() -> None:
    """Files the CPU cannot read either say nothing about the decoder: it stays on."""
    from swav.images import BadImageTracker

    corrupt = [torch.frombuffer(bytearray(b"\xff\xd8\xff" + bytes([i]) * 200), dtype=torch.uint8) for i in range(4)]
    cropper = DeviceMultiCrop(GROUPS, seed=2, tracker=BadImageTracker())
    assert cropper.decode(corrupt) == [None] * 4 and cropper.device_decode and cropper.tracker.bad_files
    good = cropper.decode([encode(smooth_image(i)) for i in range(4)])
    assert all(image is not None for image in good) and cropper.cpu_decoded == 4  # the corrupt ones only
