"""Exact and MinHash-LSH near-duplicate detection (babyllama.data.dedup).

Real Chinese text comes from ../shared/data/pretrain/zhwiki/paragraphs.jsonl when present;
otherwise the same tests run on synthetic Chinese-like text (random common characters with
Zipf frequencies and punctuation), so a user's checkout still tests everything.
"""

from __future__ import annotations

import json
import multiprocessing
import random
from functools import lru_cache

import numpy as np
import pytest

from babyllama.data.dedup import (_SHINGLE_CHUNK, DupResult, ExactDedup, MinHashConfig,
                                  NearDupIndex, _permutations, band_keys, estimated_jaccard,
                                  exact_key, minhash_signature, shingle_hashes)
from babyllama.errors import UserError
from conftest import SHARED_DATA

ZHWIKI = SHARED_DATA / "pretrain" / "zhwiki" / "paragraphs.jsonl"
PUNCTUATION_SWAPS = {"，": ",", "。": ".", "；": ";", "：": ":", "（": "(", "）": ")"}


@lru_cache(maxsize=1)
def paragraphs(count: int = 500) -> tuple[str, ...]:
    """`count` distinct paragraphs of 260+ characters: zhwiki's, else synthetic ones."""
    if ZHWIKI.exists():
        with open(ZHWIKI, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        return tuple(dict.fromkeys(texts))[:count]  # dict: drop exact repeats, keep order
    rng = np.random.default_rng(7)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    weights = 1.0 / np.arange(1, len(chars) + 1)
    weights /= weights.sum()
    out = []
    for _ in range(count):
        sentences = ["".join(rng.choice(chars, rng.integers(8, 30), p=weights)) +
                     str(rng.choice(["，", "。", "；"])) for _ in range(rng.integers(12, 30))]
        out.append("".join(sentences))
    return tuple(out)


def shingle_strings(text: str, ngram: int = 5) -> set[str]:
    compact = "".join(text.split())
    return {compact[i:i + ngram] for i in range(max(1, len(compact) - ngram + 1))}


def signature(text: str, cfg: MinHashConfig) -> np.ndarray:
    return minhash_signature(shingle_hashes(text, cfg.ngram), cfg)


def edited(text: str, rng: random.Random, alphabet: list[str]) -> str:
    """A near-duplicate: 2-5% of the characters changed, inserted, deleted or their
    punctuation swapped to ASCII; plus a few spaces and line breaks (which are free)."""
    chars = list(text)
    for _ in range(max(1, round(rng.uniform(0.02, 0.05) * len(chars)))):
        i, op = rng.randrange(len(chars)), rng.random()
        marks = [j for j, c in enumerate(chars) if c in PUNCTUATION_SWAPS]
        if op < 0.15 and marks:
            j = rng.choice(marks)
            chars[j] = PUNCTUATION_SWAPS[chars[j]]
        elif op < 0.55:
            chars[i] = rng.choice(alphabet)
        elif op < 0.8:
            chars.insert(i, rng.choice(alphabet))
        else:
            del chars[i]
    for _ in range(rng.randint(1, 4)):
        chars.insert(rng.randrange(len(chars)), rng.choice([" ", "\n", "  ", "\u3000"]))
    return "".join(chars)


# ----------------------------------------------------------------------------------------
# Shingles and signatures


def test_shingle_hashes_and_signatures_are_identical_in_a_spawned_process():
    cfg = MinHashConfig()
    texts = list(paragraphs()[:5]) + ["短", "", "今天 天气很好。"]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        theirs = pool.starmap(shingle_hashes, [(t, cfg.ngram) for t in texts])
        their_sigs = pool.starmap(minhash_signature, [(h, cfg) for h in theirs])
    for text, hashes, sig in zip(texts, theirs, their_sigs):
        assert hashes.dtype == np.uint32
        np.testing.assert_array_equal(hashes, shingle_hashes(text, cfg.ngram))
        np.testing.assert_array_equal(sig, signature(text, cfg))


def test_shingle_hashes_ignore_whitespace_and_are_a_set():
    a = "今天天气很好，我们去公园散步。今天天气很好。"
    b = "今天 天气\n很好，我们去\u3000公园散步。\t今天天气很好。 "
    hashes = shingle_hashes(a, 5)
    np.testing.assert_array_equal(hashes, shingle_hashes(b, 5))
    assert len(hashes) == len(shingle_strings(a)) < len(a) - 4  # the repeat counted once
    assert np.all(np.diff(hashes.astype(np.int64)) > 0)          # sorted and unique


def test_short_and_empty_texts():
    cfg = MinHashConfig()
    assert len(shingle_hashes("你好", 5)) == 1  # shorter than ngram: one shingle
    assert shingle_hashes("你好", 5)[0] != shingle_hashes("你好吗", 5)[0]
    assert len(shingle_hashes(" \n\u3000", 5)) == 0
    np.testing.assert_array_equal(signature("", cfg), np.full(cfg.num_perm, 2**32 - 1))


def test_long_documents_are_hashed_in_chunks_with_the_same_result():
    cfg = MinHashConfig()
    hashes = shingle_hashes("".join(paragraphs()[:40]), cfg.ngram)
    assert len(hashes) > 3 * _SHINGLE_CHUNK  # several chunks
    # Reference: every shingle under every hash function at once (what the chunks avoid).
    a, b = _permutations(cfg.num_perm, cfg.seed)
    full = (np.multiply.outer(hashes.astype(np.uint64), a) + b).min(axis=0) >> np.uint64(32)
    np.testing.assert_array_equal(minhash_signature(hashes, cfg), full.astype(np.uint32))


def jaccard_pairs(level: float, count: int) -> list[tuple[str, str]]:
    """Pairs sharing a common part X, each with its own tail Y / Z of the length that gives
    J = |X| / (|X| + |Y| + |Z|) ~= level."""
    pool = "".join(paragraphs())
    shared = 600
    tail = round(shared * (1 - level) / (2 * level))
    pairs, start = [], 0
    for _ in range(count):
        x, y, z = (pool[start:start + shared], pool[start + shared:start + shared + tail],
                   pool[start + shared + tail:start + shared + 2 * tail])
        pairs.append((x + y, x + z))
        start += shared + 2 * tail
    return pairs


@pytest.mark.parametrize("level", [0.2, 0.5, 0.8, 0.95])
def test_estimated_jaccard_tracks_true_jaccard_and_datasketch(level):
    datasketch = pytest.importorskip("datasketch")
    cfg = MinHashConfig()
    ours, truth, reference = [], [], []
    for a, b in jaccard_pairs(level, 4):
        sa, sb = shingle_strings(a), shingle_strings(b)
        truth.append(len(sa & sb) / len(sa | sb))
        ours.append(float(estimated_jaccard(signature(a, cfg), signature(b, cfg))))
        sketches = []
        for shingles in (sa, sb):
            m = datasketch.MinHash(num_perm=cfg.num_perm)
            m.update_batch([s.encode("utf-8") for s in shingles])
            sketches.append(m)
        reference.append(sketches[0].jaccard(sketches[1]))
    assert abs(np.mean(truth) - level) < 0.05  # the pairs are at the intended similarity
    # The std of one estimate is sqrt(J (1 - J) / 128) <= 0.044: each pair within 0.1 of the
    # truth; against datasketch (two independent estimates) the mean of 4 pairs within 0.1.
    assert max(abs(o - t) for o, t in zip(ours, truth)) <= 0.1, (ours, truth)
    assert abs(np.mean(ours) - np.mean(reference)) <= 0.1, (ours, reference)
    assert abs(np.mean(reference) - np.mean(truth)) <= 0.1


def test_band_keys_match_for_equal_bands_only_and_accept_batches():
    cfg = MinHashConfig()
    sig = signature(paragraphs()[0], cfg)
    other = sig.copy()
    other[cfg.rows:] += 1  # every band but the first differs
    keys, other_keys = band_keys(sig, cfg), band_keys(other, cfg)
    assert keys.dtype == np.uint64 and keys.shape == (cfg.bands,)
    assert keys[0] == other_keys[0] and np.all(keys[1:] != other_keys[1:])
    np.testing.assert_array_equal(band_keys(np.stack([sig, other]), cfg), [keys, other_keys])


# ----------------------------------------------------------------------------------------
# The index


def index_with(tmp_path, cfg: MinHashConfig, texts: list[str], **kw) -> NearDupIndex:
    index = NearDupIndex(tmp_path / "lsh", cfg, **kw)
    for doc_id, text in enumerate(texts):
        sig = signature(text, cfg)
        index.add(doc_id, sig, band_keys(sig, cfg))
    return index


def test_index_finds_planted_near_duplicates_and_keeps_the_earliest(tmp_path):
    originals = paragraphs()
    alphabet = sorted(set("".join(originals)))
    rng = random.Random(0)
    docs = [(i, text) for i, text in enumerate(originals)]  # (cluster, text)
    for i in rng.sample(range(len(originals)), len(originals) // 2):
        r = rng.random()
        if r > 0.8:
            docs.append((i, originals[i]))  # an exact copy as well
        docs += [(i, edited(originals[i], rng, alphabet)) for _ in range(1 if r < 0.6 else 2)]
    rng.shuffle(docs)  # copies may come before their original: the earliest must stay
    cluster = np.array([c for c, _ in docs])
    earliest = {c: i for i, c in reversed(list(enumerate(cluster)))}
    expected = {i for i, c in enumerate(cluster) if earliest[c] != i}

    cfg = MinHashConfig()
    result = index_with(tmp_path, cfg, [text for _, text in docs]).duplicates()
    assert isinstance(result, DupResult)
    drop = set(result.drop.tolist())
    found = len(drop & expected)
    assert found / len(expected) >= 0.95, f"recall {found}/{len(expected)}"
    assert found / len(drop) >= 0.99, f"precision {found}/{len(drop)}"
    assert not drop & set(earliest.values()), "a cluster lost its first document"
    assert result.verified_pairs <= result.candidate_pairs
    assert result.clusters <= len(originals) // 2 + 2
    for kept, dropped, est in result.examples:  # (two edited copies may sit below threshold)
        assert kept < dropped and cluster[kept] == cluster[dropped] and est > 0.3


def test_verification_discards_pairs_that_meet_in_one_band_only(tmp_path):
    cfg = MinHashConfig()
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, (3, cfg.num_perm), dtype=np.uint32)
    sigs[1, :cfg.rows] = sigs[0, :cfg.rows]  # shares band 0 with doc 0, nothing else
    index = NearDupIndex(tmp_path, cfg)
    index.add_many(0, sigs, band_keys(sigs, cfg))
    result = index.duplicates()
    assert (result.candidate_pairs, result.verified_pairs, len(result.drop)) == (1, 0, 0)
    unverified = index.duplicates(min_jaccard=0.0)  # 0 keeps every candidate
    assert unverified.drop.tolist() == [1] and unverified.examples == [(0, 1, 0.031)]


def test_many_copies_link_as_a_star_not_all_pairs(tmp_path):
    cfg = MinHashConfig(num_perm=16, bands=4)
    rng = np.random.default_rng(1)
    sigs = rng.integers(0, 2**32, (1000, cfg.num_perm), dtype=np.uint32)
    copies = np.sort(rng.choice(np.arange(10, 1000), 99, replace=False))
    sigs[copies] = sigs[5]  # 100 identical documents: 4950 pairs, but a star needs 99
    index = NearDupIndex(tmp_path, cfg)
    index.add_many(0, sigs, band_keys(sigs, cfg))
    result = index.duplicates()
    assert result.candidate_pairs == result.verified_pairs == 99
    assert result.clusters == 1
    np.testing.assert_array_equal(result.drop, copies)
    assert result.examples[0] == (5, int(copies[0]), 1.0)


def test_index_spills_to_disk_and_holds_a_bounded_buffer(tmp_path):
    cfg = MinHashConfig(num_perm=8, bands=4)
    index = NearDupIndex(tmp_path / "lsh", cfg, buffer_docs=1000)
    buffer_bytes = index.buffer_bytes
    rng = np.random.default_rng(2)
    sizes = []
    for first in range(0, 200_000, 5000):
        sigs = rng.integers(0, 2**32, (5000, cfg.num_perm), dtype=np.uint32)
        if first == 100_000:
            sigs[:100] = sigs[100]  # 100 copies of doc 100_100 planted before it
        index.add_many(first, sigs, band_keys(sigs, cfg))
        sizes.append([p.stat().st_size for p in index.files()])
    for i in range(10):  # one by one works the same
        sig = rng.integers(0, 2**32, cfg.num_perm, dtype=np.uint32)
        index.add(200_000 + i, sig, band_keys(sig, cfg))
    sizes = np.array(sizes)
    assert len(index.files()) == 1 + cfg.bands and all(p.exists() for p in index.files())
    assert np.all(np.diff(sizes, axis=0) > 0)  # every file grows with every block
    assert sizes[-1, 0] == 200_000 * cfg.num_perm * 4 and sizes[-1, 1] == 200_000 * 8
    assert index.buffer_bytes == buffer_bytes == 1000 * (8 * 4 + 4 * 8)  # unchanged, 64 KB
    assert len(index) == 200_010
    result = index.duplicates()
    np.testing.assert_array_equal(result.drop, np.arange(100_001, 100_101))
    assert (index.workdir / index.SIGNATURES).stat().st_size == 200_010 * cfg.num_perm * 4


def test_index_checks_ids_and_shapes(tmp_path):
    cfg = MinHashConfig()
    index = NearDupIndex(tmp_path, cfg)
    assert len(index.duplicates().drop) == 0  # empty is fine
    sig = signature("今天天气很好", cfg)
    with pytest.raises(ValueError, match="expected 0, got 1"):
        index.add(1, sig, band_keys(sig, cfg))
    with pytest.raises(ValueError, match="shapes"):
        index.add(0, sig[:64], band_keys(sig, cfg))
    with pytest.raises(ValueError, match="2 signatures but 1 rows"):
        index.add_many(0, np.stack([sig, sig]), band_keys(sig, cfg)[None])
    index.add(0, sig, band_keys(sig, cfg))
    assert len(index.duplicates().drop) == 0


def test_a_new_index_starts_empty_in_a_used_workdir(tmp_path):
    cfg = MinHashConfig()
    texts = ["今天天气很好，我们去公园散步。"] * 3
    index_with(tmp_path, cfg, texts).duplicates()
    result = index_with(tmp_path, cfg, texts[:1]).duplicates()
    assert len(result.drop) == 0 and (tmp_path / "lsh" / NearDupIndex.SIGNATURES).stat().st_size \
        == cfg.num_perm * 4


# ----------------------------------------------------------------------------------------
# Exact duplicates and the config


def test_exact_dedup_keeps_first_occurrences():
    texts = ["甲", "乙", "甲", "丙", "乙", "甲 ", "甲"]
    exact = ExactDedup()
    kept = [t for t in texts if not exact.seen(exact_key(t))]
    assert kept == ["甲", "乙", "丙", "甲 "]  # exact means exact: a trailing space differs
    assert len(exact) == 4 and len(exact_key("甲")) == 8


def test_minhash_config_check_rejects_impossible_settings():
    with pytest.raises(UserError, match="bands .10. must divide num_perm .128."):
        MinHashConfig(num_perm=128, bands=10)
    with pytest.raises(UserError, match="ngram"):
        MinHashConfig(ngram=0)
    assert MinHashConfig(num_perm=64, bands=8).check().rows == 8


def test_threshold_sits_on_the_s_curve():
    cfg = MinHashConfig()
    assert (cfg.rows, round(cfg.threshold, 2)) == (4, 0.42)
    assert 0.5 < cfg.candidate_probability(cfg.threshold) < 0.7
    assert cfg.candidate_probability(0.2) < 0.1 and cfg.candidate_probability(0.6) > 0.97
    assert round(MinHashConfig(bands=16).threshold, 2) == 0.71
