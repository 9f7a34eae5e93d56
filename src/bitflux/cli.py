"""The `bitflux` command: parse arguments, call the API, turn BitfluxError into one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import BitfluxError


def _cmd_quantize(args) -> None:
    from .config import TernaryConfig
    from .convert import quantize_checkpoint
    from .inspect import format_report, inspect_path

    config = TernaryConfig(method=args.method, format=args.format, activations=args.activations,
                           **TernaryConfig.parse_granularity(args.granularity))
    quantize_checkpoint(args.source, args.output, config, force=args.force, progress=not args.quiet)
    if not args.quiet:
        print(format_report(inspect_path(args.output)).split("\n\n")[0])
        print(f"wrote {args.output}")


def _cmd_inspect(args) -> None:
    from .inspect import format_report, inspect_path

    info = inspect_path(args.path)
    print(json.dumps(info, indent=2) if args.json else format_report(info))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitflux", description="1.58-bit (ternary) FLUX transformers")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a FLUX checkpoint to a bitflux folder")
    q.add_argument("source", help="diffusers pipeline/transformer folder, original .safetensors, or cached hub id")
    q.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    q.add_argument("--format", default="tq2", choices=["tq2", "tq1"])
    q.add_argument("--method", default="absmean", choices=["absmean", "twn", "lsq"])
    q.add_argument("--granularity", default="tensor", help="tensor | channel | group:N")
    q.add_argument("--activations", default="a16", choices=["a16", "a8"])
    q.add_argument("--force", action="store_true", help="replace an existing output")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(run=_cmd_quantize)

    i = sub.add_parser("inspect", help="parameters, coverage and bytes of a model, source or config.json")
    i.add_argument("path", help="bitflux folder, source checkpoint, config.json, or flux.1-dev / flux.1-schnell")
    i.add_argument("--json", action="store_true")
    i.set_defaults(run=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except BitfluxError as exc:
        print(f"bitflux: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitflux: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
