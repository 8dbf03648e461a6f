"""Rewards for reinforcement learning (`grpo.reward`): a function from prompts and sampled
answers to one number per answer.

    math             1 when the answer's final number equals the problem's (eval/math.py's
                     `math_reward`; `grpo.format_bonus` adds a bonus for stating it as 答案是N)
    rm:PATH          a reward model run (`babyllama reward`): the score of the conversation
                     (prompt + answer) rendered with the reward model's chat template
    module:function  a Python function, TRL's reward-function convention:
                     `function(prompts, completions, **columns) -> list[float]` with the data's
                     columns (`answer`) as keyword lists; `path/to/file.py:function` works too

`load_reward(spec, ...)` returns `RewardFn(prompts, completions, answers) -> list[float]`.
Every value is checked: a function that raises, returns the wrong count or a non-finite
number stops the run with one line naming the prompt.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from pathlib import Path
from typing import Callable

import torch

from babyllama.errors import UserError
from babyllama.eval.math import math_reward
from babyllama.run import Run

RewardFn = Callable[[list[str], list[str], list], list[float]]
# Larger rewards overflow the group's variance in fp32 (advantages become NaN); no reward scale
# needs them.
MAX_REWARD = 1e6


def load_reward(spec: str, *, format_bonus: float = 0.0, device="cpu", batch_size: int = 16) -> RewardFn:
    """The reward function `spec` names (see the module docstring). Raises UserError for an
    unknown form, a missing module or function, or a path that is not a reward model run."""
    if spec == "math":
        return lambda prompts, completions, answers: [
            math_reward(c, a, format_bonus) for c, a in zip(completions, answers)]
    if spec.startswith("rm:"):
        if not spec[3:] or not Path(spec[3:]).is_dir():
            raise UserError(f"--reward {spec}: no such reward model run directory")
        return reward_model_fn(spec[3:], device, batch_size)
    if ":" in spec:
        return python_fn(spec)
    raise UserError(f"grpo.reward={spec!r}: give math, rm:PATH (a reward model run) or "
                    f"module:function (a Python function)")


def python_fn(spec: str) -> RewardFn:
    """`module:function` (imported from the working directory too) or `file.py:function`."""
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UserError(f"grpo.reward={spec!r}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # `python -m`-like: the user's own modules
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as e:  # the user's module failing to import is their error, said in one line
        raise UserError(f"grpo.reward={spec!r}: cannot import {target} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"grpo.reward={spec!r}: {target} has no function {name!r}")

    def call(prompts, completions, answers):
        return fn(prompts, completions, answer=answers)

    call.__name__ = name
    return call


def reward_model_fn(path: str, device, batch_size: int) -> RewardFn:
    """Scores of a reward model run on (prompt, answer) conversations, in batches."""
    from babyllama.tokenizer.chat_template import encode_chat

    run = Run(path)
    if not run.is_reward_model():
        raise UserError(f"--reward rm:{path}: not a reward model run (train one with `babyllama reward`)")
    model = run.load_reward_model().to(device).eval()
    tokenizer = run.load_tokenizer()
    # Conversations are scored as the reward model was trained: after its system prompt.
    system = run.config().sft.system_prompt
    lead = [{"role": "system", "content": system}] if system else []
    context = model.config.max_position_embeddings
    pad = tokenizer.pad_id

    @torch.no_grad()
    def score(prompts, completions, answers):
        rows = []
        for p, c in zip(prompts, completions):
            ids = encode_chat(tokenizer, lead + [{"role": "user", "content": p},
                                                 {"role": "assistant", "content": c}]).ids
            rows.append(ids[-context:])  # the answer's end matters most to a last-token reward
        out = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            T = max(map(len, chunk))
            x = torch.full((len(chunk), T), pad, dtype=torch.long)
            for r, ids in enumerate(chunk):
                x[r, :len(ids)] = torch.tensor(ids)
            last = torch.tensor([len(ids) - 1 for ids in chunk])
            out += model(x.to(device), last.to(device)).tolist()
        return out

    return score


def checked_rewards(fn: RewardFn, prompts: list[str], completions: list[str], answers: list,
                    sources: list[str]) -> list[float]:
    """`fn`'s rewards, each a finite number. Raises UserError naming the first bad prompt."""
    name = getattr(fn, "__name__", "reward")
    try:
        values = fn(prompts, completions, answers)
    except (Exception, SystemExit) as e:  # a user's reward function failing stops the run with its reason
        raise UserError(f"{sources[0]}: the reward function {name} raised {type(e).__name__}: {e} "
                        f"(prompt {prompts[0][:40]!r}...)") from None
    # A list (or tuple, or 1-D array) of real numbers, one per completion: a string, a dict or
    # a number given as text is refused rather than converted into something else.
    if hasattr(values, "tolist") and not isinstance(values, (str, bytes)):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise UserError(f"{sources[0]}: the reward function {name} must return a list of numbers, "
                        f"got {type(values).__name__} {values!r:.60}")
    if len(values) != len(completions):
        raise UserError(f"{sources[0]}: the reward function {name} returned {len(values)} rewards for "
                        f"{len(completions)} completions")
    out = []
    for v, p, where in zip(values, prompts, sources):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise UserError(f"{where}: the reward function {name} returned {type(v).__name__} {v!r:.40} "
                            f"for the prompt {p[:40]!r}, not a number")
        if not math.isfinite(v) or abs(v) > MAX_REWARD:
            raise UserError(f"{where}: the reward function {name} returned {v} for the prompt {p[:40]!r} "
                            f"(rewards must be finite, at most {MAX_REWARD:g} in size)")
        out.append(float(v))
    return out
