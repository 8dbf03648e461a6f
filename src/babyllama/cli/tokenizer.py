"""`babyllama tokenizer train|trim|report`: make a tokenizer, shrink one, or measure one on a corpus."""

from __future__ import annotations

import argparse
import json

from babyllama.cli.sources import add_source_args, source_texts


def vocab_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size or sizes like 4000,8000") from None
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one size")
    return sizes


def add_parser(subparsers) -> None:
    tok = subparsers.add_parser("tokenizer", help="train, trim or report on a tokenizer").add_subparsers(
        dest="tokenizer_command", required=True, metavar="ACTION")

    tt = tok.add_parser("train", help="train a byte-level BPE tokenizer on text sources")
    add_source_args(tt)
    tt.add_argument("--vocab-size", type=vocab_sizes, default=[8000],
                    help="one size, or several (4000,8000,16000) to train each and compare them "
                         "on held-out documents")
    tt.add_argument("--preset", default=None, help="with several sizes: report the embedding share "
                                                   "of this model preset")
    tt.add_argument("--pretokenizer", default=None, help="pre-tokenization (default: the measured best; see README)")
    tt.add_argument("--max-documents", type=int, default=0, help="train on at most N documents (0: all)")
    tt.add_argument("-o", "--out", required=True, help="output directory")
    tt.set_defaults(func=cmd_tokenizer_train)

    tm = tok.add_parser("trim", help="shrink a SentencePiece tokenizer to the pieces a corpus uses "
                                     "(plus all CJK pieces and a retain list)")
    tm.add_argument("tokenizer", help="a SentencePiece .model or a tokenizer directory")
    add_source_args(tm)
    tm.add_argument("--retain", help="a file of pieces or words to keep (one per line), e.g. English words")
    tm.add_argument("--no-keep-cjk", action="store_true", help="keep only the CJK pieces the corpus uses")
    tm.add_argument("--max-documents", type=int, default=0, help="read at most N documents (0: all)")
    tm.add_argument("-o", "--out", required=True, help="output directory")
    tm.set_defaults(func=cmd_tokenizer_trim)

    tr = tok.add_parser("report", help="chars/token, byte fallback, coverage and embedding share on a corpus")
    tr.add_argument("tokenizer", help="a tokenizer directory, tokenizer.json or SentencePiece .model")
    add_source_args(tr)
    tr.add_argument("--preset", default=None, help="a model preset: the embedding's share of its parameters")
    tr.add_argument("--max-documents", type=int, default=0, help="read at most N documents (0: all)")
    tr.add_argument("--json", help="also write the numbers to this JSON file")
    tr.set_defaults(func=cmd_tokenizer_report)


def cmd_tokenizer_train(args) -> None:
    from babyllama.data.readers import BadRecords, iter_sources, require_documents
    from babyllama.tokenizer import train_tokenizer

    bad = BadRecords()
    docs = iter_sources(args.sources, text_field=args.text_field, skip_bad=args.skip_bad_records, bad=bad)
    texts = require_documents(docs, args.sources, bad)  # an empty corpus is an error, as for prepare
    if args.max_documents:
        import itertools

        texts = itertools.islice(texts, args.max_documents)
    kwargs = {"pretokenizer": args.pretokenizer} if args.pretokenizer else {}
    if len(args.vocab_size) > 1:
        return tokenizer_sweep(args, kwargs)
    tok = train_tokenizer(texts, args.vocab_size[0], **kwargs)
    tok.save(args.out)
    if bad.count:
        print(bad.summary())
    print(f"tokenizer: {tok.vocab_size:,} tokens (bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}) "
          f"-> {args.out}")


def tokenizer_sweep(args, kwargs) -> None:
    from babyllama.tokenizer.report import held_out_split, sweep_table, sweep_vocab_sizes

    train_texts, held_out = held_out_split(source_texts(args))
    reports = sweep_vocab_sizes(train_texts, args.vocab_size, held_out, preset=args.preset,
                                save_dir=args.out, **kwargs)
    print(sweep_table(reports))
    print(f"-> {args.out}/vocab-<size> (one tokenizer per size)")


def cmd_tokenizer_trim(args) -> None:
    from babyllama.tokenizer.trim import read_retain_file, trim_sentencepiece

    retain = read_retain_file(args.retain) if args.retain else ()
    result = trim_sentencepiece(args.tokenizer, source_texts(args)(), keep_cjk=not args.no_keep_cjk,
                                retain=retain)
    result.save(args.out)
    print(result.summary())
    print(f"-> {args.out} (tokenizer.model, tokenizer_config.json, id_map.json)")


def cmd_tokenizer_report(args) -> None:
    from babyllama.atomic import atomic_write_text
    from babyllama.tokenizer.report import tokenizer_report

    report = tokenizer_report(args.tokenizer, source_texts(args)(), preset=args.preset,
                              name=args.tokenizer, progress=True)
    print(report.table())
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n")
