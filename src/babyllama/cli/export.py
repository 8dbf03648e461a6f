"""`babyllama export`: write a run for transformers (hf), llama.cpp (gguf) or onnxruntime (onnx)."""

from __future__ import annotations

import sys

from babyllama.export import DTYPES


def add_parser(subparsers) -> None:
    # The formats and their weight types are babyllama.export's DTYPES (the first type is the
    # default); --format takes no argparse choices so that an unknown one is the one-line
    # error check_export_options gives, like an unknown --dtype.
    dtypes = "; ".join(f"{fmt} {'|'.join(types)}" + (f" (default {types[0]})" if len(types) > 1 else "")
                       for fmt, types in DTYPES.items())
    ex = subparsers.add_parser("export", help="write a run for transformers (hf), llama.cpp (gguf) or "
                                              "onnxruntime (onnx)")
    ex.add_argument("run", help="a run directory (or a transformers directory); an image-text run exports "
                                "only to hf, as transformers' LLaVA")
    ex.add_argument("--format", "-f", required=True, help=" | ".join(DTYPES))
    ex.add_argument("-o", "--out", required=True,
                    help="the directory to write (hf, onnx); for gguf a .gguf file or a directory")
    ex.add_argument("--dtype", help=f"weights: {dtypes}")
    ex.add_argument("--merge", action="store_true",
                    help="a LoRA run: fold the adapter into its base while exporting")
    ex.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    from babyllama.export import check_export_options, export_run

    check_export_options(args.format, args.dtype)  # before the model loads
    result = export_run(args.run, args.format, args.out, dtype=args.dtype, merge=args.merge)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    names = ", ".join(f.name for f in result.files)
    print(f"exported {args.run} as {args.format} -> {result.path} ({names}; "
          f"{result.size / 2**20:.1f} MiB)")
