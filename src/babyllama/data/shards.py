"""Pre-tokenize a corpus once into flat token shards; read them back through memory maps.

Layout of a prepared dataset directory:

    meta.json                 dtype, vocab size, special ids, tokenizer fingerprint, sources,
                              shards per split with token/document counts, bad-record summary
    tokenizer/                the tokenizer the tokens were made with
    train_00000.bin           flat tokens, raw little-endian uint16 (vocab <= 65535) or uint32
    train_00000.idx.npy       int64 start offset of each document inside that shard
    val_00000.bin, ...

Every document is stored as `[bos] + ids + [eos]`. Documents never straddle shards, but the
shards of a split read as one long token stream (`TokenShards.windows` crosses boundaries).

`prepare` streams: documents are read, tokenized in worker processes and appended to the open
shard in bounded batches, so corpora larger than memory work. It writes into a temporary
sibling directory and renames it into place at the end, so an interrupted or failed run never
leaves a half-valid dataset behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from array import array
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from babyllama.atomic import check_output_dir, replace_dir
from babyllama.batching import batched_by_size
from babyllama.data.readers import BadRecords, as_source_list, iter_sources, require_documents
from babyllama.errors import UserError
from babyllama.textfile import read_json_object
from babyllama.tokenizer import Tokenizer

META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 50_000_000
# Tokens buffered in memory before they are appended to the open shard file.
BUFFER_TOKENS = 1 << 20
# A batch sent to a worker: large enough to amortize inter-process overhead, small enough that
# the few batches in flight stay a few MB.
BATCH_DOCS = 512
BATCH_CHARS = 1 << 20
# What a prepared dataset directory holds; an -o directory holding anything else is refused.
DATASET_NAMES = re.compile(r"meta\.json|tokenizer|(?:train|val)_\d{5}\.(?:bin|idx\.npy)")


# ---------------------------------------------------------------------------------------------
# Writing


def prepare(sources, tokenizer, out_dir, *, val_fraction: float = 0.01, workers: int | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, text_field: str = "text",
            skip_bad: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Tokenize `sources` into shards under `out_dir`; return the written meta (also meta.json).

    `tokenizer` is a `babyllama.tokenizer.Tokenizer` or a path `Tokenizer.load` accepts.
    A document goes to the validation split when a hash of (seed, document index) falls below
    `val_fraction`, so the split does not depend on the number of workers. An earlier dataset
    in `out_dir` is replaced only once the new one is complete.

    Raises UserError, before anything is read or written, for bad settings and for an
    `out_dir` that holds anything but a prepared dataset (see `atomic.check_output_dir`); then for
    bad input (see `iter_documents`) and an empty corpus.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens must be positive, got {shard_tokens}")
    sources = as_source_list(sources)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, META_FILE, DATASET_NAMES)
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        meta = _prepare_into(tmp_dir, sources, tokenizer, val_fraction=val_fraction,
                             workers=workers, shard_tokens=shard_tokens, text_field=text_field,
                             skip_bad=skip_bad, seed=seed, progress=progress)
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return meta


def _prepare_into(tmp_dir: Path, sources: list, tokenizer, *, val_fraction, workers, shard_tokens,
                  text_field, skip_bad, seed, progress) -> dict:
    tok = _as_tokenizer(tokenizer)
    # Workers load the tokenizer from this saved copy; it also documents the dataset.
    tok_dir = tmp_dir / TOKENIZER_DIR
    tok.save(tok_dir)
    dtype = np.dtype("<u2") if tok.vocab_size <= 65535 else np.dtype("<u4")
    bos, eos = tok.bos_id, tok.eos_id

    bad = BadRecords()
    documents = require_documents(
        iter_sources(sources, text_field=text_field, skip_bad=skip_bad, bad=bad), sources, bad)
    writers = {split: TokenShardWriter(tmp_dir, split, dtype, shard_tokens) for split in SPLITS}
    holdback = _ValHoldback(val_fraction)
    started = time.perf_counter()
    n_docs = n_tokens = 0
    with _progress_bar(progress) as bar:
        for ids in _tokenize(documents, tok, tok_dir, workers):
            tokens = np.empty(len(ids) + 2, dtype=dtype)
            tokens[0], tokens[1:-1], tokens[-1] = bos, ids, eos
            for split, doc in holdback.route(val_score(seed, n_docs), tokens):
                writers[split].add(doc)
            n_docs += 1
            n_tokens += len(tokens)
            bar.update(1)
            if n_docs % 256 == 0:
                bar.set_postfix_str(f"{n_tokens / 1e6:.2f}M tokens", refresh=False)
        for split, doc in holdback.finish(n_docs):
            writers[split].add(doc)
        bar.set_postfix_str(f"{n_tokens / 1e6:.2f}M tokens")

    meta = {
        "format": "babyllama-token-shards",
        "version": 1,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "bos_id": bos,
        "eos_id": eos,
        "pad_id": tok.pad_id,
        "tokenizer_dir": TOKENIZER_DIR,
        "tokenizer_sha256": tokenizer_fingerprint(tok_dir),
        "sources": [str(s) for s in sources],
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "splits": {split: w.close() for split, w in writers.items()},
        "n_documents": n_docs,
        "n_tokens": n_tokens,
        "bad_records": {**bad.to_dict(), "summary": bad.summary()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    (tmp_dir / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n",
                                     encoding="utf-8")
    return meta


def _as_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        return Tokenizer.load(tokenizer)
    return tokenizer


def tokenizer_fingerprint(directory: Path) -> str:
    """sha256 of the tokenizer model file (tokenizer.json or tokenizer.model) in a saved dir."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (directory / name).is_file():
            return hashlib.sha256((directory / name).read_bytes()).hexdigest()
    # Unknown layout: hash every file, in name order, so the fingerprint is still stable.
    h = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(file.name.encode())
        h.update(file.read_bytes())
    return h.hexdigest()


def val_score(seed: int, index: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, document index): the split decision."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def split_documents(sources, *, val_fraction: float, seed: int = 0, text_field: str = "text",
                    skip_bad: bool = False) -> Iterator[tuple[str, str]]:
    """("train" | "val", document text) for each document of `sources`, split exactly as
    `prepare` splits them with the same `val_fraction` and `seed`: a tokenizer trained on the
    "train" documents never saw the validation text, and a model of another tokenizer (a
    character-level baseline) is scored on the same validation documents."""
    holdback = _ValHoldback(val_fraction)
    n_docs = 0
    for text in iter_sources(sources, text_field=text_field, skip_bad=skip_bad):
        yield from holdback.route(val_score(seed, n_docs), text)
        n_docs += 1
    yield from holdback.finish(n_docs)


class _ValHoldback:
    """Routes documents to train/val, guaranteeing a val document when there are >= 2 documents.

    The stream's length is unknown until it ends, so while no document has gone to val yet, the
    train document with the lowest score is held back (one document in memory). If the stream
    ends with val still empty, that document becomes the val document; as soon as a document
    goes to val on its own the held one is released to train. The choice depends only on the
    scores, so it is as deterministic as the split itself.
    """

    def __init__(self, val_fraction: float) -> None:
        self.val_fraction = val_fraction
        self.have_val = val_fraction == 0.0  # no val wanted: nothing to guarantee
        self.held: tuple[float, np.ndarray] | None = None

    def route(self, score: float, tokens: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        if score < self.val_fraction:
            self.have_val = True
            yield "val", tokens
            yield from self._release()
        elif self.have_val:
            yield "train", tokens
        elif self.held is None or score < self.held[0]:
            yield from self._release()
            self.held = (score, tokens)
        else:
            yield "train", tokens

    def finish(self, n_documents: int) -> Iterator[tuple[str, np.ndarray]]:
        if self.held is not None and not self.have_val and n_documents >= 2:
            yield "val", self.held[1]
            self.held = None
        yield from self._release()

    def _release(self) -> Iterator[tuple[str, np.ndarray]]:
        if self.held is not None:
            yield "train", self.held[1]
            self.held = None


class TokenShardWriter:
    """Appends documents to `<split>_NNNNN.bin` files, starting a new shard at shard_tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._offsets = array("q")  # document starts in the open shard
        self._shard_len = 0

    def add(self, tokens: np.ndarray) -> None:
        if self._file is None:
            self._open()
        self._offsets.append(self._shard_len)
        self._buffer.append(tokens)
        self._buffered += len(tokens)
        self._shard_len += len(tokens)
        if self._buffered >= BUFFER_TOKENS:
            self._flush()
        # Documents stay whole, so a shard may exceed shard_tokens by at most one document.
        if self._shard_len >= self.shard_tokens:
            self._close_shard()

    def close(self) -> dict:
        if self._file is not None:
            self._close_shard()
        return {
            "n_tokens": sum(s["n_tokens"] for s in self.shards),
            "n_documents": sum(s["n_documents"] for s in self.shards),
            "shards": self.shards,
        }

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):05d}"

    def _open(self) -> None:
        self._file = open(self.directory / f"{self._name()}.bin", "wb")

    def _flush(self) -> None:
        if self._buffer:
            np.concatenate(self._buffer).astype(self.dtype, copy=False).tofile(self._file)
            self._buffer, self._buffered = [], 0

    def _close_shard(self) -> None:
        self._flush()
        self._file.close()
        self._file = None
        name = self._name()
        np.save(self.directory / f"{name}.idx.npy", np.frombuffer(self._offsets, dtype=np.int64))
        self.shards.append({"bin": f"{name}.bin", "idx": f"{name}.idx.npy",
                            "n_tokens": self._shard_len, "n_documents": len(self._offsets)})
        self._offsets = array("q")
        self._shard_len = 0


def _progress_bar(enabled: bool):
    """Documents/s from tqdm's rate, tokens so far in the postfix; a no-op when disabled."""
    from tqdm import tqdm
    return tqdm(desc="tokenizing", unit=" docs", smoothing=0.05, dynamic_ncols=True,
                disable=not enabled)


# ---------------------------------------------------------------------------------------------
# Tokenizing in worker processes

_worker_tokenizer = None


def _worker_init(tokenizer_class, tokenizer_dir: str) -> None:
    # Each process already is one unit of parallelism; HF tokenizers' own thread pool on top
    # would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_class.load(tokenizer_dir)


def _worker_encode(texts: list[str]) -> list[list[int]]:
    return _worker_tokenizer.encode_batch(texts)


def _tokenize(documents: Iterable[str], tok, tok_dir: Path,
              workers: int | None) -> Iterator[list[int]]:
    """Token ids of each document, in document order."""
    if workers is None:
        # The main process reads, splits and writes, so it keeps one core; on a 2-core machine
        # this means in-process encoding (whose HF backend is multithreaded anyway), which
        # measured faster there than 2 workers (7.3 s vs 12.5 s for the built-in corpora).
        workers = min(8, (os.cpu_count() or 1) - 1)
    if workers <= 1:
        for batch in batched_by_size(documents, BATCH_DOCS, BATCH_CHARS):
            yield from tok.encode_batch(batch)
        return
    import multiprocessing as mp
    # 'spawn' behaves the same on Linux, macOS and Windows and avoids forking a process whose
    # tokenizer thread pool may already be running.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(type(tok), str(tok_dir))) as pool:
        # Pool.imap would feed the whole input into its task queue as fast as it can be read,
        # i.e. the whole corpus into memory; a bounded window of pending batches keeps memory
        # flat while still returning results in submission order.
        pending: deque = deque()
        for batch in batched_by_size(documents, BATCH_DOCS, BATCH_CHARS):
            pending.append(pool.apply_async(_worker_encode, (batch,)))
            if len(pending) >= 2 * workers + 1:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ---------------------------------------------------------------------------------------------
# Reading


class TokenShards:
    """One split of a prepared dataset, memory-mapped: tokens are read only when indexed."""

    def __init__(self, directory, split: str = "train") -> None:
        self.directory = Path(directory)
        self.split = split
        self.meta = _read_meta(self.directory)
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise UserError(f"{self.directory / META_FILE}: no split '{split}' "
                            f"(splits: {', '.join(splits) or 'none'})")
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self._maps: list[np.ndarray] = []
        self._doc_starts: list[np.ndarray] = []
        for shard in splits[split]["shards"]:
            self._maps.append(self._open_shard(shard))
            self._doc_starts.append(np.load(self.directory / shard["idx"], mmap_mode="r"))
        lengths = [len(m) for m in self._maps]
        # _token_ends[k] = global offset just past shard k; same for documents.
        self._token_ends = np.cumsum(lengths, dtype=np.int64)
        self._doc_ends = np.cumsum([len(d) for d in self._doc_starts], dtype=np.int64)
        self.n_tokens = int(self._token_ends[-1]) if lengths else 0
        self.n_documents = int(self._doc_ends[-1]) if lengths else 0

    def _open_shard(self, shard: dict) -> np.ndarray:
        path = self.directory / shard["bin"]
        if not path.is_file():
            raise UserError(f"{path}: shard listed in {META_FILE} is missing; prepare the data again")
        size = path.stat().st_size
        if size != shard["n_tokens"] * self.dtype.itemsize:
            raise UserError(f"{path}: {size} bytes, expected {shard['n_tokens']} tokens of "
                            f"{self.dtype.name}; the dataset is damaged, prepare it again")
        if size == 0:  # np.memmap cannot map an empty file
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return self.n_tokens

    def _require(self, length: int) -> None:
        if self.n_tokens < length:
            raise UserError(f"{self.directory}: the {self.split} split has {self.n_tokens} tokens, "
                            f"fewer than a window of {length}; use a smaller seq_len or prepare "
                            f"more data")

    def windows(self, starts, length: int) -> np.ndarray:
        """Rows of `length` consecutive tokens from global offsets `starts` -> int64 (n, length)."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        self._require(length)
        if len(starts) and (starts.min() < 0 or starts.max() > self.n_tokens - length):
            raise IndexError(f"window starts must lie in [0, {self.n_tokens - length}]")
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(starts):
            out[row] = self._read(int(start), length)
        return out

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split, gathering across shard boundaries."""
        shard = int(np.searchsorted(self._token_ends, start, side="right"))
        shard_start = int(self._token_ends[shard - 1]) if shard else 0
        local = start - shard_start
        piece = self._maps[shard][local:local + length]
        if len(piece) == length:  # the common case: one slice of one memory map
            return piece
        pieces, have = [piece], len(piece)
        while have < length:
            shard += 1
            piece = self._maps[shard][:length - have]
            pieces.append(piece)
            have += len(piece)
        return np.concatenate(pieces)

    def random_starts(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        """`n` window starts drawn uniformly from [0, n_tokens - length]."""
        self._require(length)
        return rng.integers(0, self.n_tokens - length + 1, size=n, dtype=np.int64)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i of the split (with its bos and eos)."""
        if not 0 <= i < self.n_documents:
            raise IndexError(f"document {i} out of range [0, {self.n_documents})")
        shard = int(np.searchsorted(self._doc_ends, i, side="right"))
        local = i - (int(self._doc_ends[shard - 1]) if shard else 0)
        starts = self._doc_starts[shard]
        begin = int(starts[local])
        end = int(starts[local + 1]) if local + 1 < len(starts) else len(self._maps[shard])
        return np.asarray(self._maps[shard][begin:end])


def _read_meta(directory: Path) -> dict:
    meta_path = directory / META_FILE
    if directory.is_file():
        raise UserError(f"{directory}: a file, not a dataset; run `babyllama prepare` on it first")
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory (expected a dataset made by prepare)")
    if not meta_path.is_file():
        raise UserError(f"{directory}: not a prepared dataset: {META_FILE} is missing "
                        f"(run the prepare step on your corpus first)")
    meta = read_json_object(meta_path)
    for key in ("dtype", "vocab_size", "splits"):
        if key not in meta:
            raise UserError(f"{meta_path}:1: missing key '{key}'; prepare the data again")
    return meta
