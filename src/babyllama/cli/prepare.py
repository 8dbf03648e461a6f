"""`babyllama prepare`: tokenize text sources into token shards (train + val split)."""

from __future__ import annotations

from babyllama.cli.sources import add_source_args


def add_parser(subparsers) -> None:
    pr = subparsers.add_parser("prepare", help="tokenize text sources into token shards (train + val split)")
    add_source_args(pr)
    pr.add_argument("--tokenizer", required=True,
                    help="a tokenizer directory, a SentencePiece .model, or a tokenizer.json")
    pr.add_argument("-o", "--out", required=True, help="output directory")
    pr.add_argument("--val-fraction", type=float, default=0.01)
    pr.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    pr.set_defaults(func=cmd_prepare)


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
