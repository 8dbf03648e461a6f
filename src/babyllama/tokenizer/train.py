"""Train a byte-level BPE tokenizer for Chinese text with HF `tokenizers`.

Byte-level: the 256 byte symbols are the initial alphabet, so every string (any script, emoji,
control characters) encodes without <unk> and decodes back exactly. No normalizer is used for
the same reason: NFKC would turn full-width punctuation into ASCII and break the round trip.

The pre-tokenizer decides which merges BPE may learn (merges never cross pre-token
boundaries). The default was chosen by measuring characters per token on held-out Chinese and
English text; see docs/tokenizer_pretokenization.md and benchmarks/tokenizer_pretokenization.py.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, trainers
from tokenizers import pre_tokenizers as pt

from babyllama.batching import batched
from babyllama.errors import UserError
from babyllama.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer, HFBackend

# Han characters in any CJK block (Oniguruma script property, as used by HF `tokenizers`).
_HAN = r"\p{Han}"

PRETOKENIZERS = {
    # GPT-2's regex: a run of letters (Chinese characters are letters) is one pre-token, so
    # BPE can merge frequent multi-character words such as 中国 or 经济发展.
    "bytelevel": "GPT-2 ByteLevel regex; a run of Chinese characters is one pre-token",
    # Every Han character alone: a pure per-character vocabulary for Chinese.
    "cjk-chars": "each Han character is its own pre-token, then the GPT-2 regex",
    # As Llama and Qwen do: each digit 0-9 alone, so numbers tokenize the same way everywhere.
    "bytelevel-digits": "digits split one by one, then the GPT-2 regex",
    "cjk-chars-digits": "digits and Han characters split one by one, then the GPT-2 regex",
}
DEFAULT_PRETOKENIZER = "bytelevel"

_MIN_VOCAB = len(SPECIAL_TOKENS) + 256


def build_pretokenizer(name: str):
    """The `tokenizers` pre-tokenizer for one of the names in PRETOKENIZERS. Raises UserError
    for another name."""
    if name not in PRETOKENIZERS:
        raise UserError(f"pretokenizer {name!r}: unknown, choose one of {', '.join(PRETOKENIZERS)}")
    steps = []
    if name.endswith("-digits"):
        steps.append(pt.Digits(individual_digits=True))
    if name.startswith("cjk-chars"):
        steps.append(pt.Split(Regex(_HAN), behavior="isolated"))
    # add_prefix_space=False: a leading space is real text and must survive the round trip.
    steps.append(pt.ByteLevel(add_prefix_space=False, use_regex=True))
    return steps[0] if len(steps) == 1 else pt.Sequence(steps)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                    show_progress: bool = True,
                    pretokenizer: str = DEFAULT_PRETOKENIZER) -> Tokenizer:
    """Train a byte-level BPE on `texts` (streamed; never all held in memory).

    The special tokens take ids 0..15 in SPECIAL_TOKENS order, the 256 byte symbols follow,
    then the merges up to `vocab_size` (fewer if the corpus runs out of pairs that occur
    `min_frequency` times).
    """
    if vocab_size < _MIN_VOCAB:
        raise UserError(f"vocab_size {vocab_size}: too small, a byte-level tokenizer needs at "
                        f"least {_MIN_VOCAB} ({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    tk = HFTokenizer(models.BPE())  # no unk_token: every byte is in the vocabulary
    tk.pre_tokenizer = build_pretokenizer(pretokenizer)
    tk.decoder = decoders.ByteLevel()  # maps byte symbols back, so decode returns exact text
    # No post-processor: Tokenizer.encode(add_bos=..., add_eos=...) adds bos/eos explicitly.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pt.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    # Batches rather than single strings: far fewer Python -> Rust calls (the `tokenizers`
    # docs' advice for train_from_iterator).
    tk.train_from_iterator(batched(texts, 1000), trainer=trainer)
    return Tokenizer(HFBackend(tk), dict(SPECIAL_TOKENS), pretokenizer=pretokenizer)
