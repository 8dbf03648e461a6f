"""The generation engine: a batch of token prompts in, one new token per row per step out.

Prompts of different lengths share one batch by left padding: every row writes its next
key/value into the same cache column, pad slots are masked out of attention, and each row's
rotary positions count its own tokens only, so a padded row computes what it would alone.
`num_return_sequences` samples share their prompt's prefill: the cache rows are repeated
after it. Finished rows leave the batch (their cache rows are dropped), so a long straggler
does not make the others pay.

Sampling and greedy decoding live here (`Decoder`); beam search is in `beam.py`; text
(detokenising, stop strings, streaming) in `generate.py`.
"""

from __future__ import annotations

import torch

from babyllama.errors import UserError
from babyllama.infer.config import GenerationConfig
from babyllama.infer.logits import History, choose_tokens


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """How many tokens a prompt that must be shortened keeps: room for `max_new_tokens`, but
    never less than half the context (a prompt cut to a handful of tokens would be answered as
    a different question). Chat histories and `truncate="left"` share this rule."""
    return max(context // 2, context - max_new_tokens)


def fit_prompts(prompts: list[list[int]], context: int, cfg: GenerationConfig) -> list[list[int]]:
    """Check every prompt fits the context: at least one new token must fit after it.

    A prompt that fits is never changed, however many new tokens are asked for (generation then
    stops at the context, finish_reason "length"). One that does not fit is an error, or with
    cfg.truncate == "left" loses its oldest tokens down to `prompt_budget`.
    """
    out = []
    for i, p in enumerate(prompts):
        name = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        if not p:
            raise UserError(f"{name} is empty: give at least one token (e.g. the BOS token)")
        if len(p) >= context:
            if cfg.truncate != "left":
                raise UserError(f"{name} has {len(p)} tokens; the model's context is {context} "
                                "(shorten it, or have its oldest tokens dropped: truncate='left', "
                                "--truncate-left)")
            p = p[-prompt_budget(context, cfg.max_new_tokens):]
        out.append(list(p))
    return out


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class Batch:
    """Rows of a left-padded batch and their KV cache: prefill, decode steps, row selection."""

    def __init__(self, model, prompts: list[list[int]], extra_len: int,
                 pixel_values: torch.Tensor | None = None):
        self.model = model
        device = model_device(model)
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        self.pad = torch.tensor([width - n for n in lengths], device=device)
        self.padded = bool(self.pad.any())
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        self.cache = model.new_cache(len(prompts), width + extra_len)
        mask = positions = None
        if self.padded:
            key = torch.arange(width, device=device)
            real = key[None, :] >= self.pad[:, None]                       # (B, width)
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            # A pad query attends to itself only: a row with no allowed key would give NaN,
            # which the pad slot's cached keys/values would carry into later layers and steps.
            mask = (causal & (real[:, None, :] | torch.eye(width, dtype=torch.bool, device=device)))[:, None]
            positions = (key[None, :] - self.pad[:, None]).clamp(min=0)
        # Images enter only here: their features fill the image token positions of the prefill.
        images = {} if pixel_values is None else {"pixel_values": pixel_values.to(device)}
        logits, _ = model(ids, cache=self.cache, attn_mask=mask, position_ids=positions, last_only=True,
                          **images)
        self.logits = logits[:, -1]

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.pad.device)
        self.cache.select(index)
        self.pad = self.pad[index]
        self.padded = bool(self.pad.any())
        self.logits = self.logits[index]

    def extend(self, other: "Batch", room: int) -> None:
        """Append the rows of `other` (prompts prefilled on their own) after this batch's rows:
        continuous batching's join. Both caches are right-aligned at the later position, the
        rows that moved gaining left padding; `room` positions are left free for decoding."""
        shift_self, shift_other = self.cache.join(other.cache, max(self.cache.pos, other.cache.pos) + room)
        self.pad = torch.cat([self.pad + shift_self, other.pad + shift_other])
        self.padded = bool(self.pad.any())
        self.logits = torch.cat([self.logits, other.logits])
        self.compact()

    def compact(self) -> None:
        """Drop the leading cache columns that are padding in every row (after the row that
        started first has left): a view, so a long-running batch needs no more than the
        longest row's positions."""
        if self.pad.numel():
            front = int(self.pad.min())
            if front:
                self.cache.drop_front(front)
                self.pad = self.pad - front
                self.padded = bool(self.pad.any())

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ((rows,) tensor); the next logits, (rows, vocab). A cache
        that is full (a continuously batched one) grows by 64 positions first."""
        if self.cache.pos >= self.cache.max_len:
            self.cache.grow(self.cache.pos + 64)
        mask = positions = None
        if self.padded:
            keys = torch.arange(self.cache.pos + 1, device=tokens.device)
            mask = (keys[None, :] >= self.pad[:, None])[:, None, None, :]
            positions = (self.cache.pos - self.pad)[:, None]
        logits, _ = self.model(tokens[:, None], cache=self.cache, attn_mask=mask, position_ids=positions)
        self.logits = logits[:, -1]
        return self.logits


class Decoder:
    """Greedy or sampled decoding of several prompts (x num_return_sequences) at once.

    `step()` returns the new (row, token) pairs; a row ends at a stop token (not returned), at
    its token limit, or when the caller calls `finish(row)` (a stop string found in its text).
    Rows are numbered prompt-major: prompt i's samples are rows i*n .. i*n+n-1.
    """

    def __init__(self, model, prompts: list[list[int]], cfg: GenerationConfig,
                 stop_ids: tuple[int, ...] = (), pixel_values: torch.Tensor | None = None):
        cfg.check()
        context = model.config.max_position_embeddings
        fitted = fit_prompts(prompts, context, cfg)
        if pixel_values is not None and fitted != prompts:
            # Cutting the oldest tokens could cut an image's positions in half.
            raise UserError(f"a prompt with an image is longer than the context ({context} tokens, "
                            "each image taking its share): shorten the text")
        prompts = fitted
        n = cfg.num_return_sequences
        self.cfg, self.stop_ids = cfg, frozenset(stop_ids) | frozenset(cfg.stop_token_ids)
        self.prompt_lengths = [len(p) for p in prompts for _ in range(n)]
        self.limits = [min(cfg.max_new_tokens, context - len(p)) for p in prompts for _ in range(n)]
        self.tokens: list[list[int]] = [[] for _ in self.limits]
        self.finish_reasons: list[str | None] = [None] * len(self.limits)
        self.end_tokens: list[int | None] = [None] * len(self.limits)  # the stop token that ended a row
        device = model_device(model)
        self.generator = None
        if cfg.seed is not None and not cfg.greedy:
            # A private generator: sampling must not disturb the global RNG (training resumes
            # exactly even when samples are drawn mid-run).
            self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.batch = Batch(model, prompts, max(self.limits), pixel_values)
        self.history = History(prompts, self.batch.logits.size(-1), cfg, device)
        if n > 1:
            rows = [i for i in range(len(prompts)) for _ in range(n)]
            self.batch.select(rows)
            self.history.select(rows)
        self.active = list(range(len(self.limits)))  # row number of each batch row, in order
        self.pending: torch.Tensor | None = None       # chosen last step, not yet fed to the model
        for row, limit in enumerate(self.limits):
            if limit <= 0:
                self.finish(row, "length")

    @property
    def done(self) -> bool:
        return not self.active

    def finish(self, row: int, reason: str = "stop") -> None:
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = reason

    def step(self) -> list[tuple[int, int]]:
        keep = [i for i, row in enumerate(self.active) if self.finish_reasons[row] is None]
        if len(keep) < len(self.active):
            self.active = [self.active[i] for i in keep]
            if not self.active:
                return []
            self.batch.select(keep)
            self.history.select(keep)
            if self.pending is not None:
                self.pending = self.pending[keep]
        if not self.active:
            return []
        logits = self.batch.logits if self.pending is None else self.batch.step(self.pending)
        chosen = choose_tokens(logits, self.history, self.cfg, self.generator)
        chosen_list = chosen.tolist()
        self.history.append(chosen, chosen_list)
        self.pending = chosen
        out = []
        for row, token in zip(self.active, chosen_list):
            if token in self.stop_ids:
                self.finish(row, "stop")
                self.end_tokens[row] = token
                continue
            self.tokens[row].append(token)
            out.append((row, token))
            if len(self.tokens[row]) >= self.limits[row]:
                self.finish(row, "length")
        return out


def prepare_for_decoding(model) -> None:
    """Lay out weights for fast one-token steps; values, names and results stay the same.

    On CPU every Linear weight is stored column-major ((in, out) contiguous, seen through a
    transpose). At batch 1 a decoding step is a chain of matrix-vector products whose cost is
    reading the weights; MKL streams a column-major weight 1.3-2.8x faster than the row-major
    one nn.Linear keeps (benchmarks/generate_throughput.py, "plain layout" column). Only for
    inference: a state dict of this model is not contiguous until `.contiguous()`.
    """
    if model_device(model).type != "cpu":
        return
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()
