"""`babyllama`: one entry point, one subcommand per stage.

A user mistake (`UserError`) prints one line, `error: <file:line: problem>`, and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from babyllama.errors import UserError

SOURCES_HELP = ("text sources: .txt (a document per line), .jsonl/.json, .parquet, .csv, a directory "
                "of those, or builtin:peoples-daily / builtin:reviews")


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip and count malformed records instead of stopping at the first")


def cmd_tokenizer_train(args) -> None:
    from babyllama.data.readers import BadRecords, iter_documents
    from babyllama.tokenizer import train_tokenizer

    bad = BadRecords()
    texts = (doc for src in args.sources
             for doc in iter_documents(src, text_field=args.text_field, skip_bad=args.skip_bad_records, bad=bad))
    if args.max_documents:
        import itertools

        texts = itertools.islice(texts, args.max_documents)
    kwargs = {"pretokenizer": args.pretokenizer} if args.pretokenizer else {}
    tok = train_tokenizer(texts, args.vocab_size, **kwargs)
    tok.save(args.out)
    if bad.count:
        print(bad.summary())
    print(f"tokenizer: {tok.vocab_size:,} tokens (bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}) "
          f"-> {args.out}")


def cmd_prepare(args) -> None:
    from babyllama.data.shards import prepare
    from babyllama.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    meta = prepare(args.sources, tok, args.out, val_fraction=args.val_fraction, workers=args.workers,
                   text_field=args.text_field, skip_bad=args.skip_bad_records)
    print_prepare_summary(meta, args.out)


def print_prepare_summary(meta: dict, out) -> None:
    parts = [f"{name}: {s['n_tokens']:,} tokens in {s['n_documents']:,} documents"
             for name, s in meta["splits"].items()]
    print(f"prepared -> {out} ({meta['dtype']})  " + "; ".join(parts))
    if meta["bad_records"]["count"]:
        print(meta["bad_records"]["summary"])


def build_config(args):
    from babyllama.config import apply_values, check, load_config, parse_overrides, read_run_config

    if args.resume:
        cfg = read_run_config(Path(args.out))
        if args.overrides:
            values = parse_overrides(args.overrides)
            allowed = {"train": {"max_steps", "eval_every", "sample_every", "save_every", "log_every",
                                 "device"}}
            for section, keys in values.items():
                bad = set(keys) - allowed.get(section, set()) if isinstance(keys, dict) else {section}
                if bad:
                    raise UserError(f"command line: {section}.{sorted(bad)[0]} cannot change when "
                                    "resuming (only train.max_steps and logging intervals can)")
            apply_values(cfg, values)
        # The run may have moved, or be resumed from another directory: trust the paths given now.
        cfg.out_dir = args.out
        if args.data:
            cfg.data = args.data
        if args.tokenizer:
            cfg.tokenizer = args.tokenizer
        check(cfg)
        return cfg
    cfg = load_config(args.preset or args.config, args.overrides)
    if args.data:
        cfg.data = args.data
    if args.tokenizer:
        cfg.tokenizer = args.tokenizer
    cfg.out_dir = args.out
    return cfg


def cmd_pretrain(args) -> None:
    from babyllama.train.pretrain import run_pretrain

    cfg = build_config(args)
    run_dir = run_pretrain(cfg, resume=args.resume)
    print(f"run directory: {run_dir}  (model.safetensors, metrics.jsonl, loss.png, samples.txt)")


def cmd_generate(args) -> None:
    from babyllama.llm import load

    llm = load(args.run, device=args.device)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    for prompt in args.prompt:
        sys.stdout.write(prompt)
        for piece in llm.stream(prompt, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def cmd_model_info(args) -> None:
    from babyllama.config import load_config, read_run_config
    from babyllama.model.llama import Llama

    if Path(args.preset).is_dir():
        cfg = read_run_config(Path(args.preset)).model
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


def cmd_demo(args) -> None:
    from babyllama.demo import run_demo

    run_demo(Path(args.out), minutes=args.minutes, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    from babyllama.config import list_presets

    p = argparse.ArgumentParser(prog="babyllama", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="tokenizer_command",
                                                                                 required=True, metavar="ACTION")
    tt = tok.add_parser("train", help="train a byte-level BPE tokenizer on text sources")
    add_source_args(tt)
    tt.add_argument("--vocab-size", type=int, default=8000)
    tt.add_argument("--pretokenizer", default=None, help="pre-tokenization (default: the measured best; see README)")
    tt.add_argument("--max-documents", type=int, default=0, help="train on at most N documents (0: all)")
    tt.add_argument("-o", "--out", required=True, help="output directory")
    tt.set_defaults(func=cmd_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize text sources into token shards (train + val split)")
    add_source_args(pr)
    pr.add_argument("--tokenizer", required=True,
                    help="a tokenizer directory, a SentencePiece .model, or a tokenizer.json")
    pr.add_argument("-o", "--out", required=True, help="output directory")
    pr.add_argument("--val-fraction", type=float, default=0.01)
    pr.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    pr.set_defaults(func=cmd_prepare)

    pt = sub.add_parser("pretrain", help="pretrain a model on prepared shards",
                        description="Pretrain a Llama. Any config field can be overridden as "
                                    "section.key=value, e.g. train.lr=3e-4 model.num_hidden_layers=8.")
    src = pt.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"a preset: {', '.join(list_presets())}")
    src.add_argument("-c", "--config", help="a YAML config file")
    pt.add_argument("--data", help="a directory made by `babyllama prepare`")
    pt.add_argument("--tokenizer", help="tokenizer (default: the one saved with the data)")
    pt.add_argument("-o", "--out", required=True, help="run directory")
    pt.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    pt.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    pt.set_defaults(func=cmd_pretrain)

    ge = sub.add_parser("generate", help="continue a prompt with a trained model")
    ge.add_argument("run", help="a run directory (or a transformers Llama directory)")
    ge.add_argument("--prompt", action="append", required=True, help="may be repeated")
    ge.add_argument("--max-new-tokens", type=int, default=100)
    ge.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ge.add_argument("--top-k", type=int, default=0)
    ge.add_argument("--top-p", type=float, default=1.0)
    ge.add_argument("--repetition-penalty", type=float, default=1.0)
    ge.add_argument("--seed", type=int, default=None)
    ge.add_argument("--device", default="auto")
    ge.set_defaults(func=cmd_generate)

    mo = sub.add_parser("model", help="inspect model presets").add_subparsers(dest="model_command",
                                                                              required=True, metavar="ACTION")
    mi = mo.add_parser("info", help="parameter counts of a preset or a run")
    mi.add_argument("preset", help=f"a preset ({', '.join(list_presets())}), a YAML file or a run directory")
    mi.add_argument("--vocab-size", type=int, default=None)
    tied = mi.add_mutually_exclusive_group()
    tied.add_argument("--tied", dest="tied", action="store_true", default=None, help="tie the LM head to the embedding")
    tied.add_argument("--untied", dest="tied", action="store_false")
    mi.set_defaults(func=cmd_model_info)

    de = sub.add_parser("demo", help="tokenizer -> prepare -> pretrain -> samples on the built-in corpora")
    de.add_argument("-o", "--out", default="runs/demo")
    de.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    de.add_argument("--steps", type=int, default=0, help="exact number of training steps (overrides --minutes)")
    de.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
