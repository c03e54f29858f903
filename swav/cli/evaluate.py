"""``swav eval-knn``, ``swav eval-linear``, ``swav finetune``: the evaluation protocols (SPEC §11).

Each command loads a trained model (anything :func:`swav.load_pretrained` reads), builds the
train/test data sets, runs the protocol on the backbone's pooled features, prints a summary and
writes ``<output-dir>/<command>.json``. Arguments and the output folder are checked before anything
is loaded. With image folders, val class folders are matched to train class folders by name (val
may hold a subset of train's classes, not a class that train lacks).

Examples::

    swav eval-knn    --checkpoint run/checkpoint.pt --data fashion-mnist --k 10 20
    swav eval-linear --checkpoint run/checkpoint.pt --data fashion-mnist --mode fast
    swav eval-linear --checkpoint swav_800ep_pretrain.pth.tar \\
        --train-data /data/imagenet/train --val-data /data/imagenet/val --mode full --amp bf16
    swav finetune    --checkpoint swav_800ep_pretrain.pth.tar --subset-file 1percent.txt \\
        --train-data /data/imagenet/train --val-data /data/imagenet/val
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from swav.usage import UsageError

__all__ = ["register", "run_finetune", "run_knn", "run_linear"]

logger = logging.getLogger(__name__)

_AMP = {"none": None, "bf16": "bfloat16", "fp16": "float16"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval-knn``, ``eval-linear`` and ``finetune`` to the ``swav`` command line.

    Example:
        >>> parser = argparse.ArgumentParser(prog="swav")
        >>> register(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["eval-knn", "--checkpoint", "m.pt", "--data", "fashion-mnist"])
        >>> args.k, args.temperature, args.func.__name__
        ([20], 0.07, 'run_knn')
    """
    knn = _add_parser(subparsers, "eval-knn", "weighted k-NN accuracy of frozen features (k=20, T=0.07)")
    knn.add_argument(
        "--k", type=int, nargs="+", default=[20], help="neighbours; several values share one feature pass (default: 20)"
    )
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cos / T) (default: 0.07)")
    knn.set_defaults(func=run_knn)

    linear = _add_parser(subparsers, "eval-linear", "linear classifier on the frozen backbone (official protocol)")
    linear.add_argument(
        "--mode",
        choices=("full", "fast"),
        default="full",
        help="full: augmented images through the frozen backbone every epoch (official); "
        "fast: features extracted once without augmentation, seconds per 100 epochs (default: full)",
    )
    linear.add_argument("--epochs", type=int, default=100, help="default: 100")
    linear.add_argument(
        "--lr", type=float, default=0.3, help="SGD learning rate, cosine to --final-lr per epoch (default: 0.3)"
    )
    linear.add_argument("--final-lr", type=float, default=0.0, help="default: 0")
    linear.add_argument("--weight-decay", type=float, default=1e-6, help="default: 1e-6")
    linear.add_argument(
        "--standardize",
        action="store_true",
        help="fast mode: standardise every feature dimension with training statistics (not official)",
    )
    linear.set_defaults(func=run_linear)

    tune = _add_parser(subparsers, "finetune", "semi-supervised fine-tuning of the whole network on a labelled subset")
    subset = tune.add_mutually_exclusive_group(required=True)
    subset.add_argument(
        "--label-fraction", type=float, help="seeded per-class fraction of the training labels, e.g. 0.01"
    )
    subset.add_argument("--subset-file", help="SimCLR-style list of training image file names (one per line)")
    tune.add_argument(
        "--epochs", type=int, default=20, help="default: 20 (lr x --gamma at 60%% and 80%% of the epochs)"
    )
    tune.add_argument("--trunk-lr", type=float, help="default: 0.02 for <=~3%% labels, else 0.01")
    tune.add_argument("--head-lr", type=float, help="default: 5 for <=~3%% labels, else 0.2")
    tune.add_argument(
        "--milestones", type=int, nargs="+", help="epochs where the lr decays (default: 12 16 scaled to --epochs)"
    )
    tune.add_argument("--gamma", type=float, default=0.2, help="lr decay factor (default: 0.2)")
    tune.set_defaults(func=run_finetune)


def _add_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subparser with the arguments every evaluation command shares."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="training checkpoint, export, official *_pretrain.pth.tar, .safetensors or a local name",
    )
    parser.add_argument(
        "--data",
        help="data set: a name (fashion-mnist, mnist, cifar10, cifar100) or a path "
        "(IDX/CIFAR files, or a folder with train/ and val/ or test/)",
    )
    parser.add_argument(
        "--train-data", help="training images (folder or any --data form); overrides --data's train split"
    )
    parser.add_argument("--val-data", help="test images: a folder of class folders, or any --data form (of which the "
                        "test split is used); overrides --data's test split")
    parser.add_argument("--output-dir", default=".", help=f"where {name}.json is written (default: .)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing {name}.json there (without: refused before any work)")
    parser.add_argument("--batch-size", type=int, default=256, help="default: 256")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="data-loading processes (default: 4, or the number of CPUs if fewer)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument(
        "--amp", choices=tuple(_AMP), default="none", help="autocast dtype for the backbone (default: none)"
    )
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument(
        "--mean",
        type=float,
        nargs="+",
        help="normalisation mean; must match pretraining (default: the mean stored in the checkpoint's "
        "config, whether or not the other one is given; for checkpoints without one, ImageNet's for RGB, 0.5 for grey)",
    )
    parser.add_argument(
        "--std",
        type=float,
        nargs="+",
        help="normalisation std; must match pretraining (default: the std stored in the checkpoint's "
        "config, whether or not the other one is given; for checkpoints without one, ImageNet's for RGB, 0.5 for grey)",
    )
    parser.add_argument("--crop-size", type=int, help="test images: centre crop (default: the pretraining's "
                        "large-crop size, else 224)")
    parser.add_argument("--resize-size", type=int, help="test images: resize the shorter side first (default: "
                        "8/7 of the crop for crops of 224 px and more, else the crop size)")
    parser.add_argument("--bit-depth", type=int, metavar="BITS", help="bits per sample of 16-bit image files, e.g. 12 "
                        "(default: the pretraining's data.bit_depth, else full 16-bit)")
    parser.add_argument("--max-bad-fraction", type=float, metavar="FRACTION",
                        help="stop when more than this share of the image files is unreadable (at least 10 of them; "
                             "they are left out below it); default: the pretraining's data.max_bad_fraction, else 0.01")
    parser.add_argument("--partial", action="store_true", help="accept a checkpoint that only partly fits the model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_knn(args: argparse.Namespace) -> int:
    """Extract normalised features of both splits once, then k-NN for every ``--k``."""
    return _guarded("eval-knn", _knn, args)


def run_linear(args: argparse.Namespace) -> int:
    """Train and evaluate the linear classifier in ``--mode`` full or fast."""
    return _guarded("eval-linear", _linear, args)


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune backbone + head on ``--label-fraction`` or ``--subset-file`` of the training set."""
    return _guarded("finetune", _finetune, args)


def _guarded(command: str, body: Any, args: argparse.Namespace) -> int:
    """Check the arguments, run ``body``; turn user errors into a one-line message and exit code 1 (2 for a
    usage error).

    User errors are those :func:`swav.cli.is_user_error` names (``ValueError``, ``OSError``, swav's
    own exception classes); anything else is a bug and keeps its traceback.
    """
    from swav.cli import error_status, is_user_error, user_message

    try:
        _check_args(command, args)  # before the model and the data are loaded
        result = body(args)
        path = _write_json(Path(args.output_dir).expanduser(), command, result)
    except Exception as error:  # re-raised unless it is a user error
        if not is_user_error(error):
            raise
        print(f"swav {command}: error: {user_message(error)}", file=sys.stderr)
        return error_status(error)
    print(f"wrote {path}")
    return 0


def _check_args(command: str, args: argparse.Namespace) -> None:
    """Every check that needs no model and no data, so that a typo fails in a second, not after the work."""
    from swav.cli import check_device

    def at_least(name: str, value: Any, low: float, *, strict: bool = False) -> None:
        if value is not None and (value <= low if strict else value < low):
            raise UsageError(f"--{name}: must be {'>' if strict else '>='} {low:g}, got {value:g}")

    if not args.data and not (args.train_data and args.val_data):
        raise UsageError("--data: required unless both --train-data and --val-data are given")
    at_least("batch-size", args.batch_size, 1)
    at_least("workers", args.workers, 0)
    at_least("crop-size", args.crop_size, 1)
    if args.bit_depth is not None and not 8 <= args.bit_depth <= 16:
        raise UsageError(f"--bit-depth: must be 8..16 (bits per sample of 16-bit image files), got {args.bit_depth}")
    at_least("resize-size", args.resize_size, 1)
    if args.max_bad_fraction is not None and not 0.0 <= args.max_bad_fraction <= 1.0:
        raise UsageError(f"--max-bad-fraction: must be in [0, 1], got {args.max_bad_fraction}")
    for value in args.std or []:
        at_least("std", value, 0, strict=True)
    args.device = check_device(args.device)
    if command == "eval-knn":
        for k in args.k:
            at_least("k", k, 1)
        at_least("temperature", args.temperature, 0, strict=True)
    elif command == "eval-linear":
        at_least("epochs", args.epochs, 1)
        at_least("lr", args.lr, 0, strict=True)
        at_least("final-lr", args.final_lr, 0)
        at_least("weight-decay", args.weight_decay, 0)
        if args.standardize and args.mode != "fast":
            raise UsageError("--standardize: applies to --mode fast only")
    elif command == "finetune":
        at_least("epochs", args.epochs, 1)
        at_least("trunk-lr", args.trunk_lr, 0)
        at_least("head-lr", args.head_lr, 0)
        at_least("gamma", args.gamma, 0, strict=True)
        for milestone in args.milestones or []:
            at_least("milestones", milestone, 1)
        late = [m for m in args.milestones or [] if m >= args.epochs]
        if late:  # epochs are counted from 0: a decay at epoch >= --epochs never happens
            raise UsageError(f"--milestones {' '.join(map(str, late))}: at or after --epochs {args.epochs} (epochs "
                             f"count from 0, so the last is {args.epochs - 1}): the learning rate would never decay "
                             f"there; give milestones below {args.epochs}")
        if args.label_fraction is not None and not 0 < args.label_fraction <= 1:
            raise UsageError(f"--label-fraction: must be in (0, 1], e.g. 0.01 for 1% of the labels, "
                             f"got {args.label_fraction:g}")
        if args.subset_file and not Path(args.subset_file).is_file():
            raise UsageError(f"--subset-file: {args.subset_file!r} does not exist or is not a file")
    _check_output_dir(Path(args.output_dir).expanduser(), f"{command}.json", overwrite=args.overwrite)


def _check_output_dir(output_dir: Path, file_name: str, *, overwrite: bool = False) -> None:
    """``output_dir`` is (or can be created as) a writable folder (:func:`swav.output_paths.check_output_folder`)
    where ``file_name`` is not a folder, nor an earlier result unless ``overwrite``; creates nothing."""
    from swav.output_paths import check_output_folder

    check_output_folder(output_dir, "--output-dir")
    target = output_dir / file_name
    if target.is_dir():
        raise ValueError(f"--output-dir {os.fspath(output_dir)!r}: {os.fspath(target)!r} is a "
                         f"folder, so {file_name} cannot be written: choose another folder")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{os.fspath(target)!r} already holds a result: choose another --output-dir, or pass "
                              "--overwrite to replace it")


def _knn(args: argparse.Namespace) -> dict[str, Any]:
    from swav.eval.knn import knn_accuracy

    setup = _Setup(args)
    train_ds, test_ds = setup.datasets(train_augment=False)
    start = time.perf_counter()
    train = setup.features(train_ds, "train")
    test = setup.features(test_ds, "test")
    num_classes = setup.num_classes(train_ds, train[1], test[1])
    on_device = [t.to(setup.device) for t in (*train, *test)]  # the similarity matmuls run there
    results = []
    for asked in args.k:
        acc = knn_accuracy(*on_device, k=asked, temperature=args.temperature, num_classes=num_classes)
        k = min(asked, len(train[1]))  # knn_accuracy uses at most every training sample (and warns)
        results.append({"k": k, **({"k_asked": asked} if k != asked else {}), "temperature": args.temperature,
                        **acc})
        note = f" (asked {asked}: only {k} training samples)" if k != asked else ""
        print(f"k-NN  k={k:<4d} T={args.temperature:g}  top-1 {acc['top1']:6.2f}  top-5 {acc['top5']:6.2f}{note}")
    return setup.report(
        "eval-knn", num_classes, train[1].numel(), test[1].numel(), time.perf_counter() - start, results=results
    )


def _linear(args: argparse.Namespace) -> dict[str, Any]:
    from swav.eval.linear import linear_probe, linear_probe_features

    setup = _Setup(args)
    common = {
        "epochs": args.epochs,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "final_lr": args.final_lr,
        "seed": args.seed,
        "progress": setup.progress,
    }
    start = time.perf_counter()
    if args.mode == "fast":
        train_ds, test_ds = setup.datasets(train_augment=False)
        train = setup.features(train_ds, "train")
        test = setup.features(test_ds, "test")
        num_classes = setup.num_classes(train_ds, train[1], test[1])
        result = linear_probe_features(
            *train,
            *test,
            num_classes=num_classes,
            batch_size=args.batch_size,
            standardize=args.standardize,
            device=setup.device,
            **common,
        )
        sizes = (train[1].numel(), test[1].numel())
    else:
        train_ds, test_ds = setup.datasets(train_augment=True)
        num_classes = setup.num_classes(train_ds, _targets(train_ds), _targets(test_ds))
        result = linear_probe(
            setup.backbone,
            setup.loader(train_ds, shuffle=True),
            setup.loader(test_ds, shuffle=False),
            feature_dim=setup.model.feature_dim,
            num_classes=num_classes,
            device=setup.device,
            amp_dtype=setup.amp_dtype,
            **common,
        )
        sizes = (len(train_ds), len(test_ds))
    _print_result(f"linear ({args.mode})", result)
    protocol = {"epochs": args.epochs, "lr": args.lr, "final_lr": args.final_lr, "weight_decay": args.weight_decay,
                "standardize": bool(args.standardize) if args.mode == "fast" else False}
    return setup.report(
        "eval-linear", num_classes, *sizes, time.perf_counter() - start, mode=args.mode, **protocol,
        **result.to_dict()
    )


def _finetune(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from torch.utils.data import Subset

    from swav.eval.finetune import (
        FinetuneClassifier,
        default_learning_rates,
        finetune,
        scaled_milestones,
    )
    from swav.eval.subsets import read_subset_file, stratified_fraction

    setup = _Setup(args)
    train_ds, test_ds = setup.datasets(train_augment=True)
    num_classes = setup.num_classes(train_ds, _targets(train_ds), _targets(test_ds))
    if args.subset_file:
        samples = getattr(train_ds, "samples", None)
        if samples is None:
            raise ValueError(
                "--subset-file: needs an image-folder training set (file names to match); "
                "use --label-fraction for IDX/CIFAR data"
            )
        indices = read_subset_file(args.subset_file, [path for path, _ in samples])
    else:
        indices = stratified_fraction(np.asarray(_targets(train_ds)), args.label_fraction, seed=args.seed)
    fraction = len(indices) / len(train_ds)
    trunk_lr, head_lr = default_learning_rates(fraction)
    trunk_lr = args.trunk_lr if args.trunk_lr is not None else trunk_lr
    head_lr = args.head_lr if args.head_lr is not None else head_lr
    milestones = tuple(args.milestones) if args.milestones else scaled_milestones(args.epochs)
    print(
        f"fine-tuning on {len(indices)} of {len(train_ds)} labelled images ({100 * fraction:.2f}%), "
        f"trunk lr {trunk_lr:g}, head lr {head_lr:g}, x{args.gamma:g} at epochs {list(milestones)}"
    )
    subset = Subset(train_ds, indices.tolist())
    train_loader = setup.loader(subset, shuffle=True, drop_last=len(subset) > args.batch_size)
    classifier = FinetuneClassifier(setup.backbone, setup.model.feature_dim, num_classes, seed=args.seed)
    start = time.perf_counter()
    result = finetune(
        classifier,
        train_loader,
        setup.loader(test_ds, shuffle=False),
        epochs=args.epochs,
        trunk_lr=trunk_lr,
        head_lr=head_lr,
        milestones=milestones,
        gamma=args.gamma,
        device=setup.device,
        amp_dtype=setup.amp_dtype,
        progress=setup.progress,
    )
    _print_result("fine-tune", result)
    return setup.report(
        "finetune",
        num_classes,
        len(subset),
        len(test_ds),
        time.perf_counter() - start,
        label_fraction=fraction,
        subset_file=args.subset_file,
        trunk_lr=trunk_lr,
        head_lr=head_lr,
        milestones=list(milestones),
        gamma=args.gamma,
        **result.to_dict(),
    )


def _check_labelled(dataset: Any, split: str) -> None:
    """An image folder with files outside the class sub-folders cannot be evaluated: say which, before any
    image is decoded."""
    samples = getattr(dataset, "samples", None)
    if not isinstance(samples, (list, tuple)):
        return
    loose = [path for path, label in samples if label < 0]
    if loose:
        raise ValueError(f"{split} data: {len(loose)} image(s) are not in a class sub-folder (e.g. {loose[0]!r}); "
                         "evaluation needs one sub-folder per class: move or remove them")


_UNREADABLE = -2  # the label of a row whose file could not be read (the data set handed out a stand-in)


class _MarkUnreadable:
    """``dataset`` whose items carry the label :data:`_UNREADABLE` where the file could not be read: an
    :class:`~swav.datasets.ImageFolderDataset` hands out the next readable image instead (right for
    training), which evaluation must not count a second time. Checked in the process that loaded the item."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int) -> Any:
        from swav.extract import _readable

        image, label = self.dataset[row][:2]
        return image, (label if _readable(self.dataset, row) else _UNREADABLE)


class _Setup:
    """What every command needs: the model, transforms, device, loaders and the report header."""

    def __init__(self, args: argparse.Namespace):
        import torch
        from torchvision.transforms import v2

        from swav.eval.transforms import pretraining_bit_depth, pretraining_max_bad_fraction, transforms_for_checkpoint
        from swav.pretrained import load_pretrained

        self.args = args  # checked by _check_args already
        torch.manual_seed(args.seed)
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        )
        self.amp_dtype = getattr(torch, _AMP[args.amp]) if _AMP[args.amp] else None
        self.progress = not args.no_progress
        self.model = load_pretrained(args.checkpoint, strict=not args.partial)
        self.spec = self.model.spec
        self.backbone = self.model.backbone.to(self.device)
        self.bit_depth = pretraining_bit_depth(args.checkpoint, args.bit_depth)
        self.max_bad_fraction = pretraining_max_bad_fraction(args.checkpoint, args.max_bad_fraction)
        if args.resize_size and self.spec.small_images:
            raise UsageError(f"--resize-size {args.resize_size}: this model is for small images (stem without "
                             "downsampling), which it takes whole at one size, resized to it where they differ: "
                             "set that size with --crop-size, without --resize-size")
        self.transforms = transforms_for_checkpoint(args.checkpoint, self.spec, mean=args.mean, std=args.std,
                                                    crop_size=args.crop_size, resize_size=args.resize_size)
        normalize = next(t for t in self.transforms[1].transforms if isinstance(t, v2.Normalize))
        self.normalization = {"mean": list(normalize.mean), "std": list(normalize.std)}
        test_steps = self.transforms[1].transforms
        self.image_sizes = {  # None for small-image models (images taken as they are)
            "resize": next((t.size[0] for t in test_steps if isinstance(t, v2.Resize)), None),
            "crop": next((t.size[0] for t in test_steps if isinstance(t, v2.CenterCrop)), None)}
        self.feature_kwargs = {"device": self.device, "amp_dtype": self.amp_dtype, "progress": self.progress}
        self.unreadable: dict[str, int] = {}  # rows of unreadable files left out, per split (feature paths)
        logger.info(
            "evaluating %s (%s, feature dim %d) on %s",
            args.checkpoint,
            self.spec.backbone,
            self.model.feature_dim,
            self.device,
        )

    def datasets(self, *, train_augment: bool) -> tuple[Any, Any]:
        """Train and test data sets; the train set is augmented only for full linear / fine-tuning."""
        from swav.datasets import build_dataset, build_held_out_dataset

        train_tf, test_tf = self.transforms
        channels = self.spec.in_channels
        args = self.args
        train = build_dataset(
            args.train_data or args.data,
            split="train",
            transform=train_tf if train_augment else test_tf,
            channels=channels,
            bit_depth=self.bit_depth, max_bad_fraction=self.max_bad_fraction,
        )
        test = (
            build_held_out_dataset(args.val_data, transform=test_tf, channels=channels, bit_depth=self.bit_depth,
                                   max_bad_fraction=self.max_bad_fraction)
            if args.val_data
            else build_dataset(args.data, split="test", transform=test_tf, channels=channels, bit_depth=self.bit_depth,
                               max_bad_fraction=self.max_bad_fraction)
        )
        for name, dataset in (("train", train), ("test", test)):
            _check_labelled(dataset, name)
        sources = [(type(d).__name__, os.path.realpath(d.root), getattr(d, "split", None))
                   if isinstance(getattr(d, "root", None), (str, os.PathLike)) else None for d in (train, test)]
        if sources[0] is not None and sources[0] == sources[1]:
            logger.warning("the test images are the training images (%s): the accuracy measures memorisation, not "
                           "generalisation; pass the held-out images with --val-data", train.root)
        return train, _match_classes(train, test)

    def features(self, dataset: Any, split: str) -> tuple[Any, Any]:
        """``(features, labels)`` of ``dataset`` (frozen backbone, test transform), without the rows of
        unreadable files (counted in :attr:`unreadable`)."""
        from swav.features import extract_features

        features, labels = extract_features(self.backbone, self.loader(_MarkUnreadable(dataset), shuffle=False),
                                            **self.feature_kwargs)
        keep = labels != _UNREADABLE
        left_out = int((~keep).sum())
        self.unreadable[split] = left_out
        if left_out:
            logger.warning("%d unreadable image file(s) of the %s set left out (not counted in the accuracy)",
                           left_out, split)
            features, labels = features[keep], labels[keep]
        return features, labels

    def loader(self, dataset: Any, *, shuffle: bool, drop_last: bool = False) -> Any:
        import torch
        from torch.utils.data import DataLoader

        return DataLoader(
            dataset,
            batch_size=self.args.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.args.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.args.workers > 0,
            generator=torch.Generator().manual_seed(self.args.seed),
        )

    def num_classes(self, train_ds: Any, *labels: Any) -> int:
        """Class count: the training set's ``classes``, or more if the labels (train, test) say so."""
        import torch

        all_labels = [torch.as_tensor(y) for y in labels]
        if any(bool((y < 0).any()) for y in all_labels):
            raise ValueError("data: some images have no label (-1); evaluation needs one class sub-folder per class")
        seen = max(int(y.max()) for y in all_labels) + 1
        return max(len(getattr(train_ds, "classes", []) or []), seen)

    def report(
        self, command: str, num_classes: int, num_train: int, num_test: int, seconds: float, **fields: Any
    ) -> dict[str, Any]:
        args = self.args
        return {
            "command": command,
            "checkpoint": str(args.checkpoint),
            # model tensors that were not in the checkpoint (--partial), initialised at random
            "freshly_initialised": list(getattr(self.model, "freshly_initialised", [])),
            "model_spec": self.spec.to_dict(),
            "data": args.data,
            "train_data": args.train_data,
            "val_data": args.val_data,
            "num_classes": num_classes,
            "num_train": num_train,
            "num_test": num_test,
            "feature_dim": self.model.feature_dim,
            "device": str(self.device),
            "amp": args.amp,
            "batch_size": args.batch_size,
            "unreadable_left_out": dict(self.unreadable),  # per split, where features were extracted
            "normalization": self.normalization,
            "test_image_sizes": self.image_sizes,
            "seed": args.seed,
            "seconds": round(seconds, 2),
            **fields,
        }


class _RelabelledDataset:
    """``dataset`` with its labels renumbered by ``mapping`` (old index -> new index; -1 stays -1)."""

    def __init__(self, dataset: Any, mapping: dict[int, int], classes: list[str]):
        self.dataset = dataset
        self.mapping = mapping
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = [self._map(int(t)) for t in dataset.targets]
        self.samples = [(path, self._map(int(label))) for path, label in dataset.samples]

    def _map(self, label: int) -> int:
        return self.mapping.get(label, label) if label >= 0 else label

    @property
    def tracker(self) -> Any:  # the folder's record of unreadable files (read where items are loaded)
        return getattr(self.dataset, "tracker", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return image, self._map(int(label))


def _match_classes(train: Any, test: Any) -> Any:
    """The test set with its labels numbered as the training set's classes of the same NAME.

    Image folders number their class folders in sorted order, so ``val/`` holding ``bird/ cat/``
    and ``train/`` holding ``cat/ dog/`` would otherwise score every val cat as a dog. A test set
    with fewer classes than the training set is fine; one with a class (holding images) that the
    training set lacks cannot be scored, and is refused with the names.

    Only image folders are matched (both sets with ``class_to_idx`` and ``samples``): IDX and CIFAR
    labels are the files' own class numbers, and IDX class names are only guessed from the path.
    """
    if not all(hasattr(ds, "class_to_idx") and hasattr(ds, "samples") for ds in (train, test)):
        return test
    train_classes = [str(c) for c in (getattr(train, "classes", None) or [])]
    test_classes = [str(c) for c in (getattr(test, "classes", None) or [])]
    targets = getattr(test, "targets", None)
    if not train_classes or not test_classes or train_classes == test_classes or targets is None:
        return test
    used = sorted({int(t) for t in targets if 0 <= int(t) < len(test_classes)})
    position = {name: i for i, name in enumerate(train_classes)}
    missing = [test_classes[i] for i in used if test_classes[i] not in position]
    if missing:
        names = ", ".join(repr(name) for name in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ValueError(f"val has class folders not in train: {names}{more}; give folders with the same class names "
                         f"(train has {len(train_classes)}: {', '.join(repr(c) for c in train_classes[:10])}"
                         f"{', ...' if len(train_classes) > 10 else ''})")
    mapping = {i: position[name] for i, name in enumerate(test_classes) if name in position}
    if all(old == new for old, new in mapping.items()):
        return test
    logger.info("val classes matched to train classes by name (%d of train's %d classes in val)",
                len(used), len(train_classes))
    return _RelabelledDataset(test, mapping, train_classes)


def _targets(dataset: Any) -> list[int]:
    """Labels of every sample without decoding images (``targets`` of our data sets)."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(
            f"data: {type(dataset).__name__} exposes no labels ('targets'); use an image folder, IDX or CIFAR data"
        )
    return [int(t) for t in targets]


def _print_result(name: str, result: Any) -> None:
    print(
        f"{name}: last epoch top-1 {result.top1_last:6.2f} top-5 {result.top5_last:6.2f} | "
        f"best (epoch {result.best_epoch}) top-1 {result.top1_best:6.2f} top-5 {result.top5_best:6.2f}"
    )


def _write_json(output_dir: Path, command: str, result: dict[str, Any]) -> Path:
    """Write ``<output_dir>/<command>.json`` atomically (temporary file, then rename)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{command}.json"
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path
