"""The text sources a data command reads: the SOURCE arguments, their field and bad-record
flags, and fresh document iterators over them."""

from __future__ import annotations

import argparse

SOURCES_HELP = ("text sources: .txt (a document per line), .jsonl/.json, .parquet, .csv, a directory "
                "of those, or builtin:peoples-daily / builtin:reviews")


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip and count malformed records instead of stopping at the first")


def source_texts(args):
    """A factory of fresh document iterators over the command's sources."""
    import itertools

    from babyllama.data.readers import iter_sources

    def texts():
        docs = iter_sources(args.sources, text_field=args.text_field, skip_bad=args.skip_bad_records)
        return itertools.islice(docs, args.max_documents) if getattr(args, "max_documents", 0) else docs
    return texts
