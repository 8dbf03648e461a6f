"""The `generation` task: how varied and how loopy a model's answers are, on a prompt set.

Small models' most common failure is the loop (the "repeated phrases" and looping greedy text
that small-model write-ups complain of): the answer falls into one phrase repeated until the token budget ends. Metrics,
all on characters (whitespace ignored), so they mean the same for every tokenizer:

    distinct-n   distinct n-grams / all n-grams over all answers together (Li et al. 2016,
                 "A Diversity-Promoting Objective Function for Neural Conversation Models")
    rep-4        per answer, the share of its 4-grams that repeat an earlier one (Welleck et
                 al. 2019, "Neural Text Generation with Unlikelihood Training"); averaged
    loop rate    the share of answers that contain a loop: a piece of 1 to 50 characters
                 repeated back to back at least `loop_repeats` times over at least
                 `loop_min_chars` characters ("哈哈哈" is laughter, twelve "的" in a row is not).
                 Whitespace counts here: "A A A A A A A" and runs of blank space are the
                 loops small chat models fall into (seen on the demo's SFT run).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from babyllama.data.readers import iter_documents, require_documents
from babyllama.errors import UserError
from babyllama.eval.prompting import generate_answers, question_prompt_ids
from babyllama.eval.report import EvalResult
from babyllama.infer.config import GenerationConfig, changed_settings, decoding_defaults

MAX_LOOP_UNIT = 50


@dataclass
class GenerationOptions:
    data: str                          # prompts: .txt (one per line), .jsonl/.json, .csv ...
    prompt_field: str = "prompt"       # the field holding the prompt in jsonl/json/csv
    chat: bool = False                 # prompts are user messages rendered by the chat template
    generation: GenerationConfig = field(default_factory=lambda: decoding_defaults("eval-generation"))
    loop_repeats: int = 3
    loop_min_chars: int = 12
    limit: int | None = None
    batch_size: int = 16
    progress: bool = True

    def check(self) -> None:
        if self.loop_repeats < 2:
            raise UserError(f"--loop-repeats must be at least 2, got {self.loop_repeats}")
        if self.loop_min_chars < 2:
            raise UserError(f"--loop-min-chars must be at least 2, got {self.loop_min_chars}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        self.generation.check()


def chars(text: str) -> str:
    return "".join(text.split())


def ngrams(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(len(text) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    grams = [g for t in texts for g in ngrams(chars(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rep_n(text: str, n: int = 4) -> float:
    grams = ngrams(chars(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def find_loop(text: str, repeats: int = 3, min_chars: int = 12) -> str | None:
    """The first repeating piece of a loop in `text` (see the module docstring), or None.

    For each period p, a run of positions where s[i] == s[i + p] marks a stretch of length
    run + p that repeats with period p: O(len(text) * 50), fast on answer-sized texts.
    """
    s = text.strip()
    for p in range(1, min(MAX_LOOP_UNIT, len(s) // repeats) + 1):
        run = 0
        need = max(repeats * p, min_chars)
        for i in range(len(s) - p):
            run = run + 1 if s[i] == s[i + p] else 0
            if run + p >= need:
                start = i - run + 1
                return s[start:start + p]
    return None


def run_generation(model, tokenizer, opts: GenerationOptions) -> EvalResult:
    opts.check()
    prompts = list(itertools.islice(
        require_documents(iter_documents(opts.data, text_field=opts.prompt_field), opts.data), opts.limit))
    ids = [question_prompt_ids(tokenizer, [], p.strip(), chat=opts.chat) for p in prompts]
    answers = generate_answers(model, tokenizer, ids, opts.generation, chat=opts.chat,
                               batch_size=opts.batch_size, progress=opts.progress)
    texts = [a.text.strip() for a in answers]
    loops = [find_loop(t, opts.loop_repeats, opts.loop_min_chars) for t in texts]
    n = len(texts)
    metrics = {
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "rep_4": sum(rep_n(t) for t in texts) / n,
        "loop_rate": sum(u is not None for u in loops) / n,
        "mean_chars": sum(len(chars(t)) for t in texts) / n,
        "hit_length_limit": sum(a.finish_reason == "length" for a in answers) / n,
        "n": n,
    }
    columns = ["prompts", "distinct-1", "distinct-2", "rep-4", "loop rate", "mean length (chars)",
               "cut at max_new_tokens"]
    row = dict(zip(columns, [n, metrics["distinct_1"], metrics["distinct_2"], metrics["rep_4"],
                             metrics["loop_rate"], metrics["mean_chars"], metrics["hit_length_limit"]]))
    examples = [{"prompt": p, "answer": t, "loop": u, "finish_reason": a.finish_reason}
                for p, t, u, a in zip(prompts, texts, loops, answers)]
    settings = {"chat": opts.chat, "loop_repeats": opts.loop_repeats,
                "loop_min_chars": opts.loop_min_chars, "max_new_tokens": opts.generation.max_new_tokens,
                **changed_settings(opts.generation, decoding_defaults("eval-generation"))}
    return EvalResult("generation", opts.data, metrics, columns, [row], settings, examples)
