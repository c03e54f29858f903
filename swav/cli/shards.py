"""``swav pack-shards SRC OUT``: pack a data set into WebDataset tar shards.

Example:
    swav pack-shards /data/imagenet /data/imagenet-shards --num-shards 1024
    swav train --data shards:/data/imagenet-shards ...
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``pack-shards`` subcommand (sets ``func=run``)."""
    parser = subparsers.add_parser(
        "pack-shards", help="pack a folder or data set into WebDataset tar shards",
        description="Pack SRC (a folder of images, IDX/CIFAR files or a data set name such as "
                    "fashion-mnist) into tar shards plus a shards.json index in OUT. Image "
                    "files are stored as they are; unreadable ones are left out.")
    parser.add_argument("src", metavar="SRC", help="folder, archive or data set name")
    parser.add_argument("out", metavar="OUT", help="output folder for the shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000,
                        help="start a new shard after this many samples (default 1000)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="also start a new shard before it would exceed this many bytes")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="instead write exactly this many near-equal shards (choose a "
                             "multiple of world size x workers)")
    parser.add_argument("--split", default="train", choices=("train", "test", "val"),
                        help="which split of SRC to pack (default train)")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not decode files first (faster; bad files get packed)")
    parser.add_argument("--download", action="store_true",
                        help="allow downloading a named data set with torchvision")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards already in OUT (once the new ones are complete)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Pack the shards; return the exit status (1 on an error, 2 on a usage error)."""
    from swav.datasets import build_dataset
    from swav.output_paths import check_output_folder
    from swav.shards import ShardDataset, write_shards
    try:
        check_output_folder(args.out, "the output folder")
        source = build_dataset(args.src, split=args.split, download=args.download)
        if isinstance(source, ShardDataset):
            raise ValueError(f"{args.src!r} already holds shards")
        paths = write_shards(source, args.out, max_samples_per_shard=args.samples_per_shard,
                             max_bytes=args.max_bytes, num_shards=args.num_shards,
                             verify=not args.no_verify, overwrite=args.overwrite)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        from swav.cli import error_status
        print(f"swav pack-shards: error: {exc}", file=sys.stderr)
        return error_status(exc)
    print(f"wrote {len(paths)} shards to {args.out} (index: shards.json)")
    return 0
