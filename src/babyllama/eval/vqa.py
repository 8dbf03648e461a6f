"""The `vqa` task: exact-match accuracy of an image-text model's short answers to questions
about pictures (LLaVA-style conversations, or the built-in `builtin:shapes-zh#test`), per
question type, next to two reference points:

    majority         always answering the most frequent reference answer of the type (in the
                     evaluated set): the chance level a model reaches without looking
    shuffled images  the same model and prompts with every picture moved to another question
                     (`--shuffle-images`): what the model gets right from the text alone

A model that reads its pictures beats both; one that has only learnt each type's likely answers
scores about the majority whether or not the images are shuffled.

    vqa_scores(model, tokenizer, convs, proc, shuffle=False)   -> VQAResult (per example, per type)
    majority_baseline(convs)                                   -> {type: accuracy}
    score_answers(predictions, references)                     -> [bool]
    run_vqa(model, tokenizer, VQAOptions)                      -> EvalResult (`babyllama eval`)

A question is a conversation with an image: the prompt is the conversation up to and including
its last user turn, through the chat template (the image placeholder expanded to the model's
image positions as `infer.images.image_prompt` does), and the reference is the last assistant answer.
Answers are greedy (the "eval-generation" decoding row, `VQA_DECODING` tokens at most),
generated in batches of prompts with their pictures (`infer.generate.complete`). Skipped and
counted, never scored: a conversation without an image, and one whose prompt with its image
leaves no room in the model's context for an answer.

When an answer matches (`normalize_answer`, both sides): Unicode NFKC (full-width letters,
digits and punctuation as ASCII: "３" -> "3", "，" -> ","), lower case, surrounding blanks
and quotes dropped, runs of blanks as one space, trailing punctuation dropped
(。．.！!？?，,、；;：:). Then the texts must be equal, with one allowance: a numeric reference
also matches the number followed by the measure word 个 ("3个" for "3"). Nothing else is
forgiven ("红色的", "是红色", "三" for "3" are wrong): the shapes answers are one word, and the
model was trained to give exactly that word.

Shuffled images (`derangement`): the questions are grouped by picture (one picture often has
several questions), the groups and the questions in them put in a random order (seeded), and
each question gets the picture of the question s places further along that order (cyclically),
s drawn between the largest group's size m and n - m: no question keeps its own picture or gets
another question's copy of it. This needs m <= n / 2 (otherwise no such permutation exists).
"""

from __future__ import annotations

import random
import re
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from babyllama.data.images import ImageProcessing, load_pixels, pixel_values
from babyllama.data.llava import IMAGE_PLACEHOLDER, ImageConversation, image_conversations
from babyllama.data.records import BadRecords
from babyllama.data.shapes import QTYPES
from babyllama.errors import UserError
from babyllama.eval.report import EvalResult
from babyllama.eval.scoring import base_model
from babyllama.model.vlm import expand_image_tokens
from babyllama.infer.config import GenerationConfig, changed_settings, decoding_defaults
from babyllama.infer.generate import complete, eval_mode
from babyllama.infer.images import is_vision_model
from babyllama.tokenizer.chat_template import encode_chat, stop_token_ids

# Greedy, as every eval answer; the shapes answers are a word or a digit (1-3 tokens).
VQA_DECODING = dict(max_new_tokens=16)
DEFAULT_DATA = "builtin:shapes-zh#test"
OTHER = "other"   # the row of questions without a type (qtype "")
ALL = "all"       # the row of every question

# ----------------------------------------------------------------------------- scoring

_TRAILING = "。．.！!？?，,、；;：:"
_QUOTES = "\"'“”‘’「」『』《》`"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    """The answer as compared (module docstring): NFKC, lower case, blanks collapsed, quotes
    around it and trailing punctuation dropped."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = " ".join(text.split())
    previous = None
    while text != previous:  # "“红色。”" -> "红色"
        previous = text
        text = text.strip().strip(_QUOTES).rstrip(_TRAILING)
    return text


def answer_matches(predicted: str, reference: str) -> bool:
    """Whether a predicted answer is the reference (module docstring); an empty answer never is."""
    p, r = normalize_answer(predicted), normalize_answer(reference)
    if not p or not r:
        return False
    if p == r:
        return True
    return bool(_NUMBER.fullmatch(r)) and p == r + "个"


def score_answers(predictions: list[str], references: list[str]) -> list[bool]:
    """`answer_matches` of each prediction with its reference. Raises ValueError when the two
    lists differ in length."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [answer_matches(p, r) for p, r in zip(predictions, references)]


def type_label(qtype: str) -> str:
    return qtype or OTHER


def reference_of(conv: ImageConversation) -> str:
    """The last assistant answer of a conversation."""
    return next(m["content"] for m in reversed(conv.messages) if m["role"] == "assistant")


def prompt_messages(conv: ImageConversation) -> list[dict]:
    """The messages up to and including the last user turn."""
    last = max(i for i, m in enumerate(conv.messages) if m["role"] == "user")
    return conv.messages[:last + 1]


def majority_baseline(convs: list[ImageConversation]) -> dict[str, float]:
    """{type label: accuracy of always answering that type's most frequent (normalised)
    reference}, over the conversations with an image (those `vqa_scores` evaluates), and
    `ALL`: the same rule per type, over every question. Types are QTYPES' names, OTHER for a
    conversation without one."""
    return _majority([type_label(c.qtype) for c in convs if c.image is not None],
                     [reference_of(c) for c in convs if c.image is not None])


def _majority(labels: list[str], references: list[str]) -> dict[str, float]:
    by_type: dict[str, Counter] = defaultdict(Counter)
    for label, ref in zip(labels, references):
        by_type[label][normalize_answer(ref)] += 1
    out = {label: c.most_common(1)[0][1] / sum(c.values()) for label, c in by_type.items()}
    if labels:
        out[ALL] = sum(c.most_common(1)[0][1] for c in by_type.values()) / len(labels)
    return out


def derangement(groups: list, seed: int = 0) -> list[int]:
    """perm with groups[perm[i]] != groups[i] for every i (module docstring): question i gets
    the picture of question perm[i]. Raises UserError when one group holds more than half."""
    n = len(groups)
    if n == 0:
        return []
    rng = random.Random(seed)
    by_group: dict = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    blocks = list(by_group.values())
    rng.shuffle(blocks)
    for b in blocks:
        rng.shuffle(b)
    order = [i for b in blocks for i in b]
    m = max(len(b) for b in blocks)
    if 2 * m > n:
        raise UserError(f"cannot shuffle the images: {m} of the {n} questions are about one picture, "
                        f"so some would keep it (evaluate more questions)")
    s = rng.randint(m, n - m)
    perm = [0] * n
    for p, i in enumerate(order):
        perm[i] = order[(p + s) % n]
    return perm


# ----------------------------------------------------------------------------- answering

@dataclass
class VQAExample:
    """One evaluated question."""
    where: str
    qtype: str
    question: str             # the last user turn, without the image placeholder
    reference: str
    prediction: str = ""
    correct: bool = False
    finish_reason: str = ""
    image_from: str = ""      # where the picture came from (another question's, when shuffled)


@dataclass
class VQAResult:
    examples: list[VQAExample]
    accuracy: dict[str, float]          # type label (and ALL) -> exact-match accuracy
    counts: dict[str, int]              # type label (and ALL) -> questions
    seconds: float                      # reading the images and generating the answers
    shuffled: bool = False
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> conversations

    @property
    def images_per_second(self) -> float:
        return len(self.examples) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Prepared:
    """Questions ready to generate: expanded prompt ids, and the index of each one's picture
    in `images` (each distinct picture once: a file, or a picture in memory), read as pixel
    values batch by batch (`pixels`), so a large set never holds all its images at once."""
    examples: list[VQAExample]
    prompts: list[list[int]]
    image_index: list[int]
    images: list
    proc: ImageProcessing
    skipped: dict[str, int]

    def pixels(self, k: int) -> torch.Tensor:
        """(C, S, S) float32 pixel values of picture k."""
        image = self.images[k]
        return load_pixels(Path(image), self.proc) if isinstance(image, (str, Path)) else pixel_values(image, self.proc)


def image_processing_of(model) -> ImageProcessing:
    """The preprocessing the model's encoder was trained with (`train/vision.py`'s)."""
    v = base_model(model).vlm_config.vision
    return ImageProcessing(v.image_size, tuple(v.image_mean), tuple(v.image_std))


def _require_vision(model) -> None:
    if not is_vision_model(base_model(model)):
        raise UserError("the vqa task needs an image-text model; this one reads no images (train "
                        "one with `babyllama align` / `babyllama instruct`)")


def prepare(model, tokenizer, convs: list[ImageConversation], proc: ImageProcessing) -> Prepared:
    """Prompts and pictures of the conversations with an image (the others counted in
    `skipped`, as those too long for the context). Raises UserError for a text-only model or
    a prompt whose image placeholders are not its one image."""
    _require_vision(model)
    llama = base_model(model)
    context = llama.config.max_position_embeddings
    examples, prompts, image_index, images = [], [], [], []
    seen: dict = {}
    skipped: Counter = Counter()
    for conv in convs:
        if conv.image is None:
            skipped["no image"] += 1
            continue
        messages = prompt_messages(conv)
        ids = encode_chat(tokenizer, messages, add_generation_prompt=True).ids
        image_token = llama.vlm_config.image_token_id
        if sum(1 for t in ids if t == image_token) != 1:
            raise UserError(f"{conv.where}: the prompt holds {sum(1 for t in ids if t == image_token)} image "
                            f"placeholders ({IMAGE_PLACEHOLDER}) for its one image")
        ids = expand_image_tokens(ids, image_token, llama.vlm_config.image_tokens)
        if len(ids) >= context:
            skipped[f"longer than the context ({context} tokens) with its image"] += 1
            continue
        key = str(conv.image) if isinstance(conv.image, (str, Path)) else id(conv.image)
        if key not in seen:
            seen[key] = (len(images), conv.where)
            images.append(conv.image)
        index, first_where = seen[key]
        question = messages[-1]["content"].replace(IMAGE_PLACEHOLDER, "").strip()
        examples.append(VQAExample(conv.where, conv.qtype, question, reference_of(conv),
                                   image_from=first_where))
        prompts.append(ids)
        image_index.append(index)
    return Prepared(examples, prompts, image_index, images, proc, dict(skipped))


def image_order(prepared: Prepared, shuffle: bool, seed: int = 0) -> list[int]:
    """For each question, the question whose picture it is shown: itself, or (shuffle) a
    `derangement` by picture."""
    n = len(prepared.examples)
    return derangement(prepared.image_index, seed) if shuffle else list(range(n))


def answer(model, tokenizer, prepared: Prepared, order: list[int], cfg: GenerationConfig, *,
           batch_size: int = 32, desc: str = "vqa", progress: bool = True) -> tuple[list, float]:
    """(completions in question order, seconds): question i asked with the picture of question
    order[i], `batch_size` prompts (of similar lengths) per engine batch."""
    stops = stop_token_ids(tokenizer)
    n = len(prepared.prompts)
    rows = sorted(range(n), key=lambda i: len(prepared.prompts[i]))
    done: dict = {}
    bar = tqdm(total=n, desc=desc, unit="image", disable=not progress, leave=False)
    start = time.perf_counter()
    with eval_mode(model):
        for b in range(0, n, batch_size):
            idx = rows[b:b + batch_size]
            shown = [prepared.image_index[order[i]] for i in idx]
            loaded = {k: prepared.pixels(k) for k in dict.fromkeys(shown)}  # each picture once
            pixels = torch.stack([loaded[k] for k in shown])
            for i, c in zip(idx, complete(model, tokenizer, [prepared.prompts[i] for i in idx], cfg,
                                          stops, pixel_values=pixels)):
                done[i] = c
            bar.update(len(idx))
    seconds = time.perf_counter() - start  # images read included: what evaluating a set costs
    bar.close()
    return [done[i] for i in range(n)], seconds


def vqa_scores(model, tokenizer, convs: list[ImageConversation], proc: ImageProcessing | None = None, *,
               shuffle: bool = False, seed: int = 0, batch_size: int = 32, progress: bool = True,
               generation: GenerationConfig | None = None, prepared: Prepared | None = None) -> VQAResult:
    """Answer every question of `convs` that has an image (greedy by default: the
    "eval-generation" row with VQA_DECODING) and score it; `shuffle`: each question shown
    another question's picture (`derangement` seeded by `seed`). `proc` defaults to the
    model's own preprocessing; `prepared` reuses the prompts and pictures of an earlier call
    on the same conversations. Raises UserError for a text-only model, an unreadable image,
    or nothing to evaluate."""
    cfg = generation or decoding_defaults("eval-generation", **VQA_DECODING)
    prepared = prepared or prepare(model, tokenizer, convs, proc or image_processing_of(model))
    if not prepared.examples:
        raise UserError(f"no questions with an image to evaluate (skipped: {_skips(prepared.skipped)})")
    order = image_order(prepared, shuffle, seed)
    completions, seconds = answer(model, tokenizer, prepared, order, cfg, batch_size=batch_size,
                                  desc="vqa (shuffled images)" if shuffle else "vqa", progress=progress)
    examples = []
    for i, (ex, c) in enumerate(zip(prepared.examples, completions)):
        text = c.text.strip()
        examples.append(VQAExample(ex.where, ex.qtype, ex.question, ex.reference, text,
                                   answer_matches(text, ex.reference), c.finish_reason,
                                   prepared.examples[order[i]].image_from))
    accuracy, counts = _by_type(examples)
    return VQAResult(examples, accuracy, counts, seconds, shuffle, dict(prepared.skipped))


def _by_type(examples: list[VQAExample]) -> tuple[dict[str, float], dict[str, int]]:
    right: Counter = Counter()
    counts: Counter = Counter()
    for e in examples:
        for label in (type_label(e.qtype), ALL):
            counts[label] += 1
            right[label] += e.correct
    return {k: right[k] / counts[k] for k in counts}, dict(counts)


def _skips(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none"


def type_order(labels) -> list[str]:
    """QTYPES first (in their order), then other types as met, OTHER last (ALL left out)."""
    labels = [t for t in dict.fromkeys(labels) if t != ALL]
    known = [t for t in QTYPES if t in labels]
    rest = [t for t in labels if t not in QTYPES and t != OTHER]
    return known + rest + ([OTHER] if OTHER in labels else [])


# ----------------------------------------------------------------------------- the task

@dataclass
class VQAOptions:
    data: str | list[ImageConversation] = DEFAULT_DATA  # LLaVA .json/.jsonl (or a folder of them),
                                                        # builtin:shapes-zh#test, or conversations
    images: str | None = None          # the folder image paths are relative to (default: the
                                       # data file's folder)
    shuffle_images: bool = False       # also answer with the pictures deranged (a second pass)
    shuffle_seed: int = 0
    generation: GenerationConfig = field(
        default_factory=lambda: decoding_defaults("eval-generation", **VQA_DECODING))
    limit: int | None = None           # the first N conversations only
    batch_size: int = 32
    progress: bool = True

    def check(self) -> None:
        """Every option problem, before the model loads or the data is read."""
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        self.generation.check()
        if self.generation.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1 to generate an answer")
        if self.generation.num_beams > 1:
            raise UserError("the vqa task cannot use beam search (it does not take images): "
                            "decode greedily or sample")


def read_conversations(opts: VQAOptions, image_size: int) -> tuple[list[ImageConversation], str, BadRecords]:
    """(the first `limit` conversations, what the report calls the data, records skipped for
    a missing or unreadable image). Built-in pictures are drawn at the encoder's size, as
    training draws them."""
    bad = BadRecords()
    if isinstance(opts.data, list):
        convs = opts.data[:opts.limit]
        data = f"{len(opts.data)} conversations" + (f" from {convs[0].where}" if convs else "")
        return convs, data, bad
    source = str(opts.data)
    # A built-in set's first k scenes do not depend on how many are drawn; each has >= 1 question.
    n = opts.limit if source.startswith("builtin:") else None
    images = Path(opts.images) if opts.images else None
    convs = image_conversations(source, images, kind="qa", bad=bad, size=image_size, n=n)
    return convs[:opts.limit], source, bad


def run_vqa(model, tokenizer, opts: VQAOptions) -> EvalResult:
    """Answer every question (and again with shuffled pictures when asked), score per type."""
    opts.check()
    _require_vision(model)
    proc = image_processing_of(model)
    convs, data, bad = read_conversations(opts, proc.image_size)
    if not convs:
        raise UserError(f"{data}: no conversations")
    prepared = prepare(model, tokenizer, convs, proc)
    if bad.count:
        prepared.skipped["missing or unreadable image"] = bad.count
    common = dict(batch_size=opts.batch_size, progress=opts.progress, generation=opts.generation,
                  prepared=prepared)
    normal = vqa_scores(model, tokenizer, convs, **common)
    shuffled = (vqa_scores(model, tokenizer, convs, shuffle=True, seed=opts.shuffle_seed, **common)
                if opts.shuffle_images else None)
    majority = _majority([type_label(e.qtype) for e in normal.examples], [e.reference for e in normal.examples])
    return vqa_result(data, normal, shuffled, majority, settings(opts))


def vqa_result(data: str, normal: VQAResult, shuffled: VQAResult | None, majority: dict[str, float],
               settings_: dict) -> EvalResult:
    columns = ["type", "n", "accuracy"] + (["shuffled images"] if shuffled else []) + ["majority", "images/s"]
    rows = []
    for label in type_order(normal.counts) + [ALL]:
        row = {"type": label, "n": normal.counts[label], "accuracy": normal.accuracy[label]}
        if shuffled:
            row["shuffled images"] = shuffled.accuracy[label]
        row["majority"] = majority[label]
        rows.append(row)
    rows[-1]["images/s"] = normal.images_per_second
    metrics: dict = {"accuracy": normal.accuracy[ALL], "majority": majority[ALL], "n": normal.counts[ALL]}
    if shuffled:
        metrics["accuracy_shuffled_images"] = shuffled.accuracy[ALL]
    for label in type_order(normal.counts):
        metrics[f"accuracy/{label}"] = normal.accuracy[label]
        if shuffled:
            metrics[f"accuracy_shuffled_images/{label}"] = shuffled.accuracy[label]
        metrics[f"majority/{label}"] = majority[label]
        metrics[f"n/{label}"] = normal.counts[label]
    metrics.update(seconds=normal.seconds, images_per_s=normal.images_per_second,
                   skipped=sum(normal.skipped.values()))
    if normal.skipped:
        settings_ = {**settings_, "skipped": _skips(normal.skipped)}
    examples = []
    for i, e in enumerate(normal.examples):
        record = {"where": e.where, "qtype": e.qtype, "question": e.question, "reference": e.reference,
                  "prediction": e.prediction, "correct": e.correct, "finish_reason": e.finish_reason}
        if shuffled:
            s = shuffled.examples[i]
            record.update(image_from_shuffled=s.image_from, prediction_shuffled=s.prediction,
                          correct_shuffled=s.correct)
        examples.append(record)
    return EvalResult("vqa", data, metrics, columns, rows, settings=settings_, examples=examples)


def settings(opts: VQAOptions) -> dict:
    out: dict = {"shuffle_images": opts.shuffle_images}
    if opts.shuffle_images:
        out["shuffle_seed"] = opts.shuffle_seed
    if opts.images:
        out["images"] = str(opts.images)
    out["max_new_tokens"] = opts.generation.max_new_tokens
    out.update(changed_settings(opts.generation, decoding_defaults("eval-generation", **VQA_DECODING)))
    out["limit"] = opts.limit
    return out
