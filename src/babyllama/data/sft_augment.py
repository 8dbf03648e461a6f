"""Data recipes from small Chinese chat-model projects that turn or vary SFT conversations.

- Summarization as dialogue (how the babyllama write-up trains on LCSTS and CSL): a (text, summary) pair such as a paper abstract and its
  title (CSL) or a news text and its summary (LCSTS) becomes one user question and one
  assistant answer. A question template and an answer template are drawn per sample, so the
  model learns the task and not one fixed phrasing.
- Constraint shuffle (from the Chinese TinyStories write-up): an instruction that lists its constraints as `key：value` lines
  (`主题：春天`, `字数：200字`) means the same whatever order they come in; shuffling them
  teaches the model not to depend on that order.

Both draw their randomness from `sample_rng(seed, key)`, a generator of its own per sample,
never from a shared stream. A summarization sample is keyed by its text, so it gets the same
templates wherever it sits in a file and whatever was read before it; a constraint shuffle is
keyed by the position in the (already mixed) list too, so that copies of an up-weighted
conversation are shuffled differently.
"""

from __future__ import annotations

import dataclasses
import random
import re

# `{text}` is the passage, `{summary}` the reference title or summary. The questions cover both
# "write a title" (CSL) and "summarise" (LCSTS) phrasings, passage first and passage last.
SUMMARY_QUESTIONS = (
    "请为下面这段文字写一个标题：\n{text}",
    "{text}\n\n用一句话概括上面这段话。",
    "给下面的内容拟一个简短的标题。\n\n{text}",
    "阅读下面的文字，用一句话写出它的主要内容。\n{text}",
    "{text}\n\n这段文字的标题可以是什么？",
    "请用简洁的语言总结以下内容：\n{text}",
    "{text}\n\n请为这段话起一个题目。",
    "概括下文的核心内容，不超过三十个字。\n{text}",
)
SUMMARY_ANSWERS = (
    "{summary}",
    "标题：{summary}",
    "这段文字的主要内容是：{summary}",
    "可以概括为：{summary}",
    "{summary}。",
)


def sample_rng(seed: int, key: str) -> random.Random:
    """A generator determined by the seed and a per-sample key (see the module docstring)."""
    # A str seed is hashed with SHA-512 by `random`, so this is stable across runs and machines
    # (unlike hash(), which PYTHONHASHSEED randomises).
    return random.Random(f"{seed}:{key}")


def summary_messages(text: str, summary: str, seed: int = 0) -> list[dict]:
    """[user question, assistant answer] for one (text, summary) pair."""
    rng = sample_rng(seed, text + "\0" + summary)
    question = rng.choice(SUMMARY_QUESTIONS).format(text=text)
    answer = rng.choice(SUMMARY_ANSWERS).format(summary=summary)
    # "{summary}。" on a summary that already ends a sentence would give "。。".
    answer = re.sub(r"([。！？.!?])。$", r"\1", answer)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# One constraint line: an optional list marker (`- `, `1. `, `2、`), a short key without line
# breaks, a full-width or ASCII colon, and a non-empty value. The marker is kept in place when
# the lines are shuffled, so a numbered list stays numbered 1, 2, 3.
_CONSTRAINT = re.compile(r"^(\s*(?:[-*•·]\s*|\d{1,2}\s*[.、)）]\s*)?)"
                         r"([^\s：:][^：:\n]{0,19}[：:]\s*\S.*)$")
# `https://...` and times such as `10:30` have a colon but are not `key: value` lines.
_NOT_A_KEY = re.compile(r"^(?:https?|ftp)[：:]//|^\d+[：:]\d", re.IGNORECASE)


def _is_constraint(line: str) -> re.Match | None:
    m = _CONSTRAINT.match(line)
    if m is None or _NOT_A_KEY.match(m.group(2)):
        return None
    return m


def shuffle_constraints(text: str, rng: random.Random) -> str:
    """Shuffle each run of consecutive `key：value` lines; everything else stays in place.

    Only runs of adjacent lines are shuffled: two separate lists in one instruction stay two
    lists, and a line never moves across the sentence that introduces it. Text without a run
    of at least 2 such lines is returned unchanged.
    """
    lines = text.split("\n")
    matches = [_is_constraint(line) for line in lines]
    i = 0
    changed = False
    while i < len(lines):
        if matches[i] is None:
            i += 1
            continue
        j = i
        while j < len(lines) and matches[j] is not None:
            j += 1
        if j - i >= 2:
            bodies = [m.group(2) for m in matches[i:j]]
            rng.shuffle(bodies)
            for k, body in zip(range(i, j), bodies):
                lines[k] = matches[k].group(1) + body
            changed = True
        i = j
    return "\n".join(lines) if changed else text


def augment_constraints(conversations, probability: float, seed: int = 0) -> list:
    """Conversations with the constraint lines of some user turns shuffled (new objects).

    Each user turn is shuffled with the given probability; the draw is keyed by the seed, the
    conversation's position and the turn's text, so the same list and seed always give the same
    result. The inputs are not modified.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    out = []
    for i, conv in enumerate(conversations):
        messages = []
        for message in conv.messages:
            if message["role"] == "user":
                rng = sample_rng(seed, f"{i}:{message['content']}")
                if rng.random() < probability:
                    message = {**message, "content": shuffle_constraints(message["content"], rng)}
            messages.append(message)
        out.append(dataclasses.replace(conv, messages=messages))
    return out
