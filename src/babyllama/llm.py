"""`babyllama.load(path)`: a trained model with its tokenizer, ready to generate (the API of
litgpt's `LLM.load(...).generate(...)`).

    llm = babyllama.load("runs/demo/pretrain")
    llm.generate("中国", max_new_tokens=50, temperature=0.8, top_k=50)
    llm.generate(["中国", "今天"], temperature=0)            # one batch, greedy
    llm.generate("中国", num_beams=3, length_penalty=1.0)     # beam search
    for piece in llm.stream("今天", stop=["。"]):
        print(piece, end="")
    llm.chat([{"role": "user", "content": "你好"}])       # a fine-tuned (SFT) run
    llm.chat([{"role": "user", "content": "<|image|>\\n图里有什么？"}], images=["a.png"])  # an image-text run
    llm.chat([{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                           {"type": "text", "text": "图里有什么？"}]}])   # the same
    llm.evaluate("choice", "cmmlu/", limit=5).metrics    # see babyllama.eval

`path` is a run directory (config.yaml + model.safetensors + tokenizer/) or a transformers
Llama directory (config.json + model.safetensors + tokenizer files).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from babyllama.device import pick_device
from babyllama.errors import UserError
from babyllama.eval.tasks import run_task, task_options
from babyllama.infer.chat import ChatSession, chat_text, stream_chat
from babyllama.infer.config import GenerationConfig, decoding_defaults
from babyllama.infer.engine import prepare_for_decoding
from babyllama.infer.generate import Completion, complete, encode_prompt, eval_mode, stream
from babyllama.infer.images import IMAGE_PLACEHOLDER, is_vision_model, load_image_pixels
from babyllama.lora import load_adapter, read_adapter_config
from babyllama.model.llama import Llama
from babyllama.run import Run
from babyllama.tokenizer import Tokenizer

if TYPE_CHECKING:
    from babyllama.eval.report import EvalResult

class LLM:
    def __init__(self, model: Llama, tokenizer: Tokenizer, device: torch.device,
                 path: Path | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.path = path  # the run directory it was loaded from (None: built in memory)
        self.adapter: str | None = None  # the LoRA adapter in use (None: the model as loaded)

    # -- several LoRA adapters on one base, switched by name ---------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}))

    def add_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Load a LoRA run's adapter onto this model under `name` (default: the folder's name)
        and switch to it. The loaded model is the base: load the base run, then its adapters."""
        path = Path(path)
        name = name or path.name
        if name in self.adapters:
            raise UserError(f"an adapter named {name!r} is already loaded")
        if not self.adapters:
            self.model = load_adapter(self.model, path, adapter_name=name).eval()
        else:
            read_adapter_config(path)
            try:
                self.model.load_adapter(str(path), adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as e:  # peft/torch on mismatched tensors
                raise UserError(f"{path}: does not fit this base ({str(e).splitlines()[0]})") from None
        self.use_adapter(name)
        return name

    def use_adapter(self, name: str | None) -> None:
        """Switch to a loaded adapter by name; None runs the base model alone."""
        if name is None:
            if self.adapters:
                self.model.base_model.disable_adapter_layers()
        else:
            if name not in self.adapters:
                known = ", ".join(self.adapters) or "none loaded"
                raise UserError(f"no adapter named {name!r} ({known})")
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(name)
        self.model.eval()
        self.adapter = name

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "LLM":
        run = Run(path)
        config = run.model_config()
        tokenizer = run.load_tokenizer()
        model = run.load_model(config)
        dev = pick_device(device)
        model = model.to(dev)
        prepare_for_decoding(model)
        return cls(model, tokenizer, dev, run.path)

    def generate(self, prompt: str | list[str], **settings) -> str | list[str] | list[list[str]]:
        """The continuation of `prompt`; a list of prompts is generated as one batch and gives a
        list. `settings` are GenerationConfig fields: max_new_tokens, temperature (0: greedy),
        top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty,
        no_repeat_ngram_size, num_beams, length_penalty, early_stopping, num_return_sequences
        (> 1: a list of continuations per prompt), stop (strings), stop_token_ids, seed,
        truncate ("left" cuts a too-long prompt)."""
        cfg = decoding_defaults("plain", **settings)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        done = self.complete(prompts, cfg)
        n = cfg.num_return_sequences
        texts = [[c.text for c in done[i * n:(i + 1) * n]] for i in range(len(prompts))]
        texts = [t[0] if n == 1 else t for t in texts]
        return texts[0] if isinstance(prompt, str) else texts

    def complete(self, prompts: list[str], cfg: GenerationConfig) -> list[Completion]:
        """Completions with their token ids and finish reasons (prompt-major when n > 1).
        Raises UserError unless `prompts` is a non-empty list of strings."""
        if not isinstance(prompts, (list, tuple)) or not prompts \
                or not all(isinstance(p, str) for p in prompts):
            raise UserError(f"prompts must be a string or a non-empty list of strings, got {prompts!r:.80}")
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        return complete(self.model, self.tokenizer, ids, cfg)

    def stream(self, prompt: str, **settings) -> Iterator[str]:
        """Yield the continuation piece by piece; a piece never ends inside a multi-byte
        character (byte-level tokens can split one across two tokens) nor shows part of a stop
        string. `settings`: as for `generate`."""
        cfg = decoding_defaults("plain", **settings)
        if not isinstance(prompt, str):
            raise UserError(f"the prompt must be a string, got {prompt!r:.80}")
        yield from stream(self.model, self.tokenizer, encode_prompt(self.tokenizer, prompt), cfg)

    @property
    def is_vision(self) -> bool:
        """Whether the model reads images (an image-text run: `babyllama align` / `instruct`)."""
        return is_vision_model(self.model)

    def image_pixels(self, image) -> torch.Tensor:
        """`image` as this model's encoder reads it: float32 (C, S, S). `image`: a file path, a
        PIL image, the bytes of an image file, or pixel values (C, S, S) (passed through).
        Raises UserError for a text model, a missing or unreadable image, a wrong tensor shape."""
        return image_pixels(self.model, image)

    def chat(self, messages: list[dict], document: str | None = None, images: list | None = None,
             **settings) -> str:
        """The assistant's answer to `messages` ([{"role": "system"|"user"|"assistant",
        "content": ...}], ending with the user's), rendered with the run's chat template;
        `document` is a reference passage to answer about (a 资料 passage, as in grounded-dialogue data). `settings`: as for
        `generate`, with chat defaults (max_new_tokens 200, temperature 0.7, top_k 50,
        repetition_penalty 1.1).

        Images (an image-text run): `images` (file paths, PIL images, image bytes or (C, S, S)
        pixel values) belong, in order, to the `<|image|>` placeholders in the contents; a
        content may also be a list of parts, transformers' convention: `{"type": "image",
        "image": path_or_PIL}` (or "path"/"url" for a file, or OpenAI's `{"type": "image_url",
        "image_url": {"url": "data:image/png;base64,..."}}`) and `{"type": "text", "text": ...}`.
        A message's images go before its text, `<|image|>\\n` each, where the training data
        puts them (`data/llava.py`). Raises UserError for images given to a text model, a
        count that does not match the placeholders, or an unreadable image."""
        cfg = decoding_defaults("chat", **settings)
        messages, pixels = chat_inputs(self.model, messages, images)
        return chat_text(self.model, self.tokenizer, messages, cfg, document=document, images=pixels)

    def stream_chat(self, messages: list[dict], document: str | None = None, images: list | None = None,
                    **settings) -> Iterator[str]:
        """`chat`'s answer piece by piece (a piece never ends inside a character nor shows part
        of a stop string); arguments as for `chat`."""
        cfg = decoding_defaults("chat", **settings)
        messages, pixels = chat_inputs(self.model, messages, images)
        with eval_mode(self.model):
            yield from stream_chat(self.model, self.tokenizer, messages, cfg, document=document, images=pixels)

    def evaluate(self, task: str, data: str, **options) -> "EvalResult":
        """Run an evaluation task ("lm", "rouge", "choice", "generation") on `data`, as
        `babyllama eval` does; `options` are the task's fields (limit, shots, template, chat,
        generation={...}, ...). Prompts use the chat template by default for an SFT run.
        Returns the EvalResult (`.metrics`, `.table()`, `.examples`); nothing is written."""
        chat = Run(self.path).chats() if self.path is not None else False
        name, opts = task_options({"task": task, "data": str(data), **options}, "evaluate",
                                  chat=chat)
        return run_task(name, self.model, self.tokenizer, opts)

    def chat_session(self, system: str | None = None, document: str | None = None) -> ChatSession:
        """A multi-turn conversation: `session.send(text, **sampling)` streams each answer;
        `session.send(text, image=llm.image_pixels(path))` asks about a picture (an image-text
        run), which stays in the conversation."""
        return ChatSession(self.model, self.tokenizer, system=system, document=document)


def load(path: str | Path, device: str = "auto") -> LLM:
    return LLM.load(path, device)


# -- images -------------------------------------------------------------------------------------

# The largest image file accepted from memory (bytes or a data URL): photos are a few MB.
MAX_IMAGE_BYTES = 10 * 1024 * 1024


def image_pixels(model, image, name: str = "the image") -> torch.Tensor:
    """`image` as `model`'s encoder reads it, float32 (C, S, S): a file path (str or Path), a PIL
    image, the bytes of an image file, or pixel values (C, S, S) passed through. `name` names
    an in-memory image in errors. Raises UserError (one line) for a text model, a missing,
    corrupt or oversized image, a tensor of the wrong shape, or another type."""
    from PIL import Image

    from babyllama.data.images import ImageProcessing, pixel_values

    if not is_vision_model(model):
        raise UserError("this model reads no images (it is a text model); chat about pictures with an "
                        "image-text run (`babyllama align`, then `babyllama instruct`)")
    v = model.vlm_config.vision
    if isinstance(image, (str, Path)):
        return load_image_pixels(model, image)
    if isinstance(image, torch.Tensor):
        expected = (v.num_channels, v.image_size, v.image_size)
        if tuple(image.shape) != expected:
            raise UserError(f"{name}: pixel values of shape {tuple(image.shape)}; the encoder reads "
                            f"{expected} (give a path or a PIL image to have it resized)")
        return image.float()
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = open_image_bytes(bytes(image), name)
    if isinstance(image, Image.Image):
        return pixel_values(image, ImageProcessing(v.image_size, tuple(v.image_mean), tuple(v.image_std)))
    raise UserError(f"{name}: an image must be a file path, a PIL image, image bytes or pixel values, "
                    f"got {type(image).__name__}")


def open_image_bytes(data: bytes, name: str = "the image") -> Any:
    """The PIL image an image file's `data` holds, decoded in full; UserError "NAME: problem" as
    `data.images.open_image` gives for a file (not an image, damaged, too large)."""
    from PIL import Image

    from babyllama.data.images import MAX_PIXELS

    if len(data) > MAX_IMAGE_BYTES:
        raise UserError(f"{name}: {len(data):,} bytes is larger than the {MAX_IMAGE_BYTES:,} bytes an "
                        f"image may have")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise UserError(f"{name}: image of {width}x{height} pixels is too large (more than "
                                f"{MAX_PIXELS:,} pixels; a decompression bomb?)")
            image.load()
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{name}: image is too large to decode safely") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"{name}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UserError(f"{name}: unreadable image: {' '.join(str(e).split()) or type(e).__name__}") from None


def data_url_bytes(url: str, name: str = "the image") -> bytes:
    """The bytes of a base64 `data:` URL (`data:image/png;base64,...`). Raises UserError for any
    other URL (an http(s) URL: nothing is ever downloaded), a data URL that is not base64, bad
    base64, or more than MAX_IMAGE_BYTES."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url[:12] else "a path"
        raise UserError(f"{name}: only data URLs (data:image/png;base64,...) are accepted, got {scheme} "
                        f"({url[:40]!r}); images are never downloaded: send the file's bytes base64-encoded")
    head, comma, payload = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise UserError(f"{name}: the data URL must be base64 (data:image/...;base64,...), got {head[:40]!r}")
    if len(payload) > (MAX_IMAGE_BYTES + 2) // 3 * 4 + 4:
        raise UserError(f"{name}: the image is larger than the {MAX_IMAGE_BYTES:,} bytes an image may have")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise UserError(f"{name}: the data URL's base64 is invalid ({e})") from None


def image_data_url(path: str | Path) -> str:
    """The file at `path` as a base64 data URL (what the server's `image_url` takes). Raises
    UserError for a missing file or one over MAX_IMAGE_BYTES (its content is not checked)."""
    import mimetypes

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file" if not path.exists() else f"{path}: not a file")
    data = path.read_bytes()
    if len(data) > MAX_IMAGE_BYTES:
        raise UserError(f"{path}: {len(data):,} bytes is larger than the {MAX_IMAGE_BYTES:,} bytes an image may have")
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def content_parts(content: list, where: str) -> tuple[str, list]:
    """A content given as parts -> (its text with one `<|image|>` per image, the images as given).
    Parts: {"type": "text", "text": str}; {"type": "image", "image"|"path"|"url": ...} (a path, a
    PIL image, bytes, pixel values or a data URL); {"type": "image_url", "image_url": {"url":
    "data:..."}} (OpenAI's). Images go first, `<|image|>\\n` each, then the texts joined, as
    the training data places a picture (`data/llava.py`). Raises UserError naming `where`."""
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        here = f"{where}.content[{j}]"
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image":
            image = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
            if image is None:
                raise UserError(f"{here}: an image part needs 'image' (a path or a PIL image), 'path' or 'url'")
            if isinstance(image, str) and ":" in image[:12] and not Path(image).exists():
                image = data_url_bytes(image, here)  # a data URL; http(s) is refused there
            images.append(image)
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise UserError(f"{here}: an image_url part needs image_url.url (a data URL)")
            images.append(data_url_bytes(url, here))
        else:
            raise UserError(f"{here}: a content part must be {{'type': 'text', 'text': str}} or an image "
                            f"part ('image' or 'image_url'), got {part!r:.80}")
    head = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images)
    text = "".join(texts)
    return (head + text) if text else head.rstrip("\n"), images


def chat_inputs(model, messages: list[dict], images: list | None = None) -> tuple[list[dict], list[torch.Tensor]]:
    """(`messages` with every content a string, the pixel values of their images in reading
    order): contents given as parts (`content_parts`) bring their own images; `<|image|>`
    placeholders in string contents take the next of `images`. Raises UserError when the
    images and placeholders do not pair up, an image sits outside a user message, or an image
    cannot be read (`image_pixels`)."""
    if not isinstance(messages, list):
        return messages, []  # infer.chat.check_messages says what is wrong
    given = list(images or [])
    out, ordered, taken = [], [], 0
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            text, own = content_parts(content, f"message {i}")
            m = {**m, "content": text}
            ordered += [(f"message {i}'s image {k + 1}", image) for k, image in enumerate(own)]
        elif isinstance(content, str):
            # A text model's tokenizer may have no image token: there the text is only text.
            n = content.count(IMAGE_PLACEHOLDER) if given or is_vision_model(model) else 0
            if taken + n > len(given):
                raise UserError(f"the messages hold more {IMAGE_PLACEHOLDER} placeholders than the "
                                f"{len(given)} image(s) given")
            ordered += [(f"image {taken + k + 1}", given[taken + k]) for k in range(n)]
            taken += n
        else:
            out.append(m)
            continue
        if ordered and m["content"].count(IMAGE_PLACEHOLDER) and m.get("role") != "user":
            raise UserError(f"message {i} ({m.get('role')}): images belong in user messages")
        out.append(m)
    if taken < len(given):
        raise UserError(f"{len(given)} image(s) given for {taken} {IMAGE_PLACEHOLDER} placeholder(s) in "
                        f"the messages' contents")
    return out, [image_pixels(model, image, name) for name, image in ordered]
