"""``swav extract``: features and/or embeddings of a folder or data set, resumable (issue 7).

Examples::

    swav extract --checkpoint run/checkpoint.pt --data fashion-mnist --split test --output-dir feats/
    swav extract --checkpoint swav_800ep_pretrain.pth.tar --data /data/photos --what features \\
        --output-dir photo-feats/ --batch-size 128 --workers 8 --amp bf16 --safetensors

Interrupted? Run the same command again: it continues after the last complete chunk.
"""
from __future__ import annotations

import argparse
import os
import sys

from swav.usage import UsageError

__all__ = ["AMP_DTYPES", "add_extract_arguments", "register", "run", "unreadable_note"]

AMP_DTYPES = {"none": None, "bf16": "bfloat16", "fp16": "float16"}


def add_extract_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Arguments shared by ``swav extract`` and ``swav cluster`` (which extracts first)."""
    parser.add_argument("--checkpoint", required=required,
                        help="trained model: our checkpoint/export, safetensors, or an official *_pretrain.pth.tar")
    parser.add_argument("--data", required=required,
                        help="a folder of images, IDX/CIFAR files, shards, or a name (fashion-mnist, mnist, cifar10, cifar100)")
    parser.add_argument("--split", default="train", choices=("train", "test", "val"), help="default: train")
    parser.add_argument("--limit", type=int, help="only the first N images (default: all)")
    parser.add_argument("--batch-size", type=int, default=256, help="default: 256")
    parser.add_argument("--chunk-rows", type=int,
                        help="rows per resumable chunk (default: 16 batches; a resumed run keeps the first run's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="data-loading processes (default: 4, or the number of CPUs if fewer)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast dtype (default: none)")
    parser.add_argument("--partial", action="store_true", help="accept a checkpoint that only partly fits the model")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard an earlier (partial) extraction there (swav cluster: and replace an earlier "
                             "clustering)")
    parser.add_argument("--bit-depth", type=int, metavar="BITS", help="bits per sample of 16-bit image files, e.g. 12 "
                        "(default: the pretraining's data.bit_depth, else full 16-bit)")
    parser.add_argument("--max-bad-fraction", type=float, metavar="FRACTION",
                        help="stop when more than this share of the image files is unreadable (at least 10 of them; "
                             "they are left out below it); default: the pretraining's data.max_bad_fraction, else 0.01")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``extract`` subcommand (sets ``func=run``).

    Example:
        >>> parser = argparse.ArgumentParser(prog="swav")
        >>> _ = register(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["extract", "--checkpoint", "m.pt", "--data", "d", "--output-dir", "o"]).what
        'both'
    """
    parser = subparsers.add_parser(
        "extract", help="write features/embeddings of a data set to .npy (resumable)",
        description="Run a trained model over a folder or data set and write pooled backbone features "
                    "(features.npy), unit projected embeddings (embeddings.npy), labels.npy, index.csv "
                    "(row, path, label) and the unit prototypes to --output-dir. Work is saved in chunks: "
                    "re-running the same command continues an interrupted extraction.")
    add_extract_arguments(parser)
    parser.add_argument("--output-dir", required=True, help="folder for the arrays and index")
    parser.add_argument("--what", choices=("features", "embeddings", "both"), default="both",
                        help="pooled backbone features, projected embeddings, or both (default)")
    parser.add_argument("--safetensors", action="store_true", help="also write extracted.safetensors")
    parser.set_defaults(func=run)
    return parser


def job_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`swav.extract.extract_job` from parsed arguments."""
    import torch

    for name in ("batch_size", "workers", "limit", "chunk_rows"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            raise UsageError(f"--{name.replace('_', '-')}: must be >= {0 if name == 'workers' else 1}, got {value}")
    if args.bit_depth is not None and not 8 <= args.bit_depth <= 16:
        raise UsageError(f"--bit-depth: must be 8..16 (bits per sample of 16-bit image files), got {args.bit_depth}")
    if args.max_bad_fraction is not None and not 0.0 <= args.max_bad_fraction <= 1.0:
        raise UsageError(f"--max-bad-fraction: must be in [0, 1], got {args.max_bad_fraction}")
    amp = AMP_DTYPES[args.amp]
    return {"split": args.split, "batch_size": args.batch_size, "device": args.device, "workers": args.workers,
            "amp_dtype": getattr(torch, amp) if amp else None, "limit": args.limit, "chunk_rows": args.chunk_rows,
            "overwrite": args.overwrite, "strict": not args.partial, "progress": not args.no_progress,
            "bit_depth": args.bit_depth, "max_bad_fraction": args.max_bad_fraction}


def unreadable_note(meta: dict, folder) -> str | None:
    """``"N unreadable images not extracted, listed in FOLDER/bad_images.txt"`` for the
    ``meta.json`` of an extraction that left images out, else None.

    Example:
        >>> unreadable_note({"unreadable_rows": [3, 7], "unreadable_list": "bad_images.txt"}, "feats")
        '2 unreadable images not extracted, listed in feats/bad_images.txt'
    """
    import os

    bad = meta.get("unreadable_rows") or []
    if not bad:
        return None
    listed = meta.get("unreadable_list")
    where = f", listed in {os.path.join(os.fspath(folder), listed)}" if listed else ""
    return f"{len(bad)} unreadable image{'s' if len(bad) != 1 else ''} not extracted{where}"


def run(args: argparse.Namespace) -> int:
    """Run the extraction; 0 on success, 1 on a user error, 2 on a usage error (message on stderr)."""
    from swav.extract import check_output_dir, extract_job, load_extracted
    from swav.images import TooManyBadImagesError

    try:
        check_output_dir(args.output_dir, "--output-dir")
        out = extract_job(args.checkpoint, args.data, args.output_dir, what=args.what,
                          write_safetensors=args.safetensors, **job_kwargs(args))
        data = load_extracted(out)
    except (ValueError, FileNotFoundError, NotADirectoryError, TooManyBadImagesError) as error:
        from swav.cli import error_status, user_message
        print(f"swav extract: error: {user_message(error)}", file=sys.stderr)
        return error_status(error)
    shapes = ", ".join(f"{name} {tuple(a.shape)}" for name, a in (("features", data.features),
                       ("embeddings", data.embeddings)) if a is not None)
    print(f"wrote {shapes} for {len(data.labels)} images to {out}")
    note = unreadable_note(data.meta, out)
    if note:
        print(f"swav extract: warning: {note}", file=sys.stderr)
    return 0
