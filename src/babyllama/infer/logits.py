"""Logit processors: how a row of next-token scores becomes the distribution the next token is
drawn from.

Order and semantics follow transformers' `generate` (tests compare with its processors on the
same logits): repetition penalty, no-repeat-n-gram, then temperature, top-k, top-p and min-p.
The frequency and presence penalties (OpenAI's; transformers has none) come right after the
repetition penalty, as in vLLM. Beam search uses the penalties only, on log-probabilities, as
transformers' beam search does.
"""

from __future__ import annotations

import torch

from babyllama.infer.config import GenerationConfig


class History:
    """What the penalties need to know about each row's tokens so far, kept incrementally so a
    decoding step never re-reads the whole sequence: a (rows, vocab) presence mask over prompt
    + output (repetition penalty), output token counts (frequency/presence) and, per row, the
    n-grams seen (no-repeat-n-gram). Only what the config uses is kept."""

    def __init__(self, prompts: list[list[int]], vocab_size: int, cfg: GenerationConfig,
                 device: torch.device):
        rows = len(prompts)
        self.seen = self.counts = None
        if cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
            for r, p in enumerate(prompts):
                self.seen[r, torch.tensor(p, device=device)] = True
        if cfg.frequency_penalty or cfg.presence_penalty:
            self.counts = torch.zeros(rows, vocab_size, device=device)
        self.n = cfg.no_repeat_ngram_size
        self.ngrams = [NgramIndex(self.n, p) for p in prompts] if self.n else None

    @classmethod
    def concat(cls, histories: list["History"]) -> "History":
        """The rows of several histories of one config, stacked (read-only: a view for
        processing their requests' logits together; each keeps appending to its own)."""
        if len(histories) == 1:
            return histories[0]
        out = cls.__new__(cls)
        first = histories[0]
        out.seen = None if first.seen is None else torch.cat([h.seen for h in histories])
        out.counts = None if first.counts is None else torch.cat([h.counts for h in histories])
        out.n = first.n
        out.ngrams = None if first.ngrams is None else [i for h in histories for i in h.ngrams]
        return out

    def select(self, index: list[int]) -> None:
        """Keep (reorder, repeat) rows: the same index as the KV cache's."""
        if self.seen is not None or self.counts is not None:
            idx = torch.tensor(index, device=(self.seen if self.seen is not None else self.counts).device)
            if self.seen is not None:
                self.seen = self.seen[idx]
            if self.counts is not None:
                self.counts = self.counts[idx]
        if self.ngrams is not None:
            self.ngrams = [self.ngrams[i].copy() for i in index]

    def append(self, tokens: torch.Tensor, token_list: list[int]) -> None:
        """Record one new token per row (`tokens`: (rows,) on the device; the same as a list)."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=self.counts.dtype))
        if self.ngrams is not None:
            for index, t in zip(self.ngrams, token_list):
                index.append(t)


class NgramIndex:
    """The tokens that may not come next because they would repeat an n-gram: for each (n-1)-token
    prefix seen, the tokens that followed it (transformers' NoRepeatNGramLogitsProcessor)."""

    def __init__(self, n: int, tokens: list[int]):
        self.n, self.tokens, self.followers = n, [], {}
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            gram = self.tokens[-self.n:]
            self.followers.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned(self) -> list[int]:
        if len(self.tokens) + 1 < self.n:
            return []
        return list(self.followers.get(tuple(self.tokens[len(self.tokens) - self.n + 1:]), ()))

    def copy(self) -> "NgramIndex":
        other = NgramIndex.__new__(NgramIndex)
        other.n, other.tokens = self.n, list(self.tokens)
        other.followers = {k: set(v) for k, v in self.followers.items()}
        return other


def apply_penalties(scores: torch.Tensor, history: History, cfg: GenerationConfig) -> torch.Tensor:
    if history.seen is not None:
        # CTRL's penalty as transformers applies it: positive scores divided, negative ones multiplied.
        penalized = torch.where(scores < 0, scores * cfg.repetition_penalty, scores / cfg.repetition_penalty)
        scores = torch.where(history.seen, penalized, scores)
    if history.counts is not None:
        scores = scores - cfg.frequency_penalty * history.counts \
            - cfg.presence_penalty * (history.counts > 0).to(scores.dtype)
    if history.ngrams is not None:
        banned = [(r, t) for r, index in enumerate(history.ngrams) for t in index.banned()]
        if banned:
            rows, cols = zip(*banned)
            scores = scores.clone()
            scores[list(rows), list(cols)] = float("-inf")
    return scores


def apply_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, scores.size(-1))
    kth = torch.topk(scores, k, dim=-1).values[..., -1, None]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling as transformers' TopPLogitsWarper: drop the least likely tokens whose
    cumulative probability stays <= 1 - p, always keeping the most likely one."""
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def apply_min_p(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024): keep tokens whose probability is at least min_p times the top
    token's, so the cut adapts to how confident the model is; applied after temperature."""
    probs = scores.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return scores.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, history: History, cfg: GenerationConfig) -> torch.Tensor:
    """(rows, vocab) logits -> the scores to sample from (or take the argmax of when greedy)."""
    scores = apply_penalties(logits.float(), history, cfg)
    if cfg.greedy:
        return scores
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k > 0:
        scores = apply_top_k(scores, cfg.top_k)
    if cfg.top_p < 1.0:
        scores = apply_top_p(scores, cfg.top_p)
    if cfg.min_p > 0:
        scores = apply_min_p(scores, cfg.min_p)
    return scores


def choose_tokens(logits: torch.Tensor, history: History, cfg: GenerationConfig,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of (rows, vocab) `logits`: the argmax of the processed scores when
    greedy, else a draw from their softmax (with `generator`, when given). (rows,) long."""
    scores = process_logits(logits, history, cfg)
    if cfg.greedy:
        return scores.argmax(dim=-1)
    return sample_rows(scores.softmax(dim=-1), generator)


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of (rows, vocab) `probs`, drawn from that row's distribution by
    inverting its cumulative sum: the distribution `torch.multinomial` draws from, 15-30x
    faster on CPU at a 64k vocabulary (multinomial costs ~1 ms per row there,
    benchmarks/serve_load.py). A zero-probability token is never drawn: `right=True` finds the
    first cumulative value above the uniform draw, which a token adding nothing never is."""
    cdf = probs.float().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device) * total
    # Kept below the total even when rounding lifts it there, so the trailing zeros stay out.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)[:, 0]
