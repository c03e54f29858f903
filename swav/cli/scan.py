"""``swav scan PATH``: decode every image of a folder and report unreadable files.

Example:
    swav scan /data/photos --json scan.json --max-bad-fraction 0.001
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from swav.scan import format_report, scan_folder

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``scan`` subcommand (sets ``func=run``)."""
    parser = subparsers.add_parser(
        "scan", help="check that every image under a folder decodes",
        description="Decode every image under PATH the way training does and report the "
                    "unreadable ones. Exit status 1 when their fraction exceeds "
                    "--max-bad-fraction, 2 when PATH is missing or holds no images.")
    parser.add_argument("path", metavar="PATH", help="folder of images (searched recursively)")
    parser.add_argument("--json", dest="json_out", metavar="OUT",
                        help="also write the full report (every bad file) as JSON to OUT")
    parser.add_argument("--bad-list", metavar="OUT",
                        help="write the unreadable paths to OUT, one per line")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3,
                        help="decode as RGB (3, default) or grey (1)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="fail if more than this fraction is unreadable (default 0.01, "
                             "the training default)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads (default min(8, CPUs))")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the scan; return the exit status."""
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        print(f"swav scan: --max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}",
              file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print(f"swav scan: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.json_out:
        from swav.output_paths import check_output_file
        try:
            check_output_file(args.json_out, "--json")
        except ValueError as error:
            print(f"swav scan: {error}", file=sys.stderr)
            return 2
    try:
        report = scan_folder(args.path, channels=args.channels, workers=args.workers)
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"swav scan: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(report.to_dict(), fh, indent=1, ensure_ascii=False)
    if args.bad_list:
        parent = os.path.dirname(args.bad_list)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(args.bad_list, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.writelines(item.path + "\n" for item in report.bad)
    if report.total == 0:
        return 2
    if report.bad_fraction > args.max_bad_fraction:
        print(f"swav scan: {report.bad_fraction:.2%} of the files are unreadable, more than "
              f"--max-bad-fraction {args.max_bad_fraction}", file=sys.stderr)
        return 1
    return 0
