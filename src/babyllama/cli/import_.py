"""`babyllama import`: a transformers directory of a Llama-family model (or a LLaVA) -> a run directory."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    im = subparsers.add_parser("import", help="a transformers directory (Llama, Mistral, Qwen2, Baichuan-7B, "
                                              "Baichuan2-7B, InternLM2, LLaVA) -> a run directory")
    im.add_argument("src", help="a directory with config.json, the weights (model.safetensors, sharded or "
                                "not, or pytorch_model.bin) and the tokenizer files (LLaVA: a SigLIP "
                                "encoder and a Llama language model)")
    im.add_argument("-o", "--out", required=True, help="the run directory to write")
    im.set_defaults(func=cmd_import)


def cmd_import(args) -> None:
    from babyllama.export.hf import import_hf
    from babyllama.run import CONFIG, HF_CONFIG, TOKENIZER, WEIGHTS, Run, hf_model_config

    out = import_hf(args.src, args.out)
    if Run(out).is_vision():
        print(f"imported {args.src} -> {out} ({CONFIG}, {WEIGHTS}, {TOKENIZER}/): an image-text run "
              f"(stage instruct); `babyllama instruct --base {out}` fine-tunes it further")
        return
    _, family = hf_model_config(Path(args.src) / HF_CONFIG)
    for note in family.notes:
        print(f"note: {note}")
    template = "its chat template" if Run(out).load_tokenizer().chat_template else "no chat template"
    print(f"imported {family.name} {args.src} -> {out} ({CONFIG}, {WEIGHTS}, {TOKENIZER}/ with {template}): "
          f"`babyllama generate {out} --prompt TEXT`, `babyllama sft --base {out} --data FILE`")
