"""Exact and near-duplicate detection for corpus cleaning, with memory bounded by design.

Exact duplicates
----------------
`exact_key(text)` is an 8-byte BLAKE2b digest of the UTF-8 text (stdlib, deterministic in every
process, unlike Python's salted `hash()`). `ExactDedup.seen(key)` keeps the keys as Python ints
in a set: the first occurrence of a text is kept, later ones are reported as seen. Collisions:
with n documents, P(any two distinct texts share a 64-bit key) ~= n^2 / 2^65, about 7e-7 for
5 million documents; a collision would only drop one document, so 64 bits are plenty.

Near duplicates: MinHash
------------------------
A document is the *set* of its character n-grams ("shingles", n = `ngram`, 5 by default: about
two or three Chinese words), taken after removing all whitespace so that copies differing only
in spacing or line breaks have identical sets. Each shingle is hashed to 32 bits by a fixed
polynomial-style combination of its code points (sum of code point x per-position odd 64-bit
constant, then multiply-xorshift), computed for all shingles at once with numpy
(`shingle_hashes`).

The similarity of two documents is the Jaccard index of their shingle sets, J = |A & B| / |A | B|.
MinHash estimates it without comparing sets: for a random hash function h, P(min h(A) ==
min h(B)) = J. A signature is `num_perm` such minima under independent hash functions
(`minhash_signature`), and the fraction of equal positions in two signatures estimates J with
standard deviation sqrt(J (1 - J) / num_perm) (<= 0.044 for 128). The hash functions are the
multiply-add-shift family h(x) = ((a*x + b) mod 2^64) >> 32 with random 64-bit a, b, which is
strongly universal for 32-bit keys (Dietzfelbinger 1996), needs no modulo (numpy does it with
wrap-around uint64 arithmetic) and runs about twice as fast as (a*x + b) mod (2^61 - 1).

Edits cost shingles: with a fraction e of characters changed, a shingle survives with
probability (1 - e)^n, so J ~= s / (2 - s) with s = (1 - e)^n. For n = 5: e = 2% gives J ~= 0.82,
e = 5% gives J ~= 0.63, e = 10% gives J ~= 0.42.

Near duplicates: LSH banding
----------------------------
Comparing every pair of signatures is O(N^2). LSH cuts the signature into `bands` bands of
`rows = num_perm / bands` values and hashes each band to a 64-bit key (`band_keys`); two
documents become a *candidate pair* when they share the key of at least one band, which happens
with probability  P(J) = 1 - (1 - J^rows)^bands  (`MinHashConfig.candidate_probability`), an
S-curve rising around  threshold ~= (1 / bands)^(1 / rows).  With the default 32 bands x 4 rows
(threshold 0.42):

    J    0.2    0.3    0.42   0.5    0.6    0.7    0.8
    P    0.05   0.23   0.64   0.87   0.98   0.9997 1.0

so copies with up to ~5% of their characters edited (J >= 0.6) are found 98+% of the time.
The often-quoted 16 x 8 (threshold 0.71) gives P(0.63) ~= 0.33 and misses most such copies:
it suits near-exact copies only.

Candidates are then *verified*: a pair is kept only when its estimated Jaccard (the fraction of
equal signature values) is at least `min_jaccard` (default: `cfg.threshold`), which removes the
LSH false positives, i.e. pairs that met in one band by luck. Clusters are the connected
components of the verified pairs (union-find); every cluster keeps its smallest doc id (the
first document added) and drops the others. Note that components are transitive: A~B and B~C
put A and C in one cluster even if A and C alone are below the threshold.

Why disk-backed, and star linking
---------------------------------
datasketch's `MinHashLSH` keeps dicts of band buckets in memory: `bands` Python objects per
document, measured at 12 KB per document for 32 x 4 (6.5 KB for 16 x 8), i.e. 36 GB for
3 million documents, far beyond the pipeline's budget (well under 2 GB peak RSS for 1 GB of
input); that is why it is not used here (the tests use its `MinHash` as a reference only).
`NearDupIndex` instead appends
signatures (`num_perm` x uint32 per document) and band keys (one uint64 file per band) to files
under its `workdir`, with at most `buffer_docs` documents in memory. `duplicates()` loads one
band at a time (N x 8 bytes), sorts it (np.argsort, N x 8 more) and reads runs of equal keys.
A bucket of k copies of one text would give k (k - 1) / 2 pairs; instead each member is linked
to the bucket's first (smallest) doc id, a star of k - 1 pairs that connects the same cluster,
so the pair list stays O(duplicates), not O(cluster^2). Verification reads the two signatures of
each pair with positioned reads (`os.preadv`), not a memory map: randomly touching a mapped
file maps whole page-cache folios into the process (measured: 4096 random 512-byte rows of a
512 MB file put 500 MB in RSS), which would count against the pipeline's peak RSS.

Memory of `duplicates()`: at most 24 x N bytes for the band being sorted (its keys, the
argsort order, the sorted keys; one band at a time), plus a few tens of bytes per unique
candidate pair while they are verified and linked; verification reads rows in chunks of 4096
pairs (4 MB). Measured with tracemalloc on 1M documents: 25-27 bytes per document in all.
Files under `workdir`
(N x (4 x num_perm + 8 x bands) bytes, 768 bytes per document by default) belong to the
caller, who deletes them.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from hashlib import blake2b
from pathlib import Path

import numpy as np

from babyllama.errors import UserError

_MIX = np.uint64(0x94D049BB133111EB)  # an odd 64-bit multiplier from splitmix64's finalizer
_MAX32 = np.uint32(0xFFFFFFFF)
# Shingles per step of `minhash_signature`: its scratch array is (chunk x num_perm) uint64, 1 MB
# for 128 perms, whatever the document's length (a 200k-character one included). With the
# scratch array reused, chunks of 1024-8192 measured the same (~250 ns per shingle).
_SHINGLE_CHUNK = 1024


# ----------------------------------------------------------------------------------------
# Exact duplicates


def exact_key(text: str) -> bytes:
    """8-byte digest of the text (BLAKE2b; see the module docstring for the collision odds)."""
    return blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


class ExactDedup:
    """Remembers exact keys; `seen(key)` is True for every occurrence after the first.

    Memory: a 64-bit Python int (48 bytes) plus its set slot (16 bytes at a load factor of
    1/4 to 3/5), measured 81 bytes per distinct document at 1 million: ~250 MB for 3 million.
    Keys are hashed texts, so the caller decides what counts as equal (e.g. normalize first).
    """

    def __init__(self) -> None:
        self._keys: set[int] = set()

    def seen(self, key: bytes) -> bool:
        value = int.from_bytes(key, "little")
        if value in self._keys:
            return True
        self._keys.add(value)
        return False

    def __len__(self) -> int:
        return len(self._keys)


# ----------------------------------------------------------------------------------------
# MinHash


@dataclass(frozen=True)
class MinHashConfig:
    """MinHash-LSH settings. Frozen (hashable, picklable): it travels to worker processes.

    num_perm  signature length (hash functions); the estimate's std is sqrt(J(1-J)/num_perm)
    bands     LSH bands; rows = num_perm // bands values each; threshold ~= (1/bands)^(1/rows)
    ngram     characters per shingle (whitespace removed first)
    seed      seeds the hash functions: signatures are comparable only under the same seed
    """

    num_perm: int = 128
    bands: int = 32
    ngram: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        self.check()

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands

    @property
    def threshold(self) -> float:
        """Where the S-curve rises: a pair at this Jaccard becomes a candidate with probability
        1 - (1 - 1/bands)^bands ~= 0.64; `duplicates()` also verifies pairs against it."""
        return (1.0 / self.bands) ** (1.0 / self.rows)

    def candidate_probability(self, jaccard: float) -> float:
        """P(a pair with this Jaccard shares at least one band) = 1 - (1 - J^rows)^bands."""
        return 1.0 - (1.0 - jaccard ** self.rows) ** self.bands

    def check(self) -> MinHashConfig:
        for name in ("num_perm", "bands", "ngram"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"minhash {name} must be a positive integer, got {value!r}")
        if self.num_perm % self.bands:
            raise UserError(f"minhash bands ({self.bands}) must divide num_perm "
                            f"({self.num_perm}) so that every band has the same rows")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"minhash seed must be a non-negative integer, got {self.seed!r}")
        return self


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Sorted unique uint32 hashes of the character n-grams of `text` without whitespace.

    A text shorter than `ngram` (after removing whitespace) is one shingle; an empty one has
    none. The hash depends only on the code points, so it is the same in every process.
    """
    compact = "".join(text.split())  # str.split() drops every Unicode space, U+3000 included
    if not compact:
        return np.empty(0, np.uint32)
    points = np.frombuffer(compact.encode("utf-32-le", "surrogatepass"), np.uint32)
    points = points.astype(np.uint64)
    width = min(ngram, len(points))
    count = len(points) - width + 1
    # Polynomial-style combination: sum of code point x per-position odd constant (mod 2^64),
    # one vector op per position, never one per shingle; then a multiply-xorshift so that the
    # top 32 bits depend on every input bit. The width picks the constants, so a short text's
    # single shingle is hashed apart from n-grams.
    weights = _position_weights(width)
    h = points[:count] * weights[0]
    step = np.empty_like(h)
    for i in range(1, width):
        np.multiply(points[i:i + count], weights[i], out=step)
        h += step
    h ^= h >> np.uint64(29)
    h *= _MIX
    return _sorted_unique((h >> np.uint64(32)).astype(np.uint32))


@lru_cache(maxsize=32)
def _position_weights(width: int) -> np.ndarray:
    """Odd 64-bit constants for the `width` positions of a shingle (fixed: seed = width)."""
    rng = np.random.default_rng([0x5EED, width])
    return rng.integers(0, 2**64, width, dtype=np.uint64) | np.uint64(1)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique for 1-D arrays without its overhead (a few us per call for short docs)."""
    values = np.sort(values)
    if len(values) < 2:
        return values
    keep = np.empty(len(values), bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed (a, b) of each hash function, the same in every process for one seed."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False)
    b = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False)
    return a, b


def minhash_signature(hashes: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """(num_perm,) uint32: the minimum of each hash function over the shingle hashes.

    An empty `hashes` gives all 0xFFFFFFFF (every empty text then looks identical).
    """
    if len(hashes) == 0:
        return np.full(cfg.num_perm, _MAX32, np.uint32)
    a, b = _permutations(cfg.num_perm, cfg.seed)
    work = _work_buffer(cfg.num_perm)
    low = np.full(cfg.num_perm, np.iinfo(np.uint64).max, np.uint64)
    for start in range(0, len(hashes), _SHINGLE_CHUNK):
        x = hashes[start:start + _SHINGLE_CHUNK].astype(np.uint64)
        values = work[:len(x)]
        np.multiply(x[:, None], a, out=values)  # (chunk, num_perm) a*x + b, wrapping mod 2^64
        values += b
        np.minimum(low, values.min(axis=0), out=low)
    # The hash is the top 32 bits; the smallest 64-bit value has the smallest top bits.
    return (low >> np.uint64(32)).astype(np.uint32)


_local = threading.local()


def _work_buffer(num_perm: int) -> np.ndarray:
    """A reused (chunk, num_perm) uint64 scratch array, one per thread. Allocating 1 MB per
    call made glibc return the pages and fault them in again: 2.7x slower on 5k-char docs."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape != (_SHINGLE_CHUNK, num_perm):
        buf = _local.buf = np.empty((_SHINGLE_CHUNK, num_perm), np.uint64)
    return buf


def band_keys(signature: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """(bands,) uint64: a hash of each band's `rows` values. Also takes (k, num_perm) batches."""
    sig = np.asarray(signature, np.uint32)
    if sig.shape[-1] != cfg.num_perm:
        raise ValueError(f"signature has {sig.shape[-1]} values, the config says {cfg.num_perm}")
    rows = sig.reshape(*sig.shape[:-1], cfg.bands, cfg.rows).astype(np.uint64)
    # Only equality of keys matters (they are sorted, never used as hash-table slots), so a
    # random linear combination mod 2^64 is enough: two different bands get the same key with
    # probability ~2^-64, and such a pair would be a candidate that verification discards.
    return (rows * _position_weights(cfg.rows)).sum(axis=-1, dtype=np.uint64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray | float:
    """Fraction of equal signature values (last axis): the MinHash estimate of Jaccard."""
    equal = np.asarray(sig_a) == np.asarray(sig_b)
    return equal.mean(axis=-1)


# ----------------------------------------------------------------------------------------
# The disk-backed LSH index


@dataclass
class DupResult:
    """What `NearDupIndex.duplicates` found.

    drop             sorted doc ids to remove: every cluster member but its smallest id
    clusters         connected components of verified pairs (each keeps one document)
    candidate_pairs  unique star pairs that shared a band key
    verified_pairs   candidate pairs whose estimated Jaccard reached min_jaccard
    examples         up to 10 (kept_id, dropped_id, estimated Jaccard of those two)
    """

    drop: np.ndarray
    clusters: int
    candidate_pairs: int
    verified_pairs: int
    examples: list[tuple[int, int, float]] = field(default_factory=list)


class NearDupIndex:
    """MinHash-LSH index whose signatures and band keys live in files under `workdir`.

    Doc ids must be 0, 1, 2, ... in the order of `add` (the pipeline's output order), so the
    signature of doc i is row i of `signatures.u32` and keeping the smallest id keeps the first
    occurrence. The index starts empty: it truncates its own files in `workdir` (it writes no
    others). Memory: `buffer_docs` documents (768 bytes each by default) until `duplicates`,
    which is described in the module docstring.
    """

    SIGNATURES = "signatures.u32"

    def __init__(self, workdir: Path | str, cfg: MinHashConfig, buffer_docs: int = 16384):
        self.cfg = cfg.check()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if buffer_docs < 1:
            raise ValueError(f"buffer_docs must be positive, got {buffer_docs}")
        self._sig_buf = np.empty((buffer_docs, cfg.num_perm), np.uint32)
        self._band_buf = np.empty((cfg.bands, buffer_docs), np.uint64)  # band-major: one file each
        self._buffered = 0
        self._written = 0
        for path in self.files():
            path.write_bytes(b"")

    def files(self) -> list[Path]:
        """Every file the index writes (the signatures, then one band-key file per band)."""
        bands = [self._band_path(b) for b in range(self.cfg.bands)]
        return [self.workdir / self.SIGNATURES, *bands]

    def _band_path(self, band: int) -> Path:
        return self.workdir / f"band-{band:03d}.u64"

    def __len__(self) -> int:
        return self._written + self._buffered

    @property
    def buffer_bytes(self) -> int:
        """RAM held between calls: the fixed-size buffers of documents not yet on disk."""
        return self._sig_buf.nbytes + self._band_buf.nbytes

    def add(self, doc_id: int, signature: np.ndarray, bands: np.ndarray) -> None:
        """Record one document; `doc_id` must be the number of documents added before."""
        if doc_id != len(self):
            raise ValueError(f"doc ids must be added in order 0, 1, 2, ...: expected "
                             f"{len(self)}, got {doc_id}")
        self._check_shapes(np.shape(signature), np.shape(bands))
        self._sig_buf[self._buffered] = signature
        self._band_buf[:, self._buffered] = bands
        self._buffered += 1
        if self._buffered == len(self._sig_buf):
            self.flush()

    def add_many(self, first_id: int, signatures: np.ndarray, bands: np.ndarray) -> None:
        """Record k documents first_id .. first_id + k - 1: (k, num_perm) and (k, bands) arrays."""
        if first_id != len(self):
            raise ValueError(f"doc ids must be added in order: expected {len(self)}, "
                             f"got {first_id}")
        signatures, bands = np.asarray(signatures), np.asarray(bands)
        self._check_shapes(signatures.shape[1:], bands.shape[1:])
        if len(signatures) != len(bands):
            raise ValueError(f"{len(signatures)} signatures but {len(bands)} rows of band keys")
        done = 0
        while done < len(signatures):
            take = min(len(signatures) - done, len(self._sig_buf) - self._buffered)
            end = self._buffered + take
            self._sig_buf[self._buffered:end] = signatures[done:done + take]
            self._band_buf[:, self._buffered:end] = bands[done:done + take].T
            self._buffered, done = end, done + take
            if self._buffered == len(self._sig_buf):
                self.flush()

    def _check_shapes(self, sig_shape: tuple, band_shape: tuple) -> None:
        if sig_shape != (self.cfg.num_perm,) or band_shape != (self.cfg.bands,):
            raise ValueError(f"expected signatures of {self.cfg.num_perm} values and "
                             f"{self.cfg.bands} band keys, got shapes {sig_shape} and {band_shape}")

    def flush(self) -> None:
        """Append the buffered documents to the files (called when the buffer is full)."""
        n = self._buffered
        if n == 0:
            return
        with open(self.workdir / self.SIGNATURES, "ab") as f:
            self._sig_buf[:n].tofile(f)
        for band in range(self.cfg.bands):
            with open(self._band_path(band), "ab") as f:
                self._band_buf[band, :n].tofile(f)
        self._written += n
        self._buffered = 0

    def duplicates(self, min_jaccard: float | None = None) -> DupResult:
        """Clusters of near-duplicates among everything added so far.

        min_jaccard: keep a candidate pair only when its estimated Jaccard is at least this
        (default `cfg.threshold`, the LSH threshold itself; 0 keeps every candidate).
        """
        self.flush()
        cut = self.cfg.threshold if min_jaccard is None else float(min_jaccard)
        pairs = np.empty(0, np.uint64)
        for band in range(self.cfg.bands):
            # The keys are passed without a name here, so _star_pairs can free them early;
            # union1d keeps the pair list unique as it grows: similar docs meet in many bands.
            pairs = np.union1d(pairs, _star_pairs(np.fromfile(self._band_path(band), np.uint64)))
        heads = (pairs >> np.uint64(32)).astype(np.int64)
        members = (pairs & _MAX32).astype(np.int64)
        del pairs
        keep = self._estimated_jaccard(heads, members) >= cut
        drop, kept_of = _components(heads[keep], members[keep])
        return DupResult(drop=drop, clusters=len(np.unique(kept_of)), candidate_pairs=len(heads),
                         verified_pairs=int(keep.sum()), examples=self._examples(drop, kept_of))

    def _examples(self, drop: np.ndarray, kept_of: np.ndarray) -> list[tuple[int, int, float]]:
        kept, dropped = kept_of[:10], drop[:10]
        est = self._estimated_jaccard(kept, dropped)
        return [(int(k), int(d), round(float(j), 3)) for k, d, j in zip(kept, dropped, est)]

    def _estimated_jaccard(self, a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Estimated Jaccard of the signature pairs (a[i], b[i]), reading rows from disk."""
        out = np.empty(len(a), np.float32)
        fd = os.open(self.workdir / self.SIGNATURES, os.O_RDONLY)
        try:
            for start in range(0, len(a), chunk):
                pair_ids = np.concatenate([a[start:start + chunk], b[start:start + chunk]])
                ids, where = np.unique(pair_ids, return_inverse=True)  # each row read once
                rows = _read_rows(fd, ids, self.cfg.num_perm)
                n = len(where) // 2
                out[start:start + n] = estimated_jaccard(rows[where[:n]], rows[where[n:]])
        finally:
            os.close(fd)
        return out


def _read_rows(fd: int, ids: np.ndarray, width: int) -> np.ndarray:
    """Rows `ids` of a (N, width) uint32 file, by positioned reads (no memory map, see above)."""
    size = 4 * width
    buf = bytearray(size * len(ids))
    view = memoryview(buf)
    for i, row in enumerate(ids.tolist()):
        if os.preadv(fd, [view[i * size:(i + 1) * size]], row * size) != size:
            raise OSError(f"signature file is shorter than doc id {row} needs")
    return np.frombuffer(buf, np.uint32).reshape(len(ids), width)


def _star_pairs(keys: np.ndarray) -> np.ndarray:
    """Pairs (first doc id of a bucket, other member) packed as uint64 head << 32 | member.

    The stable sort keeps doc ids ascending inside each run of equal keys, so a bucket's
    first entry is its smallest id.
    """
    if len(keys) >= 2**32:
        raise ValueError("more than 2^32 documents do not fit the packed pair format")
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    same = keys[1:] == keys[:-1]
    del keys
    repeats = np.flatnonzero(same) + 1            # sorted positions equal to their predecessor
    if len(repeats) == 0:
        return np.empty(0, np.uint64)
    starts = np.flatnonzero(~same) + 1            # sorted positions that open a new run
    starts = np.concatenate([[0], starts])
    heads = order[starts[np.searchsorted(starts, repeats, side="right") - 1]]
    return (heads.astype(np.uint64) << np.uint64(32)) | order[repeats].astype(np.uint64)


def _components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over edges (a[i], b[i]) with numpy: (non-root doc ids, their root doc ids).

    Hook-and-compress: every root takes the smallest root across its edges (np.minimum.at),
    then pointer jumping flattens the trees; repeat until every edge lies inside one tree.
    Parents only decrease, so a component's root is its smallest doc id.
    """
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    u, v = inverse[:len(a)], inverse[len(a):]
    parent = np.arange(len(nodes))
    while True:
        pu, pv = parent[u], parent[v]
        if np.array_equal(pu, pv):
            break
        low = np.minimum(pu, pv)
        np.minimum.at(parent, pu, low)
        np.minimum.at(parent, pv, low)
        while not np.array_equal(grand := parent[parent], parent):
            parent = grand
    dropped = parent != np.arange(len(nodes))
    return nodes[dropped], nodes[parent[dropped]]
