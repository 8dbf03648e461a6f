"""Every decoding setting in one dataclass, with transformers' `GenerationConfig` semantics where
it has the setting (the semantics Chinese fine-tuning write-ups tune decoding with) and OpenAI's for the frequency and presence
penalties. `temperature=0` means greedy; `num_beams > 1` means beam search.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from babyllama.errors import UserError


# What torch.Generator.manual_seed accepts: a signed or unsigned 64-bit integer.
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1


@dataclass
class GenerationConfig:
    max_new_tokens: int = 100
    temperature: float = 0.8          # 0: greedy (argmax)
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1.0: off
    min_p: float = 0.0                # 0: off; drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0   # 1.0: off; > 1 discourages every token of prompt and output
    frequency_penalty: float = 0.0    # subtract this x the token's count in the output so far
    presence_penalty: float = 0.0     # subtract this once the token is in the output
    no_repeat_ngram_size: int = 0     # 0: off; no n-gram (prompt included) may occur twice
    num_beams: int = 1                # > 1: beam search (deterministic: sampling settings unused)
    length_penalty: float = 1.0       # beam score = log-prob sum / length ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False or "never", as transformers
    num_return_sequences: int = 1     # samples (or best beams) per prompt, from one prefill
    stop: tuple[str, ...] = ()        # stop strings: the text ends before the first one found
                                      # (a control token's text, "<|im_end|>", stops at that token)
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's end-of-text tokens
    seed: int | None = None           # reproducible sampling (the global RNG is left alone)
    truncate: str = "error"           # "left": a prompt longer than the context loses its oldest tokens

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if isinstance(self.stop_token_ids, int):  # one id, as one stop string may be one str
            self.stop_token_ids = (self.stop_token_ids,)
        self.stop_token_ids = tuple(self.stop_token_ids or ())

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def problems(self) -> list[str]:
        out = []
        counts = ("max_new_tokens", "top_k", "no_repeat_ngram_size", "num_beams", "num_return_sequences")
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                out.append(f"{name} must be an integer, got {value!r}")
        if out:
            return out  # the comparisons below need numbers
        for name in ("max_new_tokens", "top_k", "no_repeat_ngram_size"):
            if getattr(self, name) < 0:
                out.append(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("num_beams", "num_return_sequences"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature < 0:
            out.append(f"temperature must not be negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            out.append(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            out.append(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.early_stopping not in (True, False, "never"):
            out.append(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            out.append(f"num_return_sequences ({self.num_return_sequences}) cannot exceed "
                       f"num_beams ({self.num_beams})")
        if self.truncate not in ("error", "left"):
            out.append(f"truncate must be 'error' or 'left', got {self.truncate!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            out.append(f"seed must be an integer from {SEED_MIN} to {SEED_MAX}, got {self.seed!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.stop_token_ids):
            out.append(f"stop token ids must be non-negative integers, got {list(self.stop_token_ids)!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            out.append(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        return out

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise UserError("; ".join(problems))


FIELDS = tuple(f.name for f in fields(GenerationConfig))

# The one table of decoding defaults: each use starts from GenerationConfig's defaults (the
# "plain" row) with its row applied, and every caller (CLI, LLM, trainer, eval, demo, exports)
# reads its row here.
DECODING_DEFAULTS: dict[str, dict] = {
    # Continuing text: `babyllama generate`, LLM.generate/stream, a base run's transformers export.
    "plain": {},
    # A chat answer: `babyllama chat`, LLM.chat, ChatSession, an SFT run's transformers export.
    # Longer answers and a mild repetition penalty, since small models loop.
    "chat": dict(max_new_tokens=200, temperature=0.7, top_k=50, repetition_penalty=1.1),
    # Samples written during training and shown by the demo (length: train.sample_max_new_tokens).
    "samples": dict(temperature=0.8, top_k=50, repetition_penalty=1.1),
    # Evaluation answers are greedy: the score of a run, not of a sample, and reproducible.
    # `generation` needs room for loops to show; 64 tokens hold any CSL / LCSTS summary.
    "eval-generation": dict(max_new_tokens=128, temperature=0.0),
    "eval-rouge": dict(max_new_tokens=64, temperature=0.0),
}
CHAT_DEFAULTS = DECODING_DEFAULTS["chat"]


def decoding_defaults(kind: str, **settings) -> GenerationConfig:
    """The defaults of `kind` (a DECODING_DEFAULTS row), with `settings` on top. Raises
    UserError for an unknown kind or setting."""
    if kind not in DECODING_DEFAULTS:
        raise UserError(f"unknown decoding defaults {kind!r}; known: {', '.join(DECODING_DEFAULTS)}")
    return generation_config({**DECODING_DEFAULTS[kind], **settings})


def generation_config(settings: dict) -> GenerationConfig:
    """A config from keyword settings, naming any unknown key (a typo must not be ignored)."""
    unknown = sorted(set(settings) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown generation setting(s) {', '.join(unknown)}; "
                        f"known: {', '.join(FIELDS)}")
    cfg = GenerationConfig(**settings)
    cfg.check()
    return cfg


def changed_settings(cfg: GenerationConfig, defaults: GenerationConfig) -> dict:
    """The settings of `cfg` that differ from `defaults` (what a report needs to name)."""
    return {f: getattr(cfg, f) for f in FIELDS if getattr(cfg, f) != getattr(defaults, f)}
