"""The OpenAI API's request bodies (chat completions and completions) as pydantic models, read
the way OpenAI's own server reads them: strict types (a string is not a number), OpenAI's
ranges, and an OpenAI-shaped error, `{"error": {"message", "type", "param", "code"}}`, for
anything wrong. Extra sampling fields are those vLLM accepts (`top_k`, `min_p`,
`repetition_penalty`); unknown fields are ignored with a log line, as vLLM does, since apps
send fields of newer API versions. Fields that would change the answer in ways we cannot
(tools, JSON mode, logit bias, echo) are refused rather than ignored.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from babyllama.errors import UserError
from babyllama.infer.config import SEED_MAX, SEED_MIN, GenerationConfig, decoding_defaults
from babyllama.infer.images import IMAGE_PLACEHOLDER
from babyllama.llm import data_url_bytes

log = logging.getLogger("babyllama.serve")

Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    """An error the client gets as OpenAI's error object with HTTP `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class Sampling(BaseModel):
    """The fields both endpoints share."""
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stop: StrictStr | list[StrictStr] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    # vLLM's extra sampling fields (-1 or 0 turn top-k off, as in vLLM).
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=10)] | None = None
    user: StrictStr | None = None
    logit_bias: dict[str, Any] | None = None

    def generation_config(self, kind: str, max_tokens: int | None) -> GenerationConfig:
        """These settings over the DECODING_DEFAULTS row `kind` ("chat" or "plain"): the
        defaults a request leaves out are the model's own, as vLLM applies a model's
        generation_config.json (our transformers export writes the same rows there)."""
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        settings: dict[str, Any] = {}
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed",
                     "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                settings[name] = value
        if self.top_k is not None:
            settings["top_k"] = max(self.top_k, 0)
        if max_tokens is not None:
            settings["max_new_tokens"] = max_tokens
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if any(not s for s in stops):
                raise APIError(400, "stop strings must not be empty", param="stop")
            if stops:
                settings["stop"] = tuple(stops)
        settings["num_return_sequences"] = self.n
        try:
            return decoding_defaults(kind, **settings)
        except UserError as e:
            raise APIError(400, str(e)) from None

    def include_usage(self) -> bool:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        return bool(self.stream_options and self.stream_options.include_usage)

    def ignored(self) -> list[str]:
        return sorted(self.model_extra or {})


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: StrictStr
    detail: StrictStr | None = None  # OpenAI's resolution hint; our encoder has one size


class ImagePart(BaseModel):
    """OpenAI's image part: `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`
    (only data URLs: the server never downloads)."""
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # OpenAI's newer name for the system role is "developer".
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[Part]
    name: StrictStr | None = None

    def image_urls(self) -> list[str]:
        return [] if isinstance(self.content, str) else \
            [p.image_url.url for p in self.content if isinstance(p, ImagePart)]

    def as_dict(self) -> dict:
        """The message as the chat template takes it: a content of parts becomes a string,
        its images first (`<|image|>\\n` each, as `LLM.chat` places them), then its texts."""
        if isinstance(self.content, str):
            text = self.content
        else:
            head = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in self.image_urls())
            body = "".join(p.text for p in self.content if isinstance(p, TextPart))
            text = head + body if body else head.rstrip("\n")
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    # Grounded chat: a reference passage the chat template puts before the conversation.
    document: StrictStr | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None

    def check(self) -> None:
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise APIError(400, f"{name} (function calling) is not supported", param=name)
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format other than text is not supported",
                           param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if self.messages[-1].role != "user":
            raise APIError(400, "the last message must be the user's", param="messages")
        for i, m in enumerate(self.messages):
            if m.image_urls() and m.role != "user":
                raise APIError(400, f"messages[{i}]: images belong in user messages", param="messages")
            for j, url in enumerate(m.image_urls()):
                if not url.startswith("data:"):
                    raise APIError(400, f"messages[{i}]: image {j + 1} is not a data URL ({url[:40]!r}): the "
                                        f"server never downloads images; send the file base64-encoded as "
                                        f"data:image/png;base64,...", param="messages", code="image_url_not_data")

    def images(self) -> list[tuple[str, bytes]]:
        """The image files of the messages, in reading order, as (where, bytes): decoded data
        URLs. APIError 400 for a URL that is not base64 data, or an image over
        `llm.MAX_IMAGE_BYTES`."""
        out = []
        for i, m in enumerate(self.messages):
            for j, url in enumerate(m.image_urls()):
                where = f"messages[{i}] image {j + 1}"
                try:
                    out.append((where, data_url_bytes(url, where)))
                except UserError as e:
                    raise APIError(400, str(e), param="messages", code="invalid_image") from None
        return out

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top(self) -> int | None:
        """The log-prob alternatives per token, or None when log-probs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: StrictStr | list[StrictStr]
    # The legacy API's log-probs: the number of alternatives per token (0-5).
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def check(self) -> None:
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of is not supported (use n)", param="best_of")
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise APIError(400, "give one prompt per request (a list must hold exactly one string)",
                           param="prompt")

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


FIELD_NAMES = {name for m in (ChatRequest, CompletionRequest, Message, TextPart, ImagePart, ImageURL, StreamOptions)
               for name in m.model_fields}


def parse(body: bytes, model: type[Sampling]) -> Sampling:
    """Validate a request body; APIError(400) naming the field and the problem."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise APIError(400, f"the body is not valid JSON{where}: {getattr(e, 'msg', e)}") from None
    except RecursionError:
        raise APIError(400, "the body is nested too deeply to be a request") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}")
    # OpenAI's API takes null for any optional field as "the default", and clients send it.
    data = {key: value for key, value in data.items() if value is not None}
    try:
        # JSON's \ud800 escapes can spell a lone UTF-16 surrogate, which is not text: refused
        # here, before a tokenizer meets it.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.end].encode("unicode_escape").decode()
        raise APIError(400, f"the body holds a lone UTF-16 surrogate ({bad}), which is not text") from None
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        message, field = describe(e.errors())
        raise APIError(400, message, param=field) from None
    if request.ignored():
        log.info("ignored request fields: %s", ", ".join(request.ignored()))
    request.check()
    return request


def describe(errors: list[dict]) -> tuple[str, str]:
    """pydantic's errors as (`field: problem (got value)` for up to three fields, the first
    field). A union's alternatives fold into one line: "should be a valid string or list"."""
    by_field: dict[str, list[dict]] = {}
    for err in errors:
        # Union branches and constraint wrappers appear in the location; the user's field does not have them.
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, str) or p in FIELD_NAMES)
        by_field.setdefault(loc or "body", []).append(err)
    lines = []
    for loc, errs in list(by_field.items())[:3]:
        msgs = list(dict.fromkeys(e["msg"] for e in errs))
        valid = "Input should be a valid "
        if len(msgs) > 1 and all(m.startswith(valid) for m in msgs):
            msgs = [valid + " or ".join(m[len(valid):] for m in msgs)]
        err = errs[0]
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'), ensure_ascii=False)[:60]})"
        lines.append(f"{loc}: {'; '.join(msgs)}{got}")
    return "; ".join(lines), next(iter(by_field))
