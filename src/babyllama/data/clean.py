"""`babyllama clean`: raw Chinese corpora -> clean, deduplicated jsonl shards and a report.

    clean(["zhwiki-latest-pages-articles.xml.bz2", "news/"], "runs/clean", CleanConfig())

Each document goes through the steps below, in this order, in worker processes; the main
process reads the inputs, drops exact duplicates as results come back (first occurrence wins),
spools the survivors to disk and adds their MinHash signatures to a disk-backed LSH index.
When every input is read, the index names the near-duplicates (each cluster keeps its first
document) and a second pass over the spool writes the output shards. Memory stays bounded:
batches in flight are a fixed window, the spool and the index live on disk.

    wiki      MediaWiki markup -> text (dumps only; dates in templates kept, refs dropped;
              ages and {{CURRENTYEAR}} as of the revision's timestamp, {{PAGENAME}} its title)
    html      tags, scripts, entities (only when the text has a tag)
    normalize full-width Latin letters and digits -> ASCII (Chinese punctuation stays), or NFKC
    simplify  traditional -> simplified characters (OpenCC t2s)
    spaces    control and zero-width characters, runs of spaces, blank lines
    mask      e-mail addresses and phone numbers -> <email> / <phone> (off by default)
    filters   too short / too long / little Chinese / repeated lines / junk symbols
    exact     the same text seen before
    near      MinHash-LSH near-duplicate of an earlier document (5-character shingles; 32
              bands x 4 rows make pairs from Jaccard ~0.42 candidates, so edits of 2-5% of the
              characters, Jaccard ~0.82-0.63, are found; a candidate is dropped only at an
              estimated Jaccard >= 0.6, so documents that merely share boilerplate stay)

Output: OUT/part-00000.jsonl ... ({"text": ...} per line, ~shard_mb each; `babyllama prepare`
reads the folder; it skips files starting with "_"), OUT/_report.md and OUT/_report.json. OUT
is written as OUT.tmp-PID and moved into place at the end: an interrupted run leaves the
previous output untouched (and starts over when run again). OUT must be new, empty or an
earlier clean output: a folder holding anything else is refused before any work, since
replacing it would delete what it holds.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from babyllama.atomic import check_output_dir, replace_dir
from babyllama.batching import batched_by_size
from babyllama.data import clean_text as ct
from babyllama.data.dedup import (ExactDedup, MinHashConfig, NearDupIndex, band_keys, exact_key,
                                  minhash_signature, shingle_hashes)
from babyllama.data.encoding import TextFile
from babyllama.data.readers import BadRecords, READERS_BY_SUFFIX, iter_documents
from babyllama.data.wikitext import iter_wiki_pages, wikitext_to_text
from babyllama.errors import UserError

STEPS = ("wiki", "html", "normalize", "simplify", "spaces", "mask")
WIKI_SUFFIXES = (".xml", ".xml.bz2")
TEXT_SUFFIXES = (".txt", ".txt.gz")
EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 160
BATCH_DOCS, BATCH_CHARS = 512, 2_000_000
REPORT_FILE = "_report.json"
# What a clean output directory holds; an -o directory holding anything else is refused.
OUTPUT_NAMES = re.compile(r"part-\d{5}\.jsonl|_report\.md|_report\.json")


@dataclass
class CleanConfig:
    normalize: str = "width"          # width | nfkc | none
    simplify: bool = True             # traditional -> simplified (OpenCC t2s)
    html: bool = True
    mask: bool = False                # e-mail / phone masking
    min_chars: int = 20
    max_chars: int = 200_000
    min_chinese_ratio: float = 0.3
    max_repeated_line_ratio: float = 0.3
    max_junk_ratio: float = 0.25
    exact_dedup: bool = True
    near_dedup: bool = True
    num_perm: int = 128
    bands: int = 32                   # 32 x 4 rows: pairs above Jaccard ~0.42 become candidates
    ngram: int = 5
    near_jaccard: float = 0.6         # a candidate is a duplicate at this estimated Jaccard
    shard_mb: int = 64
    workers: int | None = None        # None: one per core but one
    text_field: str = "text"

    def filters(self) -> ct.FilterConfig:
        return ct.FilterConfig(min_chars=self.min_chars, max_chars=self.max_chars,
                               min_chinese_ratio=self.min_chinese_ratio,
                               max_repeated_line_ratio=self.max_repeated_line_ratio,
                               max_junk_ratio=self.max_junk_ratio)

    def minhash(self):
        return MinHashConfig(num_perm=self.num_perm, bands=self.bands, ngram=self.ngram)

    def check(self) -> None:
        if self.normalize not in ("width", "nfkc", "none"):
            raise UserError(f"normalize {self.normalize!r}: choose width, nfkc or none")
        if self.shard_mb < 1:
            raise UserError(f"shard_mb must be at least 1, got {self.shard_mb}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"workers must not be negative, got {self.workers}")
        self.filters().check()
        if self.near_dedup:
            self.minhash().check()
            if not 0.0 <= self.near_jaccard <= 1.0:
                raise UserError(f"near_jaccard must be in [0, 1], got {self.near_jaccard}")


# ----------------------------------------------------------------------------------------
# Reading: (kind, text) documents from every input, with per-file counts


@dataclass
class InputStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped_files: list[str] = field(default_factory=list)   # "path: reason"
    bad_lines: int = 0
    long_lines: int = 0
    bad_records: int = 0
    # reason -> {"count", "examples": ["file:line: problem", ...]}, as BadRecords.to_dict()
    bad_record_reasons: dict = field(default_factory=dict)


def input_files(inputs: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise UserError(f"{path}: no such file or directory")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise UserError(f"{path}: directory holds no files")
            files += found
        else:
            files.append(path)
    return files


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (*WIKI_SUFFIXES, ".jsonl.gz", ".json.gz", ".csv.gz", *TEXT_SUFFIXES):
        if name.endswith(s):
            return s
    return path.suffix.lower()


# A document: ("wiki" | "text", text, page). `page` is what `wikitext_to_text` is told about a
# wiki article besides its markup (title=, today=: the revision's date), None for other text.
Doc = tuple[str, str, dict | None]


def iter_inputs(files: list[Path], text_field: str, stats: InputStats) -> Iterator[Doc]:
    """A `Doc` for every document of every file; unreadable files and records are skipped and
    counted in `stats`, never raised."""
    bad = BadRecords()  # over all files, so the report gives each reason's total
    for path in files:
        stats.files += 1
        stats.bytes += path.stat().st_size
        kind = _suffix(path)
        if kind in WIKI_SUFFIXES:
            try:
                for page in iter_wiki_pages(path):
                    stats.documents += 1
                    yield "wiki", page.text, {"title": page.title, "today": page.today}
            except UserError as e:
                stats.skipped_files.append(str(e))
        elif kind in TEXT_SUFFIXES or kind not in (*READERS_BY_SUFFIX, ".jsonl.gz", ".json.gz", ".csv.gz"):
            yield from _iter_text_file(path, stats)
        else:
            try:
                for text in iter_documents(path, text_field=text_field, skip_bad=True, bad=bad):
                    stats.documents += 1
                    yield "text", text, None
            except UserError as e:  # a missing field everywhere, an unreadable parquet, ...
                stats.skipped_files.append(str(e))
            stats.bad_records = bad.count
            stats.bad_record_reasons = bad.to_dict()["reasons"]


def _iter_text_file(path: Path, stats: InputStats) -> Iterator[Doc]:
    """A plain text file in any encoding, one document per non-empty line."""
    f = TextFile(path)
    if f.skipped:
        stats.skipped_files.append(f"{path}: {f.skipped}")
        return
    for _, line in f.lines():
        if line.strip():
            stats.documents += 1
            yield "text", line, None
    stats.bad_lines += f.stats.get("bad_lines", 0)
    stats.long_lines += f.stats.get("long_lines", 0)


# ----------------------------------------------------------------------------------------
# Worker: the per-document steps


@dataclass
class BatchResult:
    kept: list[tuple[str, bytes, np.ndarray | None, np.ndarray | None]]  # text, exact key, signature, bands
    changed: Counter          # step -> documents it changed
    removed: Counter          # filter -> documents it removed
    examples: dict[str, list[str]]
    chars_in: int = 0
    bytes_in: int = 0
    masked: int = 0


_WORKER_CFG: CleanConfig | None = None


def _worker_init(cfg: CleanConfig) -> None:
    global _WORKER_CFG
    _WORKER_CFG = cfg


def _worker_clean(batch: list[Doc]) -> BatchResult:
    return clean_batch(batch, _WORKER_CFG)


def _transforms(cfg: CleanConfig):
    """(step name, function) in order, for the steps this config turns on."""
    steps = [("wiki", wikitext_to_text)]
    if cfg.html:
        steps.append(("html", lambda t: ct.strip_html(t) if "<" in t else t))
    if cfg.normalize != "none":
        steps.append(("normalize", ct.normalize_width if cfg.normalize == "width" else ct.normalize_nfkc))
    if cfg.simplify:
        steps.append(("simplify", ct.to_simplified))
    steps.append(("spaces", ct.clean_whitespace))
    return steps


def clean_batch(batch: list[Doc], cfg: CleanConfig) -> BatchResult:
    """Transform and filter a batch; signatures for the survivors."""
    filters, mh = cfg.filters(), cfg.minhash() if cfg.near_dedup else None
    steps = _transforms(cfg)
    out = BatchResult([], Counter(), Counter(), {})
    for kind, text, page in batch:
        out.chars_in += len(text)
        out.bytes_in += len(text.encode("utf-8"))
        for name, step in steps:
            if name == "wiki" and kind != "wiki":
                continue
            new = step(text, **page) if name == "wiki" else step(text)
            if new != text:
                out.changed[name] += 1
                text = new
        if cfg.mask:
            text, n = ct.mask_pii(text)
            if n:
                out.changed["mask"] += 1
                out.masked += n
        reason = ct.filter_reason(text, filters)
        if reason:
            out.removed[reason] += 1
            _example(out.examples, reason, text)
            continue
        sig = bands = None
        if mh is not None:
            sig = minhash_signature(shingle_hashes(text, mh.ngram), mh)
            bands = band_keys(sig, mh)
        out.kept.append((text, exact_key(text), sig, bands))
    return out


def _example(examples: dict[str, list[str]], reason: str, text: str) -> None:
    shown = examples.setdefault(reason, [])
    if len(shown) < EXAMPLES_PER_REASON:
        shown.append(text[:EXAMPLE_CHARS] + ("…" if len(text) > EXAMPLE_CHARS else ""))


def _doc_chars(doc: Doc) -> int:
    return len(doc[1])


def _cleaned(docs: Iterator[Doc], cfg: CleanConfig) -> Iterator[BatchResult]:
    """Batch results in input order, from worker processes (or in-process with 0-1 workers)."""
    workers = cfg.workers if cfg.workers is not None else max(1, (os.cpu_count() or 1) - 1)
    if workers <= 1:
        for batch in batched_by_size(docs, BATCH_DOCS, BATCH_CHARS, length=_doc_chars):
            yield clean_batch(batch, cfg)
        return
    import multiprocessing as mp

    # spawn: the same on every platform, and no copy of the reader's open files.
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(cfg,)) as pool:
        # A bounded window of batches in flight (Pool.imap would read the whole input ahead).
        pending: deque = deque()
        for batch in batched_by_size(docs, BATCH_DOCS, BATCH_CHARS, length=_doc_chars):
            pending.append(pool.apply_async(_worker_clean, (batch,)))
            if len(pending) >= 2 * workers + 1:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------------------
# Output


class TextShardWriter:
    """jsonl shards of about `shard_mb` megabytes: part-00000.jsonl, part-00001.jsonl, ..."""

    def __init__(self, directory: Path, shard_mb: int):
        self.directory, self.limit = directory, shard_mb << 20
        self.index, self.size, self.file = 0, 0, None
        self.paths: list[Path] = []

    def write(self, text: str) -> None:
        line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
        if self.file is None or self.size + len(line) > self.limit and self.size:
            self._next()
        self.file.write(line)
        self.size += len(line)

    def _next(self) -> None:
        self.close()
        path = self.directory / f"part-{self.index:05d}.jsonl"
        self.file, self.size = open(path, "wb"), 0
        self.paths.append(path)
        self.index += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children (the workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024  # ru_maxrss is in KB on Linux


# ----------------------------------------------------------------------------------------
# The pipeline


def clean(inputs: list[str | Path], out_dir: str | Path, cfg: CleanConfig | None = None,
          progress: bool = True) -> dict:
    """Clean and deduplicate `inputs` into `out_dir`; returns the report (also _report.json).

    An earlier clean output in `out_dir` is replaced once the new one is complete. Raises
    UserError, before anything is read, for bad settings, missing inputs and an `out_dir` that
    holds anything but a clean output (see `atomic.check_output_dir`); and when the inputs
    hold no documents at all. Every document filtered out is not an error: the report then
    lists no shards (`report["shards"] == []`, `documents_out == 0`).
    """
    cfg = cfg or CleanConfig()
    cfg.check()
    files = input_files(list(inputs))
    out_dir = Path(out_dir)
    check_output_dir(out_dir, REPORT_FILE, OUTPUT_NAMES)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ".work").mkdir(parents=True)
    try:
        report = _clean_into(tmp, files, cfg, progress)
        shutil.rmtree(tmp / ".work")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _clean_into(tmp: Path, files: list[Path], cfg: CleanConfig, progress: bool) -> dict:
    started = time.perf_counter()
    stats = InputStats()
    changed, removed, examples = Counter(), Counter(), {}
    exact = ExactDedup() if cfg.exact_dedup else None
    index = NearDupIndex(tmp / ".work" / "lsh", cfg.minhash()) if cfg.near_dedup else None
    spool_path = tmp / ".work" / "spool.jsonl"
    chars_in = masked = kept = 0
    # Progress in bytes of text read; a compressed input's text size is unknown (no ETA then).
    compressed = any(f.name.lower().endswith((".gz", ".bz2")) for f in files)
    total = None if compressed else sum(f.stat().st_size for f in files)
    with open(spool_path, "wb") as spool, _bar(progress, total) as bar:
        for result in _cleaned(iter_inputs(files, cfg.text_field, stats), cfg):
            chars_in += result.chars_in
            masked += result.masked
            changed.update(result.changed)
            removed.update(result.removed)
            for reason, shown in result.examples.items():
                for text in shown:
                    _example(examples, reason, text)
            for text, key, sig, bands in result.kept:
                if exact is not None and exact.seen(key):
                    removed["exact_duplicate"] += 1
                    _example(examples, "exact_duplicate", text)
                    continue
                if index is not None:
                    index.add(kept, sig, bands)
                spool.write((json.dumps(text, ensure_ascii=False) + "\n").encode("utf-8"))
                kept += 1
            bar.update(result.bytes_in)
            bar.set_postfix_str(f"{stats.documents:,} docs, {kept:,} kept", refresh=False)
    if stats.documents == 0:
        why = stats.skipped_files[:3]
        if len(stats.skipped_files) > 3:
            why.append(f"{len(stats.skipped_files) - 3} more files skipped")
        why += [f"{n['count']:,} records skipped: {n['examples'][0]}"
                for n in stats.bad_record_reasons.values()]
        skipped = f" ({'; '.join(why)})" if why else ""
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        raise UserError(f"no documents in {', '.join(map(str, files[:3]))}{more}{skipped}")

    near = index.duplicates(cfg.near_jaccard) if index is not None else None
    drop = set(near.drop.tolist()) if near is not None else set()
    removed["near_duplicate"] += len(drop)
    writer = TextShardWriter(tmp, cfg.shard_mb)
    chars_out = 0
    with open(spool_path, "rb") as spool:
        for doc_id, line in enumerate(spool):
            text = json.loads(line)
            if doc_id in drop:
                _example(examples, "near_duplicate", text)
                continue
            writer.write(text)
            chars_out += len(text)
    writer.close()
    seconds = time.perf_counter() - started
    report = {
        "inputs": [str(f) for f in files],
        "config": asdict(cfg),
        "read": asdict(stats),
        "documents_in": stats.documents,
        "documents_out": kept - len(drop),
        "chars_in": chars_in,
        "chars_out": chars_out,
        "changed_by_step": {s: changed.get(s, 0) for s in STEPS},
        "masked_items": masked,
        "removed": {r: removed.get(r, 0) for r in (*ct.FILTERS, "exact_duplicate", "near_duplicate")},
        "near_duplicates": None if near is None else {
            "clusters": int(near.clusters), "candidate_pairs": int(near.candidate_pairs),
            "verified_pairs": int(near.verified_pairs),
            "lsh_threshold": round(cfg.minhash().threshold, 3), "min_jaccard": cfg.near_jaccard},
        "examples": examples,
        "shards": [p.name for p in writer.paths],
        "seconds": round(seconds, 2),
        "mb_per_s": round(stats.bytes / 2**20 / max(seconds, 1e-9), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    (tmp / REPORT_FILE).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n",
                                   encoding="utf-8")
    (tmp / "_report.md").write_text(report_markdown(report), encoding="utf-8")
    return report


def _bar(progress: bool, total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, desc="cleaning", unit="B", unit_scale=True, unit_divisor=1024,
                smoothing=0.05, dynamic_ncols=True, disable=not progress, leave=False)


def report_markdown(r: dict) -> str:
    """The report as tables a person reads: what came in, what each step did, what left."""
    n_in = max(r["documents_in"], 1)
    lines = ["# Cleaning report", "",
             f"{len(r['inputs'])} input file(s), {r['read']['bytes'] / 2**20:,.1f} MiB in "
             f"{r['seconds']:,.1f} s ({r['mb_per_s']:,.2f} MiB/s), peak memory "
             f"{r['peak_rss_mb']:,.0f} MiB.", "",
             "| | documents | characters |", "|---|---:|---:|",
             f"| in | {r['documents_in']:,} | {r['chars_in']:,} |",
             f"| out | {r['documents_out']:,} | {r['chars_out']:,} |", ""]
    read = r["read"]
    skipped = [f"{read['bad_lines']:,} undecodable lines", f"{read['long_lines']:,} over-long lines",
               f"{read['bad_records']:,} malformed records", f"{len(read['skipped_files'])} files skipped"]
    lines += ["Reading: " + ", ".join(skipped) + "."]
    lines += [f"- {s}" for s in read["skipped_files"][:10]]
    for reason, seen in read.get("bad_record_reasons", {}).items():
        lines += [f"- {seen['count']:,} malformed records: {reason}, e.g."]
        lines += [f"  - {example}" for example in seen["examples"]]
    lines += ["", "| step | documents changed |", "|---|---:|"]
    lines += [f"| {s} | {n:,} |" for s, n in r["changed_by_step"].items()]
    lines += ["", "| removed by | documents | share of input |", "|---|---:|---:|"]
    lines += [f"| {k} | {n:,} | {n / n_in:.1%} |" for k, n in r["removed"].items()]
    near = r["near_duplicates"]
    if near:
        lines += ["", f"Near-duplicates: MinHash-LSH candidates from Jaccard ≈ {near['lsh_threshold']}, "
                      f"kept as duplicates at estimated Jaccard ≥ {near['min_jaccard']} "
                      f"({near['candidate_pairs']:,} candidate pairs, {near['verified_pairs']:,} "
                      f"verified, {near['clusters']:,} clusters)."]
    if r["examples"]:
        lines += ["", "## Examples removed", ""]
        for reason, shown in r["examples"].items():
            lines += [f"**{reason}**", ""] + [f"- {t!r}" for t in shown] + [""]
    # No shards (documents_out == 0) means the filters removed everything: input without any
    # document is an error before this point, and deduplication always keeps one copy.
    lines += ["", f"Shards: {', '.join(r['shards']) or 'none (nothing survived the filters)'}"]
    return "\n".join(lines) + "\n"

