"""Text generation with a KV cache: prefill the prompt once, then decode one token per step.

Decoding settings follow transformers' `GenerationConfig` semantics (seed 1), applied in the
same order as its `generate`: repetition penalty, then temperature, top-k and top-p.
`temperature=0` means greedy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from babyllama.errors import UserError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.8        # 0: greedy
    top_k: int = 0                  # 0: off
    top_p: float = 1.0              # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages tokens already present
    seed: int | None = None

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 0:
            out.append(f"max_new_tokens must not be negative, got {self.max_new_tokens}")
        if self.temperature < 0:
            out.append(f"temperature must not be negative, got {self.temperature}")
        if self.top_k < 0:
            out.append(f"top_k must not be negative, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            out.append(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        return out


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: divide positive logits, multiply negative ones,
    for every token id present in `seen` (prompt and generated so far)."""
    score = torch.gather(logits, 1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling as transformers' TopPLogitsWarper: drop the least likely tokens whose
    cumulative probability stays <= 1 - p, always keeping the most likely one."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature > 0:
        if cfg.temperature != 1.0:
            logits = logits / cfg.temperature
        if cfg.top_k > 0:
            logits = apply_top_k(logits, cfg.top_k)
        if cfg.top_p < 1.0:
            logits = apply_top_p(logits, cfg.top_p)
    return logits


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], cfg: SamplingConfig,
                 stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1); stops at a stop id (not yielded), at
    max_new_tokens, or at the end of the context."""
    problems = cfg.problems()
    if problems:
        raise UserError("; ".join(problems))
    context = model.config.max_position_embeddings
    if not prompt_ids:
        raise UserError("the prompt is empty: give at least one token (e.g. the BOS token)")
    if len(prompt_ids) >= context:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {context}")
    device = model.lm_head.weight.device
    generator = None
    if cfg.seed is not None:
        # A private generator: sampling must not disturb the global RNG (training resumes
        # exactly even when samples are drawn mid-run).
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    budget = min(cfg.max_new_tokens, context - len(prompt_ids))
    cache = model.new_cache(1, len(prompt_ids) + budget)
    # Prompt and generated ids in one pre-allocated row (the repetition penalty reads them).
    seen = torch.empty(1, len(prompt_ids) + budget, dtype=torch.long, device=device)
    n = len(prompt_ids)
    seen[0, :n] = torch.tensor(prompt_ids, dtype=torch.long)
    logits, _ = model(seen[:, :n], cache=cache, last_only=True)
    for _ in range(budget):
        scores = process_logits(logits[:, -1, :], seen[:, :n], cfg)
        if cfg.temperature == 0:
            next_id = scores.argmax(dim=-1, keepdim=True)
        else:
            probs = scores.softmax(dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        token = int(next_id)
        if token in stop_ids:
            return
        yield token
        seen[:, n] = next_id[:, 0]
        n += 1
        logits, _ = model(next_id, cache=cache)


def stream_text(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Turn a stream of token ids into text pieces. A byte-level token can hold part of a
    multi-byte character; a piece is held back until its character is complete.

    Each step decodes only the tokens since the previous piece, plus the piece before them
    as context (vLLM's incremental detokenisation): SentencePiece drops a leading space when
    decoding from a piece boundary, so the context token is decoded too and then cut off.
    """
    seen: list[int] = []
    prefix = read = 0  # seen[prefix:read] is the last emitted piece, seen[read:] is pending
    for token in ids:
        seen.append(token)
        before = tokenizer.decode(seen[prefix:read])
        text = tokenizer.decode(seen[prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            continue
        yield text[len(before):]
        prefix, read = read, len(seen)
    if read < len(seen):
        rest = tokenizer.decode(seen[prefix:])[len(tokenizer.decode(seen[prefix:read])):]
        if rest:
            yield rest


def stream_completion(model, tokenizer, prompt: str, cfg: SamplingConfig) -> Iterator[str]:
    """The continuation of `prompt` (BOS + its tokens) as text pieces, up to EOS."""
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    yield from stream_text(tokenizer, generate_ids(model, ids, cfg, stop_ids=(tokenizer.eos_id,)))


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode for the block, then back to the mode the model was in (sampling mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def generate_text(model, tokenizer, prompt: str, cfg: SamplingConfig) -> str:
    """The prompt's continuation as text (the prompt itself is not repeated)."""
    with eval_mode(model):
        return "".join(stream_completion(model, tokenizer, prompt, cfg))
