"""How well a tokenizer fits a corpus, and what its vocabulary costs a model.

`tokenizer_report` encodes a corpus and measures compression (characters and UTF-8 bytes per
token: more is better, the model sees more text per position), how often text falls back to
raw bytes or <unk>, how much of the vocabulary the corpus uses at all, and, for a model preset,
the share of parameters the embedding (and an untied LM head) would take at this vocabulary
size. `sweep_vocab_sizes` trains one byte-level BPE per vocabulary size and reports each on
held-out text, which is how to choose a size: compression grows slowly with the vocabulary,
the embedding's share of a small model quickly.

Byte fallback means different things per backend. SentencePiece emits <0xNN> pieces for
characters it has no piece for. A byte-level BPE has no fallback as such, but a token whose
bytes are not valid UTF-8 on their own (part of a character) is the same thing: the character
was too rare to get a token. Both are counted as byte-fallback tokens.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from babyllama.batching import batched
from babyllama.config import load_config
from babyllama.errors import UserError
from babyllama.tokenizer.tokenizer import Tokenizer
from babyllama.tokenizer.train import DEFAULT_PRETOKENIZER, train_tokenizer

_BATCH = 1000
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# ----------------------------------------------------------------------------------------
# Parameter arithmetic


def parameter_counts(config, vocab_size: int | None = None) -> dict[str, int]:
    """`Llama(config).parameter_counts()` without building the model (a 64k x 1024 embedding
    is not worth allocating to count it). `vocab_size` replaces the config's."""
    c = config
    v = c.vocab_size if vocab_size is None else vocab_size
    d, hd = c.hidden_size, c.head_size
    attention = d * c.num_attention_heads * hd * 2 + d * c.kv_heads * hd * 2  # q, o + k, v
    mlp = 3 * d * c.intermediate_size  # gate, up, down
    layers = c.num_hidden_layers * (attention + mlp + 2 * d)  # + two RMSNorm weights
    embedding = v * d
    head = 0 if c.tie_word_embeddings else v * d
    return {"embedding": embedding, "lm_head": head, "layers": layers, "final_norm": d,
            "total": embedding + head + layers + d}


def _model_config(preset) -> tuple[str | None, object | None]:
    """(label, ModelConfig) for a preset name or YAML path, or a ModelConfig ("model")."""
    if preset is None:
        return None, None
    if not isinstance(preset, str):
        return "model", preset
    return preset, load_config(preset).model


# ----------------------------------------------------------------------------------------
# Report


@dataclass
class TokenizerReport:
    """Counts from one pass over a corpus; the rates are properties computed from them."""

    name: str
    kind: str
    vocab_size: int
    documents: int
    characters: int
    utf8_bytes: int
    tokens: int
    byte_fallback_tokens: int
    unknown_tokens: int
    distinct_tokens: int
    top_tokens: list[dict]             # {"id", "token", "text", "count"}, most frequent first
    preset: str | None = None
    parameters: dict[str, int] | None = None  # parameter_counts at this vocab size
    path: str | None = None            # where the sweep saved this tokenizer

    @property
    def chars_per_token(self) -> float:
        return self.characters / max(self.tokens, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.utf8_bytes / max(self.tokens, 1)

    @property
    def byte_fallback_rate(self) -> float:
        return self.byte_fallback_tokens / max(self.tokens, 1)

    @property
    def unknown_rate(self) -> float:
        return self.unknown_tokens / max(self.tokens, 1)

    @property
    def coverage(self) -> float:
        """Share of the vocabulary (special tokens included) used at least once."""
        return self.distinct_tokens / max(self.vocab_size, 1)

    @property
    def embedding_share(self) -> float | None:
        """(embedding + untied LM head) / total parameters, for the preset."""
        if self.parameters is None:
            return None
        p = self.parameters
        return (p["embedding"] + p["lm_head"]) / p["total"]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("chars_per_token", "bytes_per_token", "byte_fallback_rate", "unknown_rate",
                     "coverage", "embedding_share"):
            d[name] = getattr(self, name)
        return d

    def table(self) -> str:
        """Markdown: the measurements, then the most frequent tokens."""
        rows = [("tokenizer", f"{self.name} ({self.kind}, {self.vocab_size:,} tokens)"),
                ("documents", f"{self.documents:,}"),
                ("characters", f"{self.characters:,}"),
                ("UTF-8 bytes", f"{self.utf8_bytes:,}"),
                ("tokens", f"{self.tokens:,}"),
                ("characters / token", f"{self.chars_per_token:.3f}"),
                ("bytes / token", f"{self.bytes_per_token:.3f}"),
                ("byte-fallback tokens", f"{self.byte_fallback_rate:.3%}"),
                ("unknown tokens", f"{self.unknown_rate:.3%}"),
                ("vocabulary used", f"{self.coverage:.1%} ({self.distinct_tokens:,} tokens)")]
        if self.parameters is not None:
            p = self.parameters
            head = "embedding" if not p["lm_head"] else "embedding + LM head"
            rows.append((f"{head} share ({self.preset})",
                         f"{self.embedding_share:.1%} of {p['total'] / 1e6:.1f}M parameters"))
        lines = ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
        lines += ["", f"Most frequent {len(self.top_tokens)} tokens:", "",
                  "| id | token | text | count | share |", "| ---: | --- | --- | ---: | ---: |"]
        for t in self.top_tokens:
            text = _cell(json.dumps(t["text"], ensure_ascii=False))  # quoted: spaces show
            lines.append(f"| {t['id']} | {_cell(t['token'])} | {text} | {t['count']:,} "
                         f"| {t['count'] / max(self.tokens, 1):.2%} |")
        return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def tokenizer_report(tokenizer: Tokenizer | str, texts: Iterable[str], preset=None, *,
                     name: str | None = None, top_k: int = 20,
                     progress: bool = False) -> TokenizerReport:
    """Encode `texts` (no bos/eos) and measure; `preset` (name, YAML path or ModelConfig)
    adds the parameter share of the embedding at this tokenizer's vocabulary size."""
    from tqdm.auto import tqdm

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    documents = characters = utf8_bytes = 0
    with tqdm(desc="encoding", unit=" docs", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batched((t for t in texts if t), _BATCH):
            ids = np.fromiter((i for row in tok.encode_batch(batch) for i in row), dtype=np.int64)
            counts += np.bincount(ids, minlength=len(counts))
            documents += len(batch)
            characters += sum(map(len, batch))
            utf8_bytes += sum(len(t.encode("utf-8")) for t in batch)
            bar.update(len(batch))
    if documents == 0:
        raise UserError("empty corpus: no non-empty documents to measure the tokenizer on")

    label, config = _model_config(preset)
    return TokenizerReport(
        name=name or _default_name(tokenizer), kind=tok.kind, vocab_size=tok.vocab_size,
        documents=documents, characters=characters, utf8_bytes=utf8_bytes,
        tokens=int(counts.sum()), byte_fallback_tokens=int(counts[byte_token_mask(tok)].sum()),
        unknown_tokens=int(counts[tok.unk_id]) if tok.unk_id is not None else 0,
        distinct_tokens=int((counts > 0).sum()), top_tokens=_top_tokens(tok, counts, top_k),
        preset=label,
        parameters=None if config is None else parameter_counts(config, tok.vocab_size))


def _default_name(tokenizer) -> str:
    if isinstance(tokenizer, Tokenizer):
        return f"{tokenizer.kind}-{tokenizer.vocab_size}"
    return str(tokenizer)


def _top_tokens(tok: Tokenizer, counts: np.ndarray, k: int) -> list[dict]:
    order = np.argsort(-counts, kind="stable")[:k]
    return [{"id": int(i), "token": tok.id_to_token(int(i)),
             "text": tok.decode([int(i)], skip_special_tokens=False), "count": int(counts[i])}
            for i in order if counts[i] > 0]


# ----------------------------------------------------------------------------------------
# Which tokens are byte fallback


def byte_token_mask(tok: Tokenizer) -> np.ndarray:
    """Bool per id: SentencePiece byte pieces; for `tokenizers` models, <0xNN> tokens (byte
    fallback) and, if the model is byte-level, tokens whose bytes are not valid UTF-8."""
    mask = np.zeros(tok.vocab_size, dtype=bool)
    if tok.kind == "sentencepiece":
        sp = tok.backend
        for i in range(sp.get_piece_size()):  # the appended specials are not bytes
            mask[i] = sp.is_byte(i)
        return mask
    decode = _byte_level_decoder() if _is_byte_level(tok.backend) else None
    special = {t["id"] for t in tok.added_tokens()}
    for token, i in tok.backend.get_vocab(with_added_tokens=False).items():
        if i in special:
            continue
        if _BYTE_PIECE.fullmatch(token):
            mask[i] = True
        elif decode is not None and (raw := decode(token)) is not None:
            mask[i] = not _valid_utf8(raw)
    return mask


def _is_byte_level(tk) -> bool:
    """Does the tokenizers model map bytes to GPT-2's printable characters? Its decoder says."""
    decoder = json.loads(tk.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _byte_level_decoder() -> Callable[[str], bytes | None]:
    """GPT-2's byte <-> printable character table, inverted: token string -> its bytes (None
    for a string that is not made of byte symbols)."""
    visible = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)}
    table, n = {}, 0
    for b in range(256):
        if b in visible:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1

    def decode(token: str) -> bytes | None:
        try:
            return bytes(table[c] for c in token)
        except KeyError:
            return None

    return decode


def _valid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ----------------------------------------------------------------------------------------
# Vocabulary-size sweep


def sweep_vocab_sizes(texts_factory: Callable[[], Iterable[str]], sizes: list[int],
                      eval_texts: Iterable[str], preset=None, *,
                      pretokenizer: str = DEFAULT_PRETOKENIZER,
                      save_dir: str | Path | None = None,
                      progress: bool = True) -> list[TokenizerReport]:
    """Train a byte-level BPE for each vocabulary size (`texts_factory()` must return a fresh
    iterator of training texts each time) and report each on held-out `eval_texts`.
    With `save_dir`, each tokenizer is saved to `save_dir/vocab-<size>`."""
    from tqdm.auto import tqdm

    if not sizes:
        raise UserError("vocab sizes: give at least one size")
    eval_texts = list(eval_texts)  # read once, measured once per size
    _model_config(preset)  # a bad preset fails before any training
    reports = []
    for size in tqdm(sorted(set(sizes)), desc="vocab sweep", unit=" tokenizer", disable=not progress):
        tok = train_tokenizer(texts_factory(), size, show_progress=False, pretokenizer=pretokenizer)
        report = tokenizer_report(tok, eval_texts, preset, name=f"bpe-{size}")
        if save_dir is not None:
            report.path = str(tok.save(Path(save_dir) / f"vocab-{size}"))
        reports.append(report)
    return reports


def held_out_split(texts_factory: Callable[[], Iterable[str]], every: int = 100,
                   limit: int = 2000) -> tuple[Callable[[], Iterator[str]], list[str]]:
    """Split one corpus for a sweep: every `every`-th document (the first `limit` of those)
    is held out for evaluation, the rest is training text. Returns (training texts factory,
    held-out texts); the factory re-reads the corpus each time, as `sweep_vocab_sizes` needs.
    Interleaved rather than a tail, so the held-out part samples the whole corpus."""
    if every < 2:
        raise UserError(f"held-out split: every must be at least 2, got {every}")
    eval_texts = list(islice(islice(texts_factory(), 0, None, every), limit))

    def training() -> Iterator[str]:
        return (t for k, t in enumerate(texts_factory()) if k % every or k // every >= limit)

    return training, eval_texts


def sweep_table(reports: list[TokenizerReport]) -> str:
    """Markdown: one row per tokenizer, smallest vocabulary first."""
    share = any(r.parameters is not None for r in reports)
    head = "| tokenizer | vocab | chars/token | bytes/token | vocab used | byte fallback |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: |"
    if share:
        head += " embedding share |"
        rule += " ---: |"
    lines = [head, rule]
    for r in sorted(reports, key=lambda r: r.vocab_size):
        row = (f"| {_cell(r.name)} | {r.vocab_size:,} | {r.chars_per_token:.3f} "
               f"| {r.bytes_per_token:.3f} | {r.coverage:.1%} | {r.byte_fallback_rate:.2%} |")
        if share:
            row += f" {r.embedding_share:.1%} |" if r.embedding_share is not None else " |"
        lines.append(row)
    return "\n".join(lines)


__all__ = ["TokenizerReport", "tokenizer_report", "sweep_vocab_sizes", "sweep_table", "held_out_split",
           "parameter_counts", "byte_token_mask"]
