"""The `sentiment` task: has a chat model learned what `builtin:reviews-zh` teaches? Scored on
held-out reviews (`builtin:reviews-zh#test` by default; `data/reviews.py`):

    classification    every held-out review (or the first `limit`) asked with classify_prompt (the
                      phrasings in turn), greedy; the answer read by parse_label (好评 / 差评 at
                      its start, else unparsed, which counts as wrong). Accuracy, per class, the
                      unparsed share, and the majority-class rate of the same reviews: a model
                      that always answers the commoner label scores that much.
    written reviews   for each topic x {好评, 差评} (`writes_per_prompt` answers each), a review
                      asked for with write_prompt, sampled at the chat decoding defaults
                      (DECODING_DEFAULTS["chat"]: what `babyllama chat` answers with) and seeded;
                      the judge (snownlp's sentiment classifier, `SnowNLP(text).sentiments` > 0.5 =
                      好评) says which it is. Polarity accuracy = the share judged as asked (an
                      empty answer counts as wrong); its baseline is 0.5 (as many 好评 as 差评 are
                      asked for): text whose tone does not follow the question scores that.
                      `copied` = the share that is verbatim a line of builtin:reviews (written or
                      remembered?).
    judge agreement   the judge on the held-out reviews themselves, against their labels: how far
                      its verdict on a written review can be trusted.
    loop rate         the share of all answers (both kinds) holding a loop (`generation.find_loop`).

The judge is not independent of the data: snownlp's classifier (naive Bayes over words) was
trained on these same pos.txt / neg.txt files, held-out reviews included, so its agreement here
is an upper bound of what it achieves on new text. A written review that copies a training
review is judged as its file says. Text without words it knows gets its prior, 0.526: off-topic
chatter counts as 好评, which is why both polarities are asked for as often.

`score_classification(answers, items)` and `score_polarity(asked, scores)` are the scoring, with
no model: the numbers of a run are theirs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from babyllama.data.reviews import (LABELS, NEGATIVE, POSITIVE, TOPICS, Review, classify_prompt,
                                    is_review_text, label_word, parse_label, review_items,
                                    reviews_zh_split, write_prompt)
from babyllama.errors import UserError
from babyllama.eval.generation import find_loop
from babyllama.eval.prompting import generate_answers, question_prompt_ids
from babyllama.eval.report import EvalResult
from babyllama.eval.scoring import base_model
from babyllama.infer.config import GenerationConfig, changed_settings, decoding_defaults

DEFAULT_DATA = "builtin:reviews-zh#test"
# Greedy classification answers: "好评" is one or two tokens, but a model that writes on instead
# of answering needs room for a loop to show (find_loop's 12 characters).
CLASSIFY_MAX_NEW_TOKENS = 32
# A prompt must leave room for the answer's first tokens to be read at all.
_ANSWER_ROOM = 4


@dataclass
class SentimentOptions:
    data: str | list[Review] = DEFAULT_DATA   # builtin:reviews-zh#test (or #val, #train), or
                                              # Reviews in memory
    chat: bool = True                         # prompts are user messages of the chat template
    generation: GenerationConfig = field(default_factory=lambda: decoding_defaults("chat"))
                                              # the written reviews' decoding (sampled)
    classify_max_new_tokens: int = CLASSIFY_MAX_NEW_TOKENS  # greedy classification answers
    writes_per_prompt: int = 4                # written reviews per topic and polarity
    topics: list[str] | None = None           # the topics written about (default: all TOPICS)
    judge: Callable[[str], float] | None = None  # text -> P(positive); default snownlp's
    seed: int = 0                             # sampling seed when generation.seed is not set
    limit: int | None = None                  # the first N reviews and N (topic, polarity) prompts
    loop_repeats: int = 3
    loop_min_chars: int = 12
    batch_size: int = 16
    progress: bool = True

    def check(self) -> None:
        """Every option problem, before the model loads or the data is read."""
        if isinstance(self.data, str):
            reviews_zh_split(self.data)  # another source or split: an error before the model loads
            if not self.data.partition("#")[2]:
                # As a source the bare name means the training split (what SFT reads); scoring
                # that by accident would report remembered answers as a skill.
                raise UserError(f"{self.data}: name the split to score: builtin:reviews-zh#test (held out "
                                f"of pretraining and SFT), #val or #train")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.writes_per_prompt < 0:
            raise UserError(f"writes_per_prompt (--samples) must be 0 or more, got {self.writes_per_prompt}")
        if self.classify_max_new_tokens < 1:
            raise UserError(f"classify_max_new_tokens must be at least 1, got {self.classify_max_new_tokens}")
        if self.loop_repeats < 2 or self.loop_min_chars < 2:
            raise UserError(f"loop_repeats and loop_min_chars must be at least 2, got "
                            f"{self.loop_repeats} and {self.loop_min_chars}")
        unknown = [t for t in self.topics or () if t not in TOPICS]
        if unknown:
            raise UserError(f"unknown topic(s) {', '.join(map(str, unknown))}; topics: {', '.join(TOPICS)}")
        self.generation.check()
        if self.generation.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1 to write a review")
        if self.writes_per_prompt > 1 and (self.generation.greedy or self.generation.num_beams > 1):
            raise UserError(f"{self.writes_per_prompt} written reviews per prompt need sampling: set a "
                            f"temperature above 0 and num_beams 1 (greedy answers are all the same)")


# ----------------------------------------------------------------------------- scoring

def score_classification(answers: list[str], items: list[Review]) -> dict:
    """Scores of classification answers (one per item, in order), by parse_label: `accuracy`,
    `accuracy_positive` / `accuracy_negative` (None when the class has no item), `unparsed`
    (share of answers that are neither), `majority_rate` (share of the commoner label: the score
    of always answering it), `n`. Raises ValueError when the lengths differ or there are none."""
    if len(answers) != len(items) or not items:
        raise ValueError(f"{len(answers)} answers for {len(items)} reviews")
    predicted = [parse_label(a) for a in answers]
    correct = [p == item.label for p, item in zip(predicted, items)]
    out = {"accuracy": sum(correct) / len(items)}
    for label in LABELS:
        hits = [c for c, item in zip(correct, items) if item.label == label]
        out[f"accuracy_{label}"] = sum(hits) / len(hits) if hits else None
    out["unparsed"] = sum(p is None for p in predicted) / len(items)
    out["majority_rate"] = max(sum(item.label == label for item in items) for label in LABELS) / len(items)
    out["n"] = len(items)
    return out


def judged_label(score: float | None) -> str | None:
    """The judge's verdict: "positive" above 0.5, "negative" at or below, None without a score."""
    return None if score is None else POSITIVE if score > 0.5 else NEGATIVE


def score_polarity(asked: list[str], scores: list[float | None]) -> dict:
    """How often the judge's verdict (`judged_label` of each score) is the label `asked`:
    `accuracy`, `accuracy_positive` / `accuracy_negative` (None when none was asked),
    `majority_rate` (the share of the commoner label asked: the best score of text whose
    polarity ignores the question), `n`. A None score (an empty text) counts as wrong."""
    if len(asked) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(asked)} labels")
    right = [judged_label(s) == a for a, s in zip(asked, scores)]
    out = {"accuracy": sum(right) / len(right) if right else None}
    for label in LABELS:
        hits = [r for r, a in zip(right, asked) if a == label]
        out[f"accuracy_{label}"] = sum(hits) / len(hits) if hits else None
    out["majority_rate"] = max(asked.count(label) for label in LABELS) / len(asked) if asked else None
    out["n"] = len(right)
    return out


def snownlp_judge() -> Callable[[str], float]:
    """snownlp's sentiment classifier, text -> P(positive). Imported on use (about 2 s: it
    unpickles its models). Raises UserError when snownlp is not installed."""
    try:
        from snownlp import SnowNLP
    except ImportError:
        raise UserError("the sentiment task judges written reviews with snownlp: "
                        "pip install 'babyllama[demo]' (or pip install snownlp)") from None
    return lambda text: SnowNLP(text).sentiments


def judge_scores(judge: Callable[[str], float], texts: list[str]) -> list[float | None]:
    """The judge's P(positive) of each text; None for an empty one (snownlp divides by zero)."""
    return [float(judge(t)) if t.strip() else None for t in texts]


# ----------------------------------------------------------------------------- the task

def read_items(opts: SentimentOptions) -> tuple[list[Review], str]:
    """(the first `limit` held-out reviews, what the report calls the data)."""
    if isinstance(opts.data, list):
        items = opts.data[:opts.limit]
        data = f"{len(opts.data)} reviews" + (f" from {items[0].source}" if items else "")
    else:
        data = str(opts.data)
        items = review_items(reviews_zh_split(data), data)[:opts.limit]
    if not items:
        raise UserError(f"{data}: no reviews")
    return items, data


def write_requests(opts: SentimentOptions) -> list[tuple[str, str, str]]:
    """(topic, label, prompt) of each written-review request, topic by topic, 好评 before 差评,
    the first `limit`; the phrasing cycles with the request's number."""
    pairs = [(topic, label) for topic in (opts.topics or TOPICS) for label in LABELS][:opts.limit]
    return [(topic, label, write_prompt(topic, label, i)) for i, (topic, label) in enumerate(pairs)]


def run_sentiment(model, tokenizer, opts: SentimentOptions) -> EvalResult:
    """Classify the held-out reviews, write reviews per topic and polarity, judge and score
    them (module docstring). Raises UserError for bad options, data or a missing snownlp."""
    opts.check()
    items, data = read_items(opts)
    judge = opts.judge or snownlp_judge()  # before generating: a missing package fails fast
    context = base_model(model).config.max_position_embeddings
    skipped: dict[str, int] = {}

    # Classification: greedy, one answer per review.
    prompts, kept = [], []
    for i, item in enumerate(items):
        ids = question_prompt_ids(tokenizer, [], classify_prompt(item.text, i), chat=opts.chat)
        if len(ids) + _ANSWER_ROOM > context:
            reason = f"the question is longer than the context ({context} tokens)"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        prompts.append(ids)
        kept.append((i, item))
    if not kept:
        raise UserError(f"{data}: no review fits the model's context ({context} tokens) with its question")
    greedy = decoding_defaults("eval-generation", max_new_tokens=opts.classify_max_new_tokens)
    completions = generate_answers(model, tokenizer, prompts, greedy, chat=opts.chat,
                                   batch_size=opts.batch_size, desc="sentiment: classify",
                                   progress=opts.progress)
    answers = [c.text.strip() for c in completions]
    reviews = [item for _, item in kept]
    classified = score_classification(answers, reviews)
    judge_on_reviews = judge_scores(judge, [item.text for item in reviews])
    agreement = score_polarity([item.label for item in reviews], judge_on_reviews)

    # Written reviews: a request's n copies stay adjacent through generate_answers' (stable)
    # length sort, and a batch of a multiple of n rows holds them together: n rows of one
    # random stream, not n copies of one sample.
    n = opts.writes_per_prompt
    requests = write_requests(opts) if n else []
    cfg = opts.generation
    if not cfg.greedy and cfg.seed is None:
        cfg = dataclasses.replace(cfg, seed=opts.seed)  # a sampled score is reproducible too
    write_ids = [question_prompt_ids(tokenizer, [], prompt, chat=opts.chat) for _, _, prompt in requests]
    written = generate_answers(model, tokenizer, [ids for ids in write_ids for _ in range(n)], cfg,
                               chat=opts.chat, batch_size=max(n, opts.batch_size // max(n, 1) * n),
                               desc="sentiment: write", progress=opts.progress) if requests else []
    texts = [c.text.strip() for c in written]
    asked = [label for _, label, _ in requests for _ in range(n)]
    write_scores = judge_scores(judge, texts)
    polarity = score_polarity(asked, write_scores)

    loops_c = [find_loop(a, opts.loop_repeats, opts.loop_min_chars) for a in answers]
    loops_w = [find_loop(t, opts.loop_repeats, opts.loop_min_chars) for t in texts]
    copied = [is_review_text(t) for t in texts]
    all_loops = loops_c + loops_w
    metrics = {
        "classification_accuracy": classified["accuracy"],
        "accuracy_positive": classified["accuracy_positive"],
        "accuracy_negative": classified["accuracy_negative"],
        "majority_rate": classified["majority_rate"],
        "unparsed": classified["unparsed"],
        "polarity_accuracy": polarity["accuracy"],
        "polarity_positive": polarity["accuracy_positive"],
        "polarity_negative": polarity["accuracy_negative"],
        # Empty answers: the judge cannot score them and they count as wrong.
        "written_empty": sum(s is None for s in write_scores) / len(write_scores) if write_scores else None,
        "copied": sum(copied) / len(copied) if copied else None,
        "judge_agreement": agreement["accuracy"],
        "loop_rate": sum(u is not None for u in all_loops) / len(all_loops),
        "n_classified": len(reviews), "n_written": len(texts), "skipped": sum(skipped.values()),
    }
    columns = ["part", "n", "accuracy", "好评", "差评", "baseline", "unparsed", "loop rate"]
    rows = [
        {"part": "classification (greedy)", "n": len(reviews), "accuracy": classified["accuracy"],
         "好评": classified["accuracy_positive"], "差评": classified["accuracy_negative"],
         "baseline": classified["majority_rate"], "unparsed": classified["unparsed"],
         "loop rate": _share(loops_c)},
        {"part": "written reviews, judged (sampled)", "n": len(texts), "accuracy": polarity["accuracy"],
         "好评": polarity["accuracy_positive"], "差评": polarity["accuracy_negative"],
         "baseline": polarity["majority_rate"], "unparsed": metrics["written_empty"],
         "loop rate": _share(loops_w)},
        {"part": "judge on the held-out reviews", "n": len(reviews), "accuracy": agreement["accuracy"],
         "好评": agreement["accuracy_positive"], "差评": agreement["accuracy_negative"],
         "baseline": agreement["majority_rate"]},
    ]
    predicted = [parse_label(a) for a in answers]
    rows = [{k: "" if v is None else v for k, v in row.items()} for row in rows]  # no "None" cells
    examples = [{"kind": "classify", "where": item.source, "prompt": classify_prompt(item.text, i),
                 "answer": a, "expected": label_word(item.label),
                 "predicted": label_word(p) if p else None, "correct": p == item.label,
                 "judged": _word(s), "judge_score": s, "loop": u, "finish_reason": c.finish_reason}
                for (i, item), a, p, c, s, u
                in zip(kept, answers, predicted, completions, judge_on_reviews, loops_c)]
    prompt_of = [(topic, prompt) for topic, _, prompt in requests for _ in range(n)]
    examples += [{"kind": "write", "topic": topic, "prompt": prompt, "answer": t,
                  "expected": label_word(label), "judged": _word(s), "judge_score": s,
                  "correct": judged_label(s) == label, "copied": cp, "loop": u,
                  "finish_reason": c.finish_reason}
                 for (topic, prompt), label, t, c, s, cp, u
                 in zip(prompt_of, asked, texts, written, write_scores, copied, loops_w)]
    return EvalResult("sentiment", data, metrics, columns, rows, settings(opts, cfg, skipped), examples)


def _share(loops: list) -> float | None:
    return sum(u is not None for u in loops) / len(loops) if loops else None


def _word(score: float | None) -> str | None:
    label = judged_label(score)
    return label_word(label) if label else None


def settings(opts: SentimentOptions, cfg: GenerationConfig, skipped: dict[str, int]) -> dict:
    out: dict = {"chat": opts.chat, "classify_max_new_tokens": opts.classify_max_new_tokens,
                 "writes_per_prompt": opts.writes_per_prompt}
    if opts.topics:
        out["topics"] = list(opts.topics)
    out["judge"] = "snownlp" if opts.judge is None else getattr(opts.judge, "__name__", "custom")
    # The written reviews' decoding: max_new_tokens always, the rest when not the chat default.
    out["max_new_tokens"] = cfg.max_new_tokens
    out.update(changed_settings(cfg, decoding_defaults("chat")))
    out["limit"] = opts.limit
    if skipped:
        out["skipped"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    return out
