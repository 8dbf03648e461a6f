"""`babyllama model info`: parameter counts of a preset, a YAML config or a run."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    # babyllama.config imports the model (torch): only here, where the presets are listed.
    from babyllama.config import list_presets

    mo = subparsers.add_parser("model", help="inspect model presets").add_subparsers(
        dest="model_command", required=True, metavar="ACTION")
    mi = mo.add_parser("info", help="parameter counts of a preset or a run")
    mi.add_argument("preset", help=f"a preset ({', '.join(list_presets())}), a YAML file or a run directory")
    mi.add_argument("--vocab-size", type=int, default=None)
    tied = mi.add_mutually_exclusive_group()
    tied.add_argument("--tied", dest="tied", action="store_true", default=None, help="tie the LM head to the embedding")
    tied.add_argument("--untied", dest="tied", action="store_false")
    mi.set_defaults(func=cmd_model_info)


def cmd_model_info(args) -> None:
    from babyllama.config import load_config
    from babyllama.model.llama import Llama
    from babyllama.run import Run

    if Path(args.preset).is_dir():
        cfg = Run(args.preset).config().model
    else:
        cfg = load_config(args.preset).model
    if args.vocab_size:
        cfg.vocab_size = args.vocab_size
    if args.tied is not None:
        cfg.tie_word_embeddings = args.tied
    import torch

    with torch.device("meta"):  # count without allocating (the big presets are hundreds of MB)
        model = Llama(cfg)
    print(format_param_table(model, args.preset))


def format_param_table(model, name: str) -> str:
    c = model.config
    n = model.parameter_counts()
    rows = [("embedding", n["embedding"]),
            ("lm_head" + (" (tied: shares the embedding)" if c.tie_word_embeddings else ""), n["lm_head"]),
            (f"decoder layers ({c.num_hidden_layers} x {n['layers'] // c.num_hidden_layers:,})", n["layers"]),
            ("final norm", n["final_norm"])]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{name}: hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads "
             f"({c.kv_heads} kv), intermediate {c.intermediate_size}, vocab {c.vocab_size:,}, "
             f"context {c.max_position_embeddings}",
             f"{'part':<{width}}{'parameters':>14}{'share':>9}"]
    for label, count in rows:
        lines.append(f"{label:<{width}}{count:>14,}{count / n['total']:>9.1%}")
    lines.append(f"{'total':<{width}}{n['total']:>14,}{1:>9.1%}  ({n['total'] / 1e6:.1f}M)")
    return "\n".join(lines)
