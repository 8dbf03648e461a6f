"""Text in, text out, on top of the engine: prompts are encoded with BOS, new tokens become text
pieces that never split a character, stop strings end a row as soon as its text contains one
(even when it spans several tokens), a stop string that is a control token (`<|im_end|>`)
stops at that token, and a streamed piece never shows the start of a stop string that may
still complete.

    stream(model, tokenizer, ids, cfg)          -> iterator of text pieces (one prompt)
    complete(model, tokenizer, [ids, ...], cfg) -> [Completion] (batched; beams; n samples)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from babyllama.errors import UserError
from babyllama.infer.beam import beam_search
from babyllama.infer.config import GenerationConfig
from babyllama.infer.engine import Decoder, fit_prompts
from babyllama.tokenizer.chat_template import stop_token_ids


@dataclass
class Completion:
    text: str
    ids: list[int]           # generated tokens (a stop token is not included)
    finish_reason: str       # "stop": stop token or string; "length": max_new_tokens or context
    prompt_tokens: int
    end_token: int | None = None  # the stop token that ended it (RL trains on it: see train/grpo.py)


class Detokenizer:
    """Token ids to text pieces, one token at a time. A byte-level token can hold part of a
    multi-byte character: a piece is held back until its character is complete.

    Each step decodes only the tokens since the previous piece, plus the piece before them
    as context (vLLM's incremental detokenisation): SentencePiece drops a leading space when
    decoding from a piece boundary, so the context token is decoded too and then cut off.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the last emitted piece, ids[read:] pending

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end, as U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        rest = self.tokenizer.decode(self.ids[self.prefix:])[len(before):]
        self.prefix = self.read = len(self.ids)
        return rest


class StopStrings:
    """Finds stop strings in a growing text. `push(piece)` returns the text that is safe to show
    and whether a stop string was found; text that could be the start of a stop string is held
    back until the next piece decides."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.shown = 0
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        if not self.stops:
            out, self.shown = self.text[self.shown:], len(self.text)
            return out, False
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True
            out, self.shown = self.text[self.shown:], len(self.text)
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        safe = len(self.text) - hold
        out = self.text[self.shown:safe] if safe > self.shown else ""
        self.shown = max(self.shown, safe)
        return out, False

    def flush(self) -> str:
        out, self.shown = self.text[self.shown:], len(self.text)
        return out


class TextRow:
    """One row's detokenizer and stop-string matcher together."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.detok = Detokenizer(tokenizer)
        self.stops = StopStrings(stops)

    def push(self, token: int) -> tuple[str, bool]:
        piece = self.detok.push(token)
        return self.stops.push(piece) if piece else ("", False)

    def flush(self) -> str:
        if self.stops.stopped:
            return ""
        out, _ = self.stops.push(self.detok.flush())
        return out + self.stops.flush()


def resolve_stops(tokenizer, cfg: GenerationConfig) -> GenerationConfig:
    """`cfg` with every stop string that is a control token's text (`<|im_end|>`, `</s>`) moved
    to `stop_token_ids`.

    Control tokens are never part of the decoded text (they are skipped), so as a string such
    a stop could never match: vllm-project/vllm#2123, LostRuins/koboldcpp#791. As a token id
    it ends the row the moment the model emits it, as EOS does. A stop string that holds a
    control token next to other text could never match either, so it is refused. Raises
    UserError also for a stop token id outside the vocabulary, and for any invalid setting."""
    cfg.check()
    ids = list(cfg.stop_token_ids)
    for i in ids:
        if not 0 <= i < tokenizer.vocab_size:
            raise UserError(f"stop token id {i} is outside the vocabulary (ids 0..{tokenizer.vocab_size - 1})")
    texts = []
    for s in cfg.stop:
        if s in tokenizer.control_tokens:
            ids.append(tokenizer.control_tokens[s])
            continue
        inner = tokenizer.control_pattern.search(s) if tokenizer.control_pattern else None
        if inner:
            raise UserError(f"stop string {s!r} holds the control token {inner.group()!r} with other "
                            f"text; control tokens never appear in the text, so give "
                            f"{inner.group()!r} as a stop of its own (it then stops at that token)")
        texts.append(s)
    return dataclasses.replace(cfg, stop=tuple(texts), stop_token_ids=tuple(dict.fromkeys(ids)))


def end_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that end a plain completion: the tokenizer's EOS, and for a chat model (its
    tokenizer has a chat template) the end of its turn too (`<|im_end|>`), where an SFT model
    ends its answer; the transformers export's generation_config.json stops at the same."""
    if tokenizer.chat_template:
        return stop_token_ids(tokenizer)
    return (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()


def stream(model, tokenizer, prompt_ids: list[int], cfg: GenerationConfig,
           stop_ids: tuple[int, ...] | None = None, pixel_values: torch.Tensor | None = None) -> Iterator[str]:
    """The continuation of one prompt as text pieces (beam search yields its best hypothesis
    whole, at the end). `pixel_values` (N, C, S, S): the images whose expanded positions the
    prompt holds (`infer.images.image_prompt`)."""
    stop_ids = end_ids(tokenizer) if stop_ids is None else stop_ids
    cfg = resolve_stops(tokenizer, cfg)
    if cfg.num_beams > 1 or cfg.num_return_sequences > 1:
        one = dataclasses.replace(cfg, num_return_sequences=1)
        yield complete(model, tokenizer, [prompt_ids], one, stop_ids, pixel_values)[0].text
        return
    decoder = Decoder(model, [prompt_ids], cfg, stop_ids, pixel_values)
    row = TextRow(tokenizer, cfg.stop)
    with torch.inference_mode():
        while not decoder.done:
            for _, token in decoder.step():
                piece, stopped = row.push(token)
                if piece:
                    yield piece
                if stopped:
                    decoder.finish(0, "stop")
    rest = row.flush()
    if rest:
        yield rest


@torch.inference_mode()
def complete(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig,
             stop_ids: tuple[int, ...] | None = None,
             pixel_values: torch.Tensor | None = None) -> list[Completion]:
    """Completions of every prompt, `cfg.num_return_sequences` per prompt (prompt-major).
    `pixel_values` (N, C, S, S): the images of all prompts, in order (see `stream`)."""
    stop_ids = end_ids(tokenizer) if stop_ids is None else stop_ids
    cfg = resolve_stops(tokenizer, cfg)
    if pixel_values is not None:
        if cfg.num_beams > 1:
            raise UserError("beam search does not take images; sample or decode greedily")
        # The engine checks the fit itself: a prompt with an image is never cut.
        return _complete(model, tokenizer, prompts, cfg, stop_ids, pixel_values)
    prompts = fit_prompts(prompts, model.config.max_position_embeddings, cfg)
    if cfg.num_beams > 1:
        out = []
        for prompt, hyps in zip(prompts, beam_search(model, prompts, cfg, stop_ids)):
            for h in hyps:
                text, stopped = cut_at_stop(tokenizer.decode(h.tokens), cfg.stop)
                out.append(Completion(text, h.tokens, "stop" if stopped else h.finish_reason, len(prompt)))
        return out
    return _complete(model, tokenizer, prompts, cfg, stop_ids)


def _complete(model, tokenizer, prompts, cfg, stop_ids, pixel_values=None) -> list[Completion]:
    decoder = Decoder(model, prompts, cfg, stop_ids, pixel_values)
    rows = [TextRow(tokenizer, cfg.stop) for _ in decoder.limits] if cfg.stop else None
    texts = [[] for _ in decoder.limits]
    while not decoder.done:
        for r, token in decoder.step():
            if rows is not None:
                piece, stopped = rows[r].push(token)
                texts[r].append(piece)
                if stopped:
                    decoder.finish(r, "stop")
    out = []
    for r, ids in enumerate(decoder.tokens):
        # Without stop strings the text is decoded once at the end: cheaper than piece by piece.
        text = "".join(texts[r]) + rows[r].flush() if rows is not None else tokenizer.decode(ids)
        out.append(Completion(text, ids, decoder.finish_reasons[r], decoder.prompt_lengths[r],
                              decoder.end_tokens[r]))
    return out


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A plain (non-chat) prompt: BOS and the text's tokens, as documents were trained."""
    return [tokenizer.bos_id] + tokenizer.encode(prompt)


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode for the block, then back to the mode the model was in (sampling mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def generate_text(model, tokenizer, prompt: str, cfg: GenerationConfig) -> str:
    """The prompt's continuation as text (the trainer's samples)."""
    with eval_mode(model):
        return "".join(stream(model, tokenizer, encode_prompt(tokenizer, prompt), cfg))
