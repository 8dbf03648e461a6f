"""Trim a SentencePiece tokenizer to the pieces a corpus needs.

Why: a small model pays `vocab_size * hidden_size` parameters for the embedding (twice with an
untied head). ChatGLM2's 64,789 pieces at hidden size 256 are ~33M parameters, most of a 43M
model, yet a Chinese corpus uses far fewer of them. Seed 2 trimmed ChatGLM's tokenizer to
35,023 Chinese-heavy pieces; `trim_sentencepiece` does the same with a guarantee: **every
text of the corpus encodes to exactly the same pieces as before**, only renumbered.

What is kept (each kept piece is counted once, under the first reason in `REASONS`):

- special: byte-fallback pieces <0x00>..<0xFF> (so any text still encodes), the unknown,
  control, user-defined and unused pieces, and for unigram models the lowest- and
  highest-scoring normal pieces (SentencePiece derives the unknown-piece penalty from the
  minimum score and user-defined piece scores from the maximum);
- corpus: every piece the original model produces on the corpus;
- retain: the user's pieces, and the pieces of each retained word that is not a piece;
- cjk: with keep_cjk, every piece made only of CJK ideographs (after the "▁" prefix), so
  Chinese outside the corpus still gets whole-character (or word) pieces;
- closure: every piece that is a contiguous substring of a kept normal or unused piece.

Why the substring closure makes the trimmed model encode the corpus identically.

BPE. SentencePiece's BPE encoder starts from one symbol per character (user-defined pieces
pre-matched and frozen) and repeats: among adjacent symbol pairs whose concatenation is a
piece, merge the pair with the highest piece score, the leftmost on ties (its priority queue
skips stale entries, and its validity check is exact, so it behaves as this rule). Pairs are
identified by their left position, so the choice is never ambiguous. Then unused pieces are
split back, and each final symbol maps to its id, or to byte pieces / <unk> if it is not a
piece. Let V be the original pieces, K ⊆ V the kept ones. Run the encoder on a corpus text with
V. Every symbol formed by a merge stays inside some symbol present when merging stops, so it
is a contiguous substring of it; that symbol is a piece the encoder output (kept: corpus) or
an unused piece (kept: special), and K is closed under substrings, so every merged symbol is
in K. Now run with K; by induction the symbol sequences are equal at every step: the merge
chosen with V joins to a piece in K, so it is a candidate with K too, with the same score;
the candidates with K are a subset of those with V, so it is still the best one. When the V
run has no candidate left, neither has the K run. A removed piece was never formed, so its
absence never changes which merge wins. The final symbols are equal; the pieces among them
are kept; the others fall back to the same byte pieces or <unk>, which are kept too.

Unigram. The encoder picks the highest-scoring segmentation (Viterbi; ties go to the first
candidate it visits). The best segmentation with V uses only corpus pieces, all in K, and
every segmentation with K is one with V too, so it is still the best (a removed tied
candidate visited earlier would have been chosen itself). Where no single-character piece
covers a character, an unknown node with score min_score - 10 is added; closure keeps every
single-character piece of a kept piece and the min-score anchor keeps that score, so the
lattice offers the same choices.

Retained words get the same treatment as the corpus (their tokenization is kept), so each
retained word also encodes as before. The closure makes the trimmed model larger than the
set of pieces the corpus uses; that is the price of the guarantee.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm
from tqdm.auto import tqdm

from babyllama.atomic import atomic_write_bytes
from babyllama.batching import batched
from babyllama.errors import UserError
from babyllama.textfile import read_json, read_text
from babyllama.tokenizer.tokenizer import Tokenizer, SentencePieceBackend, sentencepiece_proto

ID_MAP_FILE = "id_map.json"

REASONS = ("special", "corpus", "retain", "cjk", "closure")

# ModelProto.SentencePiece.Type values (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM = 1

# CJK ideograph blocks: Unified Ideographs, Extension A, Compatibility Ideographs, and the
# supplementary-plane Extensions B..I plus Compatibility Supplement (U+20000..U+323AF).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x323AF))

_BATCH = 1000  # texts per SentencePiece call: it encodes a list on several threads


def is_cjk_ideograph(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


# ----------------------------------------------------------------------------------------
# Result


@dataclass
class TrimResult:
    """What `trim_sentencepiece` kept. Sizes count SentencePiece pieces (`*_pieces`) and the
    whole vocabulary including our special tokens appended after the last piece
    (`*_vocab_size`, the model's embedding rows)."""

    original_pieces: int
    new_pieces: int
    original_vocab_size: int
    new_vocab_size: int
    kept_by_reason: dict[str, int]  # REASONS -> count; sums to new_pieces
    retain_entries: int
    retain_not_pieces: int          # retain entries that were tokenized instead
    documents: int
    corpus_tokens: int
    # int32, one per original id (appended specials too), -1 = removed
    old_to_new: np.ndarray = field(repr=False)
    model_bytes: bytes = field(repr=False)  # the trimmed tokenizer.model
    tokenizer: Tokenizer = field(repr=False)  # the trimmed tokenizer, same special-token roles
    seconds: float = 0.0

    @property
    def new_to_old(self) -> np.ndarray:
        """Original id of each new id (kept ids keep their order, so this is increasing)."""
        return np.flatnonzero(self.old_to_new >= 0)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write tokenizer.model + tokenizer_config.json (`Tokenizer.load` opens the directory)
        and id_map.json (`load_id_map` reads it back)."""
        out = self.tokenizer.save(out_dir)
        kept = self.new_to_old
        id_map = {"original_vocab_size": self.original_vocab_size,
                  "new_vocab_size": self.new_vocab_size,
                  "old_to_new": {str(int(o)): int(n) for o, n in zip(kept, self.old_to_new[kept])}}
        atomic_write_bytes(out / ID_MAP_FILE, (json.dumps(id_map) + "\n").encode("utf-8"))
        return out

    def to_dict(self) -> dict:
        return {"original_pieces": self.original_pieces, "new_pieces": self.new_pieces,
                "original_vocab_size": self.original_vocab_size,
                "new_vocab_size": self.new_vocab_size, "kept_by_reason": dict(self.kept_by_reason),
                "retain_entries": self.retain_entries, "retain_not_pieces": self.retain_not_pieces,
                "documents": self.documents, "corpus_tokens": self.corpus_tokens,
                "seconds": round(self.seconds, 2)}

    def summary(self) -> str:
        """A few lines for the CLI."""
        reasons = ", ".join(f"{r} {n:,}" for r, n in self.kept_by_reason.items())
        lines = [f"trimmed {self.original_pieces:,} -> {self.new_pieces:,} pieces "
                 f"({self.new_pieces / self.original_pieces:.1%}); vocabulary with special tokens "
                 f"{self.original_vocab_size:,} -> {self.new_vocab_size:,}",
                 f"kept: {reasons}",
                 f"corpus: {self.documents:,} documents, {self.corpus_tokens:,} tokens "
                 f"({self.seconds:.1f} s)"]
        if self.retain_entries:
            lines.append(f"retain: {self.retain_entries:,} entries, {self.retain_not_pieces:,} "
                         "were not pieces and were tokenized")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Entry point


def trim_sentencepiece(tokenizer_or_path: Tokenizer | str | os.PathLike, texts: Iterable[str], *,
                       keep_cjk: bool = True, retain: Iterable[str] = (),
                       progress: bool = True) -> TrimResult:
    """Keep the pieces `texts` need (see the module docstring for what and why); the corpus
    encodes to the same pieces with the trimmed model. `retain`: pieces or words to keep
    (`read_retain_file` reads a file of them)."""
    start = time.perf_counter()
    tok = _as_sentencepiece(tokenizer_or_path)
    proto = sentencepiece_proto(tok)
    pieces = [p.piece for p in proto.pieces]

    used, documents, tokens = _corpus_usage(tok, texts, progress)
    retained, retain_entries, not_pieces = _retained(tok, retain)
    sets = {"special": _special(proto) | _special_token_pieces(tok),
            "corpus": set(np.flatnonzero(used).tolist()),
            "retain": retained,
            "cjk": _cjk(pieces) if keep_cjk else set()}
    kept = set().union(*sets.values())
    sets["closure"] = _substring_closure(proto, kept) - kept
    kept |= sets["closure"]

    keep = np.zeros(len(pieces), dtype=bool)
    keep[list(kept)] = True
    old_to_new, model_bytes = _old_to_new(tok, keep), _trimmed_proto(proto, keep)
    new_tok = _rebuild(tok, model_bytes)
    return TrimResult(original_pieces=len(pieces), new_pieces=int(keep.sum()),
                      original_vocab_size=tok.vocab_size, new_vocab_size=new_tok.vocab_size,
                      kept_by_reason=_count_by_first_reason(sets), retain_entries=retain_entries,
                      retain_not_pieces=not_pieces, documents=documents, corpus_tokens=tokens,
                      old_to_new=old_to_new, model_bytes=model_bytes, tokenizer=new_tok,
                      seconds=time.perf_counter() - start)


def _count_by_first_reason(sets: dict[str, set[int]]) -> dict[str, int]:
    """Each kept piece counted once, under the first of REASONS that keeps it."""
    counts, seen = {}, set()
    for reason in REASONS:
        counts[reason] = len(sets[reason] - seen)
        seen |= sets[reason]
    return counts


def read_retain_file(path: str | os.PathLike) -> list[str]:
    """One piece or word per line; blank lines are skipped. Only the line ending is removed:
    a leading space is text, and SentencePiece will encode it as "▁"."""
    if not Path(path).is_file():
        raise UserError(f"{path}: cannot read retain list (no such file)")
    return [line for line in read_text(path).splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------
# Using the result on models and data


def remap_embeddings(weight, result: TrimResult):
    """Rows of an embedding or untied LM-head weight (original_vocab_size, d), numpy array or
    torch tensor, in the trimmed order: a trained model keeps its vectors for kept tokens."""
    if weight.shape[0] != result.original_vocab_size:
        raise UserError(f"embedding has {weight.shape[0]} rows, but the tokenizer before "
                        f"trimming had {result.original_vocab_size} tokens")
    index = result.new_to_old
    if not isinstance(weight, np.ndarray):  # torch: index with a tensor on the same device
        import torch  # only for a tensor argument: trimming itself never needs torch (~1 s to import)

        index = torch.as_tensor(index, device=weight.device)
    return weight[index]


def remap_ids(ids, old_to_new: np.ndarray) -> np.ndarray:
    """Token ids of the original tokenizer -> trimmed ids (e.g. prepared data). Raises if an
    id was removed: such data needs preparing again with the trimmed tokenizer."""
    ids = np.asarray(ids)
    new = old_to_new[ids]
    if (new < 0).any():
        bad = int(ids[new < 0][0])
        raise UserError(f"token id {bad} was removed by trimming; prepare the data again "
                        "with the trimmed tokenizer")
    return new


def load_id_map(path: str | os.PathLike) -> np.ndarray:
    """Read an id_map.json (file or the trimmed tokenizer's directory) as `old_to_new`."""
    p = Path(path)
    p = p / ID_MAP_FILE if p.is_dir() else p
    data = read_json(p, "id map JSON")
    try:
        old_to_new = np.full(int(data["original_vocab_size"]), -1, dtype=np.int32)
        for old, new in data["old_to_new"].items():
            old_to_new[int(old)] = new
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{p}: not an id map written by tokenizer trim ({e})") from None
    return old_to_new


# ----------------------------------------------------------------------------------------
# Steps


def _as_sentencepiece(tokenizer_or_path) -> Tokenizer:
    tok = (tokenizer_or_path if isinstance(tokenizer_or_path, Tokenizer)
           else Tokenizer.load(tokenizer_or_path))
    if tok.kind != "sentencepiece":
        where = "" if isinstance(tokenizer_or_path, Tokenizer) else f"{tokenizer_or_path}: "
        raise UserError(f"{where}trim works on SentencePiece models; this is a {tok.kind} tokenizer "
                        "(for byte-level BPE, train a smaller one with --vocab-size)")
    return tok


def _corpus_usage(tok: Tokenizer, texts: Iterable[str], progress: bool) -> tuple[np.ndarray, int, int]:
    """Which pieces the corpus uses (bool per piece), with document and token counts.

    Encoded with the tokenizer's own `encode_batch`, as training data is: our special-token
    strings in the text become their appended ids (dropped here) and the text between them is
    encoded by SentencePiece, a whole batch per call."""
    base = tok.backend.get_piece_size()
    used = np.zeros(base, dtype=bool)
    documents = tokens = 0
    has_text = False  # whitespace-only texts are encoded (they have pieces) but make no corpus
    with tqdm(desc="encoding corpus", unit=" docs", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batched((t for t in texts if t), _BATCH):
            ids = np.fromiter((i for row in tok.encode_batch(batch) for i in row), dtype=np.int64)
            used[ids[ids < base]] = True
            documents += len(batch)
            tokens += len(ids)
            has_text = has_text or any(not t.isspace() for t in batch)
            bar.update(len(batch))
    if not has_text:
        raise UserError("empty corpus: trim needs texts to keep the pieces of (no non-empty documents)")
    return used, documents, tokens


def _retained(tok: Tokenizer, retain: Iterable[str]) -> tuple[set[int], int, int]:
    """Piece ids for the retain list: an entry that is a piece is kept itself; every entry is
    also tokenized and its pieces kept, so the word encodes as before (a word like "hello"
    encodes as "▁hello" in running text, which the piece "hello" alone would not cover)."""
    entries = list(dict.fromkeys(retain))
    base = tok.backend.get_piece_size()
    ids = {i for e in entries if (i := tok.token_to_id(e)) is not None and i < base}
    not_pieces = len(entries) - len(ids)
    ids.update(i for row in tok.encode_batch(entries) for i in row if i < base)
    return ids, len(entries), not_pieces


def _special(proto) -> set[int]:
    """Pieces no corpus decides about: bytes, unknown, control, user-defined, unused; for
    unigram also the score anchors (min score sets the unknown penalty, max the score of
    user-defined pieces)."""
    keep = {i for i, p in enumerate(proto.pieces) if p.type != _NORMAL}
    if proto.trainer_spec.model_type == _UNIGRAM:
        normal = [(p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL]
        if normal:
            keep |= {min(normal)[1], max(normal)[1]}
    return keep


def _special_token_pieces(tok: Tokenizer) -> set[int]:
    """Pieces that serve a special-token role (a model may use a normal piece as pad, say):
    removing one would make the trimmed Tokenizer append it, shifting the appended ids."""
    base = tok.backend.get_piece_size()
    return {i for i in tok.special_token_ids.values() if i is not None and i < base}


def _cjk(pieces: list[str]) -> set[int]:
    out = set()
    for i, piece in enumerate(pieces):
        chars = piece.lstrip("▁")
        if chars and all(map(is_cjk_ideograph, chars)):
            out.add(i)
    return out


def _substring_closure(proto, kept: set[int]) -> set[int]:
    """Ids of every piece that is a contiguous substring of a kept normal or unused piece
    (the kept pieces themselves included). One pass suffices: a substring of a substring is a
    substring. Pieces are at most max_sentencepiece_length (16) characters, so this is cheap."""
    index = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (_NORMAL, _UNUSED)}
    out = set()
    for i in kept:
        p = proto.pieces[i]
        if p.type not in (_NORMAL, _UNUSED):
            continue
        s = p.piece
        for a in range(len(s)):
            for b in range(a + 1, len(s) + 1):
                j = index.get(s[a:b])
                if j is not None:
                    out.add(j)
    return out


def _old_to_new(tok: Tokenizer, keep: np.ndarray) -> np.ndarray:
    """Kept pieces in their original order, then the appended special tokens, which all stay."""
    appended = tok.vocab_size - len(keep)
    old_to_new = np.full(tok.vocab_size, -1, dtype=np.int32)
    kept = np.concatenate([np.flatnonzero(keep), len(keep) + np.arange(appended)])
    old_to_new[kept] = np.arange(len(kept), dtype=np.int32)
    return old_to_new


def _trimmed_proto(proto, keep: np.ndarray) -> bytes:
    """The model with only the kept pieces, in order, with their scores and types; the
    normalizer, trainer spec and everything else copied."""
    new = type(proto)()
    new.CopyFrom(proto)
    del new.pieces[:]
    new.pieces.extend(p for p, k in zip(proto.pieces, keep) if k)
    spec = new.trainer_spec
    spec.vocab_size = len(new.pieces)
    # The trainer spec records special ids; SentencePiece resolves them by piece, but other
    # readers (transformers' converters, our HF export) read these numbers.
    position = {p.piece: i for i, p in enumerate(new.pieces)}
    for name, piece in (("unk_id", spec.unk_piece), ("bos_id", spec.bos_piece),
                        ("eos_id", spec.eos_piece), ("pad_id", spec.pad_piece)):
        if getattr(spec, name) >= 0 and piece in position:
            setattr(spec, name, position[piece])
    return new.SerializeToString()


def _rebuild(tok: Tokenizer, model_bytes: bytes) -> Tokenizer:
    """A Tokenizer on the trimmed model with the original's special tokens: the same roles,
    and the appended ones in the same order, now after the new last piece."""
    backend = SentencePieceBackend(spm.SentencePieceProcessor(model_proto=model_bytes))
    backend.appended = [t["content"] for t in tok.added_tokens()]
    return Tokenizer(backend, dict(tok.special_tokens), chat_template=tok.chat_template)


__all__ = ["TrimResult", "trim_sentencepiece", "read_retain_file", "remap_embeddings", "remap_ids",
           "load_id_map", "is_cjk_ideograph", "REASONS", "ID_MAP_FILE"]
