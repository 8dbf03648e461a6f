"""`babyllama.load(path)`: a trained model with its tokenizer, ready to generate (the API of
litgpt's `LLM.load(...).generate(...)`).

    llm = babyllama.load("runs/demo/pretrain")
    llm.generate("中国", max_new_tokens=50, temperature=0.8, top_k=50)
    llm.generate(["中国", "今天"], temperature=0)            # one batch, greedy
    llm.generate("中国", num_beams=3, length_penalty=1.0)     # beam search
    for piece in llm.stream("今天", stop=["。"]):
        print(piece, end="")
    llm.chat([{"role": "user", "content": "你好"}])       # a fine-tuned (SFT) run
    llm.evaluate("choice", "cmmlu/", limit=5).metrics    # see babyllama.eval

`path` is a run directory (config.yaml + model.safetensors + tokenizer/) or a transformers
Llama directory (config.json + model.safetensors + tokenizer files).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from babyllama.device import pick_device
from babyllama.errors import UserError
from babyllama.eval.tasks import run_task, task_options
from babyllama.infer.chat import ChatSession, chat_text
from babyllama.infer.config import GenerationConfig, decoding_defaults
from babyllama.infer.engine import prepare_for_decoding
from babyllama.infer.generate import Completion, complete, encode_prompt, stream
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

    def chat(self, messages: list[dict], document: str | None = None, **settings) -> str:
        """The assistant's answer to `messages` ([{"role": "system"|"user"|"assistant",
        "content": ...}], ending with the user's), rendered with the run's chat template;
        `document` is a reference passage to answer about (a 资料 passage, as in grounded-dialogue data). `settings`: as for
        `generate`, with chat defaults (max_new_tokens 200, temperature 0.7, top_k 50,
        repetition_penalty 1.1)."""
        cfg = decoding_defaults("chat", **settings)
        return chat_text(self.model, self.tokenizer, messages, cfg, document=document)

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
        """A multi-turn conversation: `session.send(text, **sampling)` streams each answer."""
        return ChatSession(self.model, self.tokenizer, system=system, document=document)


def load(path: str | Path, device: str = "auto") -> LLM:
    return LLM.load(path, device)
