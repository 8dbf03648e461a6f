"""Prompts for evaluation, plain or through the run's chat template, and answers generated for
them in batches by the generation engine (the same `complete` that chat and the API use).

A base (pretrained) run continues text: its prompt is BOS + text. A fine-tuned run answers
turns: its prompt is the chat template's rendering of a user message (and earlier turns, for
few-shot examples), ending with the assistant's generation prompt.
"""

from __future__ import annotations

import dataclasses
from tqdm.auto import tqdm

from babyllama.infer.config import GenerationConfig
from babyllama.infer.generate import Completion, complete, encode_prompt, end_ids, eval_mode
from babyllama.tokenizer.chat_template import encode_chat, stop_token_ids


def question_prompt_ids(tokenizer, turns: list[tuple[str, str]], question: str, *, chat: bool,
               system: str | None = None) -> list[int]:
    """Token ids asking `question` after the example `turns` [(question, answer)].

    chat: the examples are earlier user/assistant turns (as lm-evaluation-harness does with
    --apply_chat_template); plain: they are concatenated text before the question.
    """
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        for q, a in turns:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        return encode_chat(tokenizer, messages, add_generation_prompt=True).ids
    head = f"{system}\n\n" if system else ""
    return encode_prompt(tokenizer, head + "".join(q + a + "\n\n" for q, a in turns) + question)


def generate_answers(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig, *,
                     chat: bool, batch_size: int = 16, desc: str = "generate",
                     progress: bool = True) -> list[Completion]:
    """One completion per prompt (cfg.num_return_sequences is ignored), `batch_size` prompts
    per engine batch. A chat answer ends at the template's end-of-turn tokens."""
    stops = stop_token_ids(tokenizer) if chat else end_ids(tokenizer)
    cfg = dataclasses.replace(cfg, num_return_sequences=1)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
    # Similar lengths together: less left padding per batch; results go back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    done: dict[int, Completion] = {}
    with eval_mode(model):  # dropout off whatever mode the caller left the model in
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, c in zip(idx, complete(model, tokenizer, [prompts[i] for i in idx], cfg, stops)):
                done[i] = c
            bar.update(len(idx))
    bar.close()
    return [done[i] for i in range(len(prompts))]
