"""`babyllama clean`: raw corpora -> clean, deduplicated jsonl shards with a report."""

from __future__ import annotations

from pathlib import Path

from babyllama.textfile import read_text


def add_parser(subparsers) -> None:
    cl = subparsers.add_parser("clean", help="raw corpora -> clean, deduplicated jsonl shards with a report")
    cl.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="files or folders: .txt in any Chinese encoding (a document per line), "
                         ".jsonl/.json/.csv/.parquet, MediaWiki dumps (.xml, .xml.bz2)")
    cl.add_argument("-o", "--out", required=True, help="output folder (part-*.jsonl, _report.md/json)")
    cl.add_argument("--normalize", default="width", choices=["width", "nfkc", "none"],
                    help="width: full-width Latin letters/digits to ASCII, Chinese punctuation kept "
                         "(default); nfkc: Unicode NFKC")
    cl.add_argument("--no-simplify", action="store_true", help="keep traditional characters")
    cl.add_argument("--no-html", action="store_true", help="do not strip HTML tags")
    cl.add_argument("--mask-pii", action="store_true", help="e-mail addresses and phone numbers -> <email>/<phone>")
    cl.add_argument("--min-chars", type=int, default=20)
    cl.add_argument("--max-chars", type=int, default=200_000)
    cl.add_argument("--min-chinese-ratio", type=float, default=0.3, help="Han characters / non-space characters")
    cl.add_argument("--max-repeated-line-ratio", type=float, default=0.3)
    cl.add_argument("--max-junk-ratio", type=float, default=0.25, help="symbols that are neither text nor punctuation")
    cl.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")
    cl.add_argument("--no-near-dedup", action="store_true", help="exact duplicates only")
    cl.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    cl.add_argument("--bands", type=int, default=32,
                    help="LSH bands (more: lower Jaccard threshold; 32 x 4 rows: ~0.42)")
    cl.add_argument("--ngram", type=int, default=5, help="character n-gram size of the shingles")
    cl.add_argument("--near-jaccard", type=float, default=0.6,
                    help="estimated Jaccard at which a candidate pair counts as a near-duplicate")
    cl.add_argument("--shard-mb", type=int, default=64)
    cl.add_argument("--workers", type=int, default=None, help="processes (default: cores - 1)")
    cl.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    cl.set_defaults(func=cmd_clean)


def cmd_clean(args) -> None:
    from babyllama.data.clean import CleanConfig, clean

    cfg = CleanConfig(
        normalize=args.normalize, simplify=not args.no_simplify, html=not args.no_html,
        mask=args.mask_pii, min_chars=args.min_chars, max_chars=args.max_chars,
        min_chinese_ratio=args.min_chinese_ratio, max_repeated_line_ratio=args.max_repeated_line_ratio,
        max_junk_ratio=args.max_junk_ratio, exact_dedup=not args.no_dedup,
        near_dedup=not (args.no_dedup or args.no_near_dedup), num_perm=args.num_perm,
        bands=args.bands, ngram=args.ngram, near_jaccard=args.near_jaccard, shard_mb=args.shard_mb, workers=args.workers,
        text_field=args.text_field)
    report = clean(args.inputs, args.out, cfg)
    out = Path(args.out)
    md = read_text(out / "_report.md")
    print(md.split("## Examples removed")[0].rstrip())
    shards = ", ".join(report["shards"]) or "no shards: nothing survived the filters"
    print(f"-> {out} ({shards}; _report.md, _report.json with examples)")
