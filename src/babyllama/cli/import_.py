"""`babyllama import`: a transformers Llama (or LLaVA) directory -> a run directory."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    im = subparsers.add_parser("import", help="a transformers Llama or LLaVA directory -> a run directory")
    im.add_argument("src", help="a directory with config.json, model.safetensors and tokenizer files "
                                "(LLaVA: a SigLIP encoder and a Llama language model)")
    im.add_argument("-o", "--out", required=True, help="the run directory to write")
    im.set_defaults(func=cmd_import)


def cmd_import(args) -> None:
    from babyllama.export.hf import import_hf
    from babyllama.run import CONFIG, TOKENIZER, WEIGHTS, Run

    out = import_hf(args.src, args.out)
    if Run(out).is_vision():
        print(f"imported {args.src} -> {out} ({CONFIG}, {WEIGHTS}, {TOKENIZER}/): an image-text run "
              f"(stage instruct); `babyllama instruct --base {out}` fine-tunes it further")
        return
    print(f"imported {args.src} -> {out} ({CONFIG}, {WEIGHTS}, {TOKENIZER}/): "
          f"`babyllama generate {out}`, `babyllama sft` with sft.base={out}")
