"""``swav export``: convert any trained SwAV file into a format other code can use (issue 7).

The input is anything :func:`swav.load_pretrained` reads (our training checkpoint or export, an
official ``*_pretrain.pth.tar``, a safetensors file, a local name such as ``swav_800ep``), so the
command doubles as a converter between our files and the original release's.

Example::

    swav export --checkpoint run/checkpoint.pt --output resnet50_swav.pth --format torchvision
    swav export --checkpoint swav_800ep_pretrain.pth.tar --output swav_800ep.safetensors --format safetensors
"""
from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["FORMATS", "main", "register", "run_export"]

logger = logging.getLogger(__name__)

FORMATS = ("torchvision", "safetensors", "full", "official")
_DESCRIPTIONS = {
    "torchvision": "backbone state dict with torchvision names (load into torchvision.models.resnet50 with strict=False; fc missing)",
    "safetensors": "safetensors file with the model spec in its metadata (whole model, or backbone with --backbone-only)",
    "full": "torch file with model + spec, for continued training or swav.load_pretrained",
    "official": "the original release's flat 'module.'-prefixed layout (*_pretrain.pth.tar)",
}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to the ``swav`` command line.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="swav")
        >>> _ = register(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["export", "--checkpoint", "a.pt", "--output", "b.pt"]).format
        'torchvision'
    """
    parser = subparsers.add_parser(
        "export",
        help="write a trained model as torchvision / safetensors / full / official-layout file",
        description="Convert a trained SwAV file (training checkpoint, exported model, official *_pretrain.pth.tar, "
                    "safetensors, or a local name) into a format other code can use.\n\nFormats:\n"
                    + "\n".join(f"  {k}: {v}" for k, v in _DESCRIPTIONS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint, exported model, official *_pretrain.pth.tar, .safetensors, "
                             "or a name found under $SWAV_HOME / ~/.cache/swav")
    parser.add_argument("--output", required=True, help="file to write (written atomically)")
    parser.add_argument("--format", choices=FORMATS, default="torchvision", help="output format (default: torchvision)")
    parser.add_argument("--backbone-only", action="store_true", help="safetensors: write only the backbone, torchvision key names")
    parser.add_argument("--partial", action="store_true",
                        help="accept a checkpoint that only partly fits (skipped tensors are listed in a warning)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Load ``--checkpoint`` and write ``--output``; returns the process exit code (0 ok, 1 error)."""
    from pathlib import Path

    from swav import export
    from swav.output_paths import check_output_file
    from swav.pretrained import load_pretrained

    output = Path(args.output)
    try:
        check_output_file(output, "--output")
    except ValueError as error:
        print(f"swav export: error: {error}", file=sys.stderr)
        return 1
    if output.exists() and not args.overwrite:
        print(f"swav export: error: --output {str(output)!r} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    if args.backbone_only and args.format != "safetensors":
        print(f"swav export: error: --backbone-only applies to --format safetensors only, got --format {args.format} "
              "(the torchvision format is always backbone-only)", file=sys.stderr)
        return 2
    try:
        from swav.eval.transforms import pretraining_config

        model = load_pretrained(args.checkpoint, strict=not args.partial)
        fresh = getattr(model, "freshly_initialised", [])
        if args.format not in ("torchvision",) and not args.backbone_only:
            written_fresh = fresh  # the whole model goes into the file
        else:
            written_fresh = [key for key in fresh if key.startswith("backbone.")]
        if written_fresh:  # the export would load strictly later, hiding that these were never trained
            shown = ", ".join(written_fresh[:6]) + (f" ... ({len(written_fresh)} in all)" if len(written_fresh) > 6 else "")
            if any(key.startswith("backbone.") for key in written_fresh):
                advice = ("the backbone itself is incomplete, so no export of it is trained; use a checkpoint that "
                          "holds the whole backbone")
            else:
                advice = ("export only what the checkpoint holds: the backbone (safetensors --backbone-only"
                          + ("" if model.spec.backbone.startswith("resnet-compact") else ", or --format torchvision")
                          + ")")
            raise ValueError(f"{len(written_fresh)} tensor(s) of the export are not in the checkpoint and would be "
                             f"written untrained ({shown}); {advice}")
        config = pretraining_config(args.checkpoint)  # kept in full and safetensors exports (evaluation reads it)
        if args.format == "torchvision":
            written = export.export_backbone_torchvision(model, output)
        elif args.format == "safetensors":
            written = export.export_safetensors(model, output, backbone_only=args.backbone_only, config=config)
        elif args.format == "full":
            written = export.export_full(model, output, config=config)
        else:
            written = export.export_official(model, output)
    except (OSError, ValueError, TypeError) as error:
        print(f"swav export: error: {error}", file=sys.stderr)
        return 1
    if args.format == "torchvision" or args.backbone_only:
        print(f"wrote {written} ({args.format}; {model.spec.backbone} backbone only)")
    else:
        print(f"wrote {written} ({args.format}; {model.spec.backbone}, hidden {model.spec.hidden_dim}, "
              f"output {model.spec.output_dim}, prototypes {list(model.spec.num_prototypes)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``export`` alone (``python -m swav.cli.export ...``), without the other subcommands."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="swav")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
