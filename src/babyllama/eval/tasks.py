"""The evaluation tasks by name, for `babyllama eval --task NAME` and for training runs'
periodic `train.eval_tasks` (a list of mappings: `{task: choice, data: DIR, limit: 5}`).

    lm          perplexity, next-token accuracy, bits per character / byte     (eval/lm.py)
    rouge       ROUGE-1/2/L of generated summaries, character level           (eval/rouge.py)
    choice      C-Eval / CMMLU-style multiple choice, letter and text scoring  (eval/choice.py)
    generation  distinct-n, rep-4 and loop rate of generated answers           (eval/generation.py)
    math        final-answer accuracy (pass@k) on math word problems           (eval/math.py)
    vqa         exact-match answers to questions about images, per question type (eval/vqa.py)
    sentiment   好评/差评 accuracy on held-out reviews, polarity of written ones (eval/sentiment.py)
"""

from __future__ import annotations

import dataclasses
import difflib

from babyllama.errors import UserError
from babyllama.eval.choice import ChoiceOptions, run_choice
from babyllama.eval.generation import GenerationOptions, run_generation
from babyllama.eval.lm import LMOptions, run_lm
from babyllama.eval.math import MathOptions, run_math
from babyllama.eval.report import EvalResult
from babyllama.eval.rouge import RougeOptions, run_rouge
from babyllama.eval.sentiment import SentimentOptions, run_sentiment
from babyllama.eval.vqa import VQAOptions, run_vqa
from babyllama.infer.config import generation_config

# The registry: task name -> (options dataclass, run function). Adding a task is one entry here
# plus its own module with an options dataclass (fields = its settings, `check()`) and
# `run_NAME(model, tokenizer, options) -> EvalResult`.
REGISTRY = {
    "lm": (LMOptions, run_lm),
    "rouge": (RougeOptions, run_rouge),
    "choice": (ChoiceOptions, run_choice),
    "generation": (GenerationOptions, run_generation),
    "math": (MathOptions, run_math),
    "vqa": (VQAOptions, run_vqa),
    "sentiment": (SentimentOptions, run_sentiment),
}
TASKS = tuple(REGISTRY)


def task_parts(name: str):
    """(options dataclass, run function) of a task. Raises UserError for an unknown name."""
    if name not in REGISTRY:
        raise UserError(f"unknown evaluation task {name!r}: choose one of {', '.join(TASKS)}")
    return REGISTRY[name]


def task_options(spec: dict, source: str = "train.eval_tasks", **defaults):
    """(task name, options) from a mapping such as `{task: lm, data: corpus.txt, limit: 50}`;
    `generation` may hold decoding settings (`{max_new_tokens: 64, temperature: 0}`).
    `defaults` fill fields the mapping leaves out (the run's chat style, progress off)."""
    if not isinstance(spec, dict) or "task" not in spec or "data" not in spec:
        raise UserError(f"{source}: each entry needs at least `task` and `data`, got {spec!r}")
    spec = dict(spec)
    name = spec.pop("task")
    cls, _ = task_parts(name)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in spec:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{source}: the {name} task has no setting {key!r}{hint}; "
                            f"settings: {', '.join(fields)}")
    if isinstance(spec.get("generation"), dict):
        base = cls(data=spec["data"]).generation  # the task's own decoding defaults
        spec["generation"] = generation_config({**base.__dict__, **spec["generation"]})
    spec.update({k: v for k, v in defaults.items() if k in fields and k not in spec})
    try:
        options = cls(**spec)
    except TypeError as e:
        raise UserError(f"{source}: {name}: {e}") from None
    options.check()
    return name, options


def run_task(name: str, model, tokenizer, options) -> EvalResult:
    _, run = task_parts(name)
    return run(model, tokenizer, options)
