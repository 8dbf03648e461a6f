"""A chat session with a running server (`babyllama chat --server URL`): the same interface as
`infer.chat.ChatSession` (send, reset, system, document), over OpenAI's streamed chat
completions. Standard library only (urllib), so a machine without the serve extra can talk to
a server elsewhere.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

from babyllama.errors import UserError
from babyllama.infer.config import GenerationConfig

# GenerationConfig fields the API takes, by their API names.
API_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k",
              "top_p": "top_p", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
              "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
              "seed": "seed", "stop": "stop"}


def api_settings(settings: dict) -> dict:
    """GenerationConfig keyword settings as API fields. Raises UserError for a setting the API
    has no field for (beam search, no-repeat-n-gram, stop token ids) when it is not its default."""
    defaults = GenerationConfig()
    out = {}
    for name, value in settings.items():
        if name in API_FIELDS:
            if name == "stop":
                value = list(value)
                if not value:
                    continue
            out[API_FIELDS[name]] = value
        elif name == "truncate" or value == getattr(defaults, name, object()) or value == ():
            continue
        else:
            raise UserError(f"{name.replace('_', '-')} is not available through a server "
                            f"(the OpenAI API has no such field)")
    return out


class RemoteChat:
    """A multi-turn conversation with the model behind `url` (the server's root, e.g.
    http://127.0.0.1:8000). When the history outgrows the model's context, the oldest
    exchanges are left out of the request, as `ChatSession` does locally."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 system: str | None = None, document: str | None = None, timeout: float = 600):
        self.url = url.rstrip("/")
        if "://" not in self.url:  # 127.0.0.1:8000, as the server prints it without the scheme
            self.url = "http://" + self.url
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.system, self.document = system, document
        self.history: list[dict] = []

    def messages(self, skip: int = 0) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history[skip:]

    def send(self, text: str, image: str | None = None, **sampling) -> Iterator[str]:
        """Stream the answer to `text`; the exchange joins the history once it is complete.
        `image`: a picture as a data URL (`llm.image_data_url(path)`), sent as OpenAI's
        `image_url` part before the text; it stays in the history (an image-text model).
        Raises UserError for an unreachable server or an error it returns."""
        body = api_settings(sampling) | {"stream": True}
        if self.model:
            body["model"] = self.model
        if self.document:
            body["document"] = self.document
        user = {"role": "user", "content": text if image is None else
                [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]}
        skip = 0
        while True:
            try:
                response = self.post(body | {"messages": self.messages(skip) + [user]})
                break
            except ContextFull:
                if skip + 2 > len(self.history):
                    raise UserError("the message (with the system prompt and template) does not fit "
                                    "the model's context; shorten it") from None
                skip += 2
        pieces = []
        with response:
            for piece in read_stream(response):
                pieces.append(piece)
                yield piece
        self.history += [user, {"role": "assistant", "content": "".join(pieces).strip()}]

    def reset(self) -> None:
        self.history = []

    def post(self, body: dict):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + "/v1/chat/completions", headers=headers,
                                         data=json.dumps(body, ensure_ascii=False).encode())
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            try:
                error = json.loads(e.read())["error"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{self.url}: HTTP {e.code} {e.reason}") from None
            if error.get("code") == "context_length_exceeded":
                raise ContextFull() from None
            raise UserError(f"{self.url}: {error.get('message')}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"cannot reach {self.url}: {reason} (is `babyllama serve` running?)") from None


class ContextFull(Exception):
    """The server found the prompt longer than the model's context."""


def read_stream(response) -> Iterator[str]:
    """The content pieces of an SSE chat-completion stream (choice 0). Raises UserError for an
    error event."""
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise UserError(f"the server failed mid-answer: {event['error'].get('message')}")
        for choice in event.get("choices", []):
            piece = choice.get("delta", {}).get("content")
            if piece and choice.get("index", 0) == 0:
                yield piece
