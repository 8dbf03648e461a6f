"""The HTTP side: OpenAI's chat completions and completions endpoints (plain JSON or SSE
streams), `/v1/models`, `/health`, `/props` and the chat page at `/`.

Semantics follow OpenAI's API as vLLM's and llama.cpp's servers implement it: the first
streamed chunk of a choice carries the role, every chunk the same id, a choice's last chunk its
finish_reason, an optional usage chunk with no choices, then `data: [DONE]`. Every error is
OpenAI's error object; a mistake in a request is a 4xx found before the first byte of a
stream, and a fault after streaming started is sent as a `data: {"error": ...}` event.

Images (an image-text run): a user message's content may hold OpenAI's `image_url` parts with
base64 data URLs (never a URL to download); each picture is decoded and checked before the
request is queued, its `<|image|>` positions expanded, and its pixel values travel with the
request to its prefill (`Scheduler` prefills the admitted requests' images together, in row
order). A text model given an image, a URL that is not a data URL, an image over 10 MB or an
unreadable one: 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import fields
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from babyllama.errors import UserError
from babyllama.textfile import read_text
from babyllama.infer.config import GenerationConfig, decoding_defaults
from babyllama.infer.generate import encode_prompt, end_ids
from babyllama.infer.images import IMAGE_PLACEHOLDER, image_prompt, is_vision_model
from babyllama.infer.scheduler import Event, Request, TokenLogprob
from babyllama.llm import image_pixels
from babyllama.serve.protocol import APIError, ChatRequest, CompletionRequest, parse
from babyllama.serve.worker import EngineThread, Handle
from babyllama.tokenizer.chat_template import encode_chat, stop_token_ids

# A chat request is a few KB; 1 MiB leaves room for long documents and refuses a runaway upload.
MAX_BODY_BYTES = 1 << 20
# An image-text model's requests carry base64 pictures (each up to llm.MAX_IMAGE_BYTES, 4/3 of
# that as base64): its default limit.
MAX_IMAGE_BODY_BYTES = 32 << 20
# The chat page: package data next to this module (pyproject.toml's package-data).
PAGE = Path(__file__).with_name("chat.html")
# A client that stops sending its body mid-way is let go after this long (each holds a socket).
BODY_TIMEOUT_S = 30.0
# How often a non-streamed request checks that its client is still there.
DISCONNECT_POLL_S = 0.5


def sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Gate:
    """ASGI middleware in front of the API: the API key (401), and a body-size limit (413)
    enforced while the body arrives, so a huge upload is refused before it is all read."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.api_key, self.max_body, self.body_timeout = app, api_key, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.api_key is not None:
            headers = dict(scope["headers"])
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            # The scheme's name is case-insensitive (RFC 7235); the key is not.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                       self.api_key.encode()):
                error = APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                 type="authentication_error", code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self.too_large(scope, receive, send)
        body, more = bytearray(), True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                error = APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                                 code="request_timeout")
                return await error_response(error)(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await self.too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        error = APIError(413, f"the request body is larger than {self.max_body} bytes",
                         code="request_too_large")
        return await error_response(error)(scope, receive, send)


def create_app(engine: EngineThread, *, model_name: str | None = None, api_key: str | None = None,
               max_body_bytes: int | None = None, body_timeout_s: float = BODY_TIMEOUT_S) -> Gate:
    """The server's FastAPI app around a (started or not) `engine`. `max_body_bytes` defaults
    to MAX_BODY_BYTES, or MAX_IMAGE_BODY_BYTES for an image-text run (pictures travel in the body)."""
    name = model_name or Path(engine.run).resolve().name
    if max_body_bytes is None:
        max_body_bytes = MAX_IMAGE_BODY_BYTES if reads_images(engine.run) else MAX_BODY_BYTES
    if name in engine.adapter_dirs:
        raise UserError(f"--adapter {name}: the served run is already model {name!r}; give the adapter "
                        "another name (or the run one with --model-name)")

    @contextlib.asynccontextmanager
    async def lifespan(_):
        # The model loads on the engine thread while the server already answers (/health: 503).
        if not engine.thread.is_alive() and not engine.ready.is_set() and engine.error is None:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="babyllama", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return error_response(APIError(400, str(e.errors()[:1])))

    @app.exception_handler(Exception)
    async def server_fault(_, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    def require_ready() -> None:
        if engine.status != "ok":
            raise APIError(503, f"the model is {engine.status}" + (f": {engine.error}" if engine.error else ""),
                           type="server_error", code="model_" + engine.status)

    def adapter_of(requested: str | None) -> str | None:
        if requested is None or requested == name:
            return None
        if requested in engine.adapter_dirs:
            return requested
        known = ", ".join([name, *engine.adapter_dirs])
        raise APIError(404, f"the model {requested!r} does not exist (served: {known})",
                       param="model", code="model_not_found")

    def start(prompt: list[int], cfg: GenerationConfig, stop_ids: tuple[int, ...],
              logprobs: int | None, adapter: str | None, pixel_values=None) -> Handle:
        context = engine.context
        if len(prompt) >= context:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; the model's context is {context} "
                                f"tokens, and at least one must be left for the answer",
                           param="messages", code="context_length_exceeded")
        try:
            request = engine.scheduler.check(Request(prompt, cfg, stop_ids, logprobs, pixel_values=pixel_values))
        except UserError as e:
            raise APIError(400, str(e)) from None
        return engine.submit(request, adapter)

    @app.get("/health")
    async def health():
        status = engine.status
        body = {"status": status} | ({"message": engine.error} if engine.error else {})
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        created = int(Path(engine.run).stat().st_mtime) if Path(engine.run).exists() else 0
        data = [{"id": n, "object": "model", "created": created, "owned_by": "babyllama"}
                for n in [name, *engine.adapter_dirs]]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        adapter_of(model_id)  # 404 for a model not served
        return next(m for m in (await models())["data"] if m["id"] == model_id)

    @app.get("/props")
    async def props():
        """What the chat page needs: the model's name and context and the chat defaults
        (llama.cpp's server has the same endpoint for its web page)."""
        require_ready()
        chat = decoding_defaults("chat")
        settings = {f.name: getattr(chat, f.name) for f in fields(GenerationConfig)
                    if f.name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                  "max_new_tokens")}
        return {"model": name, "models": [name, *engine.adapter_dirs], "context": engine.context,
                "api_key_required": api_key is not None, "default_generation_settings": settings}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(read_text(PAGE))

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = parse(await http.body(), ChatRequest)
        require_ready()
        adapter = adapter_of(body.model)
        cfg = body.generation_config("chat", body.max_new_tokens())
        messages = [m.as_dict() for m in body.messages]
        tokenizer = engine.llm.tokenizer
        images = body.images()
        if images and not is_vision_model(engine.llm.model):
            raise APIError(400, f"the model {body.model or name!r} reads no images (it is a text model); "
                                f"send text only, or serve an image-text run", param="messages",
                           code="images_not_supported")
        try:
            prompt = encode_chat(tokenizer, messages, document=body.document, add_generation_prompt=True).ids
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        pixel_values = None
        if is_vision_model(engine.llm.model):
            prompt, pixel_values = await asyncio.to_thread(image_request, engine.llm.model, prompt, images)
        handle = start(prompt, cfg, stop_token_ids(tokenizer), body.top(), adapter, pixel_values)
        include_usage = body.include_usage()
        response = Response(handle, "chatcmpl", body.model or name, chat=True)
        if body.stream:
            return stream_response(engine, handle, response.chunks(include_usage))
        return await whole_response(engine, http, handle, response)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = parse(await http.body(), CompletionRequest)
        require_ready()
        adapter = adapter_of(body.model)
        cfg = body.generation_config("plain", body.max_tokens)
        tokenizer = engine.llm.tokenizer
        handle = start(encode_prompt(tokenizer, body.text()), cfg, end_ids(tokenizer), body.logprobs, adapter)
        include_usage = body.include_usage()
        response = Response(handle, "cmpl", body.model or name, chat=False)
        if body.stream:
            return stream_response(engine, handle, response.chunks(include_usage))
        return await whole_response(engine, http, handle, response)

    return Gate(app, api_key, max_body_bytes, body_timeout_s)


def reads_images(run: str | Path) -> bool:
    """Whether `run` is an image-text run (False when it cannot be read: loading says why)."""
    from babyllama.run import Run

    try:
        return Run(run).is_vision()
    except (UserError, OSError):
        return False


def image_request(model, prompt: list[int], images: list[tuple[str, bytes]]):
    """(the prompt with its image positions expanded, the images' pixel values or None), for an
    image-text `model`. APIError 400 for an unreadable image, or images that do not pair up
    with the prompt's `<|image|>` placeholders (a placeholder typed into a string content
    counts). Runs off the event loop: decoding pictures takes milliseconds each."""
    pixels = []
    for where, data in images:
        try:
            pixels.append(image_pixels(model, data, where))
        except UserError as e:
            raise APIError(400, str(e), param="messages", code="invalid_image") from None
    n = sum(1 for t in prompt if t == model.vlm_config.image_token_id)
    if n != len(pixels):
        raise APIError(400, f"the messages hold {n} {IMAGE_PLACEHOLDER} placeholder(s) for {len(pixels)} "
                            f"image(s): send each picture as an image_url part", param="messages")
    return image_prompt(model, prompt, pixels)


class Response:
    """One request's answer, built up from its events: the whole JSON body or SSE chunks."""

    def __init__(self, handle: Handle, prefix: str, model: str, chat: bool):
        self.handle, self.model, self.chat = handle, model, chat
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        n = handle.request.cfg.num_return_sequences
        self.texts = [[] for _ in range(n)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n
        self.offset = [0] * n   # characters covered by the log-probs sent so far, per choice

    @property
    def done(self) -> bool:
        return all(self.finish)

    def add(self, event: Event) -> None:
        self.texts[event.index].append(event.text)
        self.logprobs[event.index] += event.logprobs
        self.tokens[event.index] = event.completion_tokens
        if event.finish_reason:
            self.finish[event.index] = event.finish_reason

    def usage(self) -> dict:
        prompt = len(self.handle.request.prompt)
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs_json(self, index: int, entries: list[TokenLogprob]) -> dict | None:
        """OpenAI's log-probs of `entries`, the next tokens of choice `index`: the chat
        format, or the legacy completions one (whose text offsets count from the start of
        the choice's text)."""
        if self.handle.request.logprobs is None:
            return None
        if self.chat:
            return {"content": [{"token": e.text, "logprob": e.logprob, "bytes": list(e.text.encode()),
                                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                                  for t, v in e.top]} for e in entries]}
        offsets = []
        for e in entries:
            offsets.append(self.offset[index])
            self.offset[index] += len(e.text)
        return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}

    def body(self) -> dict:
        choices = []
        for i, texts in enumerate(self.texts):
            text = "".join(texts)
            choice = {"index": i}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice["logprobs"] = self.logprobs_json(i, self.logprobs[i])
            choice["finish_reason"] = self.finish[i]
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict], usage: dict | None = None, include_usage: bool = False) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            obj["usage"] = usage
        return sse(obj)

    async def chunks(self, include_usage: bool):
        """The SSE stream (an async generator of bytes); ends with [DONE]."""
        n = len(self.texts)
        if self.chat:
            for i in range(n):
                yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}], include_usage=include_usage)
        while not self.done:
            item = await self.handle.queue.get()
            if isinstance(item, APIError):
                yield sse(item.body())
                yield sse("[DONE]")
                return
            self.add(item)
            if not item.text and not item.finish_reason and not item.logprobs:
                continue
            choice = {"index": item.index}
            if self.chat:
                choice["delta"] = {"content": item.text} if item.text else {}
            else:
                choice["text"] = item.text
            choice["logprobs"] = self.logprobs_json(item.index, item.logprobs) if item.logprobs else None
            choice["finish_reason"] = item.finish_reason
            yield self.chunk([choice], include_usage=include_usage)
        if include_usage:
            yield self.chunk([], self.usage(), include_usage=True)
        yield sse("[DONE]")


def stream_response(engine: EngineThread, handle: Handle, chunks) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            # Reached on completion too, where it is a no-op; on a disconnect the stream is
            # cancelled here and the request's rows leave the batch at the next step.
            engine.cancel(handle)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def whole_response(engine: EngineThread, http: HTTPRequest, handle: Handle,
                         response: Response) -> JSONResponse:
    try:
        while not response.done:
            try:
                item = await asyncio.wait_for(handle.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            if isinstance(item, APIError):
                raise item
            response.add(item)
    finally:
        engine.cancel(handle)
    return JSONResponse(response.body())
