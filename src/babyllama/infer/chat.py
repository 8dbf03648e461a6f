"""Chat on top of the generation engine: render the history with the model's chat template,
fit it into the context (oldest turns dropped first), stream the answer.

The prompt is encoded by the same `encode_chat` that built the SFT examples, so the model sees
at inference exactly the token prefix it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from babyllama.errors import UserError
from babyllama.infer.config import GenerationConfig, decoding_defaults
from babyllama.infer.engine import prompt_budget
from babyllama.infer.generate import eval_mode, stream
from babyllama.infer.images import IMAGE_PLACEHOLDER, image_positions, image_prompt, is_vision_model
from babyllama.tokenizer.chat_template import encode_chat, fit_chat, stop_token_ids


def split_system(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(leading system messages, the rest)."""
    k = 0
    while k < len(messages) and messages[k].get("role") == "system":
        k += 1
    return list(messages[:k]), list(messages[k:])


def check_messages(messages: list[dict]) -> None:
    if not messages:
        raise UserError("chat: no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                or m.get("role") not in ("system", "user", "assistant"):
            raise UserError(f"chat: message {i} must be {{'role': system|user|assistant, "
                            f"'content': str}}, got {m!r}")
    if messages[-1]["role"] != "user":
        raise UserError("chat: the last message must be the user's")


def prompt_ids(tokenizer, messages: list[dict], *, budget: int, limit: int | None = None,
               document: str | None = None, template: str | None = None) -> tuple[list[int], int]:
    """The generation prompt for `messages` and how many earlier messages were dropped.

    History is shortened to `budget` tokens (oldest exchanges first, then the document: the
    shortening SFT examples get). When even the last exchange exceeds the budget but fits
    `limit` (the context less one token for the answer), it is kept alone: a message that fits
    the context is answered, with less room for the answer, never refused."""
    fitted = fit_chat(tokenizer, messages, budget, document=document, add_generation_prompt=True,
                      template=template)
    last = split_system(messages)[0] + messages[-1:]
    if fitted is None and limit is not None and limit > budget:
        fitted = fit_chat(tokenizer, last, limit, document=document, add_generation_prompt=True,
                          template=template)
        if fitted is not None:
            enc, _, shortened = fitted
            fitted = enc, len(messages) - len(last), shortened
    if fitted is None:
        n = len(encode_chat(tokenizer, last, add_generation_prompt=True, template=template).ids)
        room = max(budget, limit or 0)
        raise UserError(f"chat: the last message (with the system prompt and template) is {n} "
                        f"tokens; the prompt can take at most {room} (shorten it)")
    enc, dropped, _ = fitted
    return enc.ids, dropped


def stream_chat(model, tokenizer, messages: list[dict], cfg: GenerationConfig, *,
                document: str | None = None, template: str | None = None,
                images: list[torch.Tensor] | None = None) -> Iterator[str]:
    """The assistant's answer to `messages` as text pieces. `images` (each (C, S, S)) belong,
    in order, to the `<|image|>` placeholders in the messages' contents; when the oldest turns
    are dropped to fit the context, their images go with them."""
    check_messages(messages)
    context = model.config.max_position_embeddings
    images = list(images or [])
    # Each image takes K positions for its one placeholder token: the text's share shrinks.
    reserved = (image_positions(model) - 1) * len(images) if images else 0
    budget = prompt_budget(context, cfg.max_new_tokens) - reserved
    if images and budget < 1:
        raise UserError(f"chat: {len(images)} image(s) of {image_positions(model)} positions leave no room "
                        f"for text in a context of {context}")
    ids, _ = prompt_ids(tokenizer, messages, budget=budget, limit=context - 1 - reserved,
                        document=document, template=template)
    if images:
        kept = sum(1 for t in ids if t == model.vlm_config.image_token_id)
        images = images[len(images) - kept:] if kept <= len(images) else images
    ids, pixel_values = image_prompt(model, ids, images)
    yield from stream(model, tokenizer, ids, cfg, stop_ids=stop_token_ids(tokenizer), pixel_values=pixel_values)


def chat_text(model, tokenizer, messages: list[dict], cfg: GenerationConfig, *,
              document: str | None = None, template: str | None = None,
              images: list[torch.Tensor] | None = None) -> str:
    with eval_mode(model):
        return "".join(stream_chat(model, tokenizer, messages, cfg, document=document,
                                   template=template, images=images)).strip()


def chat_sample(model, tokenizer, prompt: str, cfg: GenerationConfig) -> str:
    """One-turn answer to `prompt`: the trainer's sample function for SFT runs. A prompt too
    long for a small context is reported in the samples rather than ending the run."""
    try:
        return chat_text(model, tokenizer, [{"role": "user", "content": prompt}], cfg)
    except UserError as e:
        return f"(no sample: {e})"


@dataclass
class ChatSession:
    """A multi-turn conversation: the history grows with each exchange; the oldest turns fall
    out of the prompt when the context is full (they stay in `history`)."""
    model: object
    tokenizer: object
    system: str | None = None
    document: str | None = None
    history: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)  # pixel values of the history's images, in order

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def send(self, text: str, image: torch.Tensor | None = None, **sampling) -> Iterator[str]:
        """Stream the answer to `text` (`sampling`: GenerationConfig fields over the chat
        defaults); the exchange joins the history once it is complete. `image` (C, S, S), for an
        image-text model: the picture this message is about (placed before the text, as LLaVA's
        data places it); it stays in the conversation."""
        cfg = decoding_defaults("chat", **sampling)
        content = text if image is None else f"{IMAGE_PLACEHOLDER}\n{text}"
        images = self.images + ([image] if image is not None else [])
        if image is not None and not is_vision_model(self.model):
            raise UserError("this model reads no images (it is a text model)")
        pending = self.messages() + [{"role": "user", "content": content}]
        pieces = []
        with eval_mode(self.model):
            for piece in stream_chat(self.model, self.tokenizer, pending, cfg, document=self.document,
                                     images=images):
                pieces.append(piece)
                yield piece
        self.history += [{"role": "user", "content": content},
                         {"role": "assistant", "content": "".join(pieces).strip()}]
        self.images = images

    def reset(self) -> None:
        self.history = []
        self.images = []
