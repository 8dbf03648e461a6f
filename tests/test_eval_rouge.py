"""The rouge task: the hand-written metric against Google's rouge-score, the summarization
readers (CSL, LCSTS, jsonl/json/csv) and their one-line errors, and generation + scoring end to
end on a tiny random model."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import SHARED_DATA
from rouge_score import rouge_scorer
from test_model import tiny_config

from babyllama.errors import UserError
from babyllama.eval.rouge import (RougeOptions, fit_prompt, read_summaries, rouge_l, rouge_n,
                                  rouge_scores, rouge_tokens, run_rouge)
from babyllama.infer.config import GenerationConfig
from babyllama.model.llama import Llama

CSL = SHARED_DATA / "summarization" / "csl" / "ts_dev.tsv"
needs_csl = pytest.mark.skipif(not CSL.exists(), reason="shared CSL data absent")


class Given:
    """rouge-score's tokenizer interface, handing it exactly our token lists."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table

    def tokenize(self, text: str) -> list[str]:
        return self.table[text]


def reference_scores(pairs: list[tuple[list[str], list[str]]]) -> list[dict]:
    """rouge-score's rouge1/2/L for each (prediction tokens, reference tokens)."""
    table = {}
    keys = []
    for pred, ref in pairs:
        p, r = f"p{len(table)}", f"r{len(table) + 1}"
        table[p], table[r] = pred, ref
        keys.append((p, r))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Given(table))
    return [scorer.score(r, p) for p, r in keys]  # score(target, prediction)


def assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-12)


def assert_pairs_match_rouge_score(pairs):
    for (pred, ref), theirs in zip(pairs, reference_scores(pairs)):
        assert_same(rouge_n(pred, ref, 1), theirs["rouge1"])
        assert_same(rouge_n(pred, ref, 2), theirs["rouge2"])
        assert_same(rouge_l(pred, ref), theirs["rougeL"])


def test_rouge_n_and_l_equal_rouge_score_on_random_token_lists():
    rng = random.Random(0)
    pairs = [([], []), (["a"], []), ([], ["a", "b"]), (list("abcab"), list("abcab")),
             (["a"], ["a"]), (list("aaaa"), list("aa"))]
    for _ in range(400):
        vocab = "abcdef"[:rng.randint(1, 6)]  # small vocabularies: repeats and partial overlaps
        pairs.append(([rng.choice(vocab) for _ in range(rng.randint(0, 15))],
                      [rng.choice(vocab) for _ in range(rng.randint(0, 15))]))
    assert_pairs_match_rouge_score(pairs)
    assert rouge_n(list("abc"), list("abc"), 2).fmeasure == 1.0
    assert rouge_l([], list("abc")) == (0.0, 0.0, 0.0)


@needs_csl
def test_char_level_scores_equal_rouge_score_on_csl_titles_and_abstracts():
    pairs = []
    for i, ex in enumerate(read_summaries(CSL)[:150]):
        prediction = ex.source[:10 + i % 40]  # abstracts' openings share words with titles
        pairs.append((rouge_tokens(prediction), rouge_tokens(ex.reference)))
    assert_pairs_match_rouge_score(pairs)
    assert any(rouge_n(p, r, 2).fmeasure > 0 for p, r in pairs)


def test_char_tokens_drop_whitespace_and_lowercase_ascii_only():
    assert rouge_tokens("基于 SOS\t方法 Ａ\n") == ["基", "于", "s", "o", "s", "方", "法", "Ａ"]
    s = rouge_scores(rouge_tokens("ROUGE 评测"), rouge_tokens("rouge评测"))
    assert s["rouge1"].fmeasure == s["rouge2"].fmeasure == s["rougeL"].fmeasure == 1.0


def test_word_level_uses_jieba_words_without_whitespace():
    pytest.importorskip("jieba")
    words = rouge_tokens("今天天气很好 Hello World，我们去公园散步。", "word")
    assert "公园" in words and "hello" in words and "world" in words
    assert all(w.strip() == w and w for w in words)


def test_unknown_level_is_a_user_error():
    with pytest.raises(UserError, match="unknown ROUGE level"):
        rouge_tokens("文本", "sentence")


# ----------------------------------------------------------------------------- readers

@needs_csl
def test_csl_tsv_gives_abstracts_as_sources_and_titles_as_references():
    examples = read_summaries(CSL)
    assert len(examples) == 1000
    first = CSL.read_text(encoding="utf-8").split("\n", 1)[0].split("\t")
    assert (examples[0].source, examples[0].reference) == (first[1], first[2])
    assert examples[0].where == f"{CSL}:1" and examples[-1].where == f"{CSL}:1000"


LCSTS = """<doc id=0>
    <summary>
        修改后的立法法全文公布
    </summary>
    <short_text>
        新华社受权于18日全文播发修改后的《中华人民共和国立法法》。
    </short_text>
</doc>
<doc id=1>
    <human_label>5</human_label>
    <summary>
        深圳机场9死24伤续
    </summary>
    <short_text>
        一辆小轿车在深圳机场冲向人群，造成9人死亡24人受伤。
    </short_text>
</doc>
"""


def test_lcsts_original_format_is_read_from_its_tags(tmp_path):
    path = tmp_path / "PART_III.txt"
    path.write_text(LCSTS, encoding="utf-8")
    examples = read_summaries(path)
    assert [(e.source, e.reference) for e in examples] == [
        ("新华社受权于18日全文播发修改后的《中华人民共和国立法法》。", "修改后的立法法全文公布"),
        ("一辆小轿车在深圳机场冲向人群，造成9人死亡24人受伤。", "深圳机场9死24伤续")]
    assert [e.where for e in examples] == [f"{path}:2", f"{path}:11"]


def test_jsonl_json_and_csv_pick_default_or_given_fields(tmp_path):
    rows = [{"id": 1, "content": "正文一", "title": "标题一", "summary": "摘要一"},
            {"id": 2, "content": "正文二", "title": "标题二", "summary": "摘要二"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in rows), encoding="utf-8")
    ex = read_summaries(jsonl)
    assert [(e.source, e.reference, e.where) for e in ex] == [
        ("正文一", "摘要一", f"{jsonl}:1"), ("正文二", "摘要二", f"{jsonl}:3")]
    assert read_summaries(jsonl, target_field="TITLE")[1].reference == "标题二"

    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    ex = read_summaries(js, "summary", "title")
    assert [(e.source, e.reference) for e in ex] == [("摘要一", "标题一"), ("摘要二", "标题二")]
    assert [e.where for e in ex] == [f"{js}:2", f"{js}:8"]

    csv = tmp_path / "d.csv"
    csv.write_text('Abstract,Title\n"一段,带逗号的\n正文",标题\n', encoding="utf-8")
    (e,) = read_summaries(csv)
    assert (e.source, e.reference, e.where) == ("一段,带逗号的\n正文", "标题", f"{csv}:3")
    assert read_summaries(csv, "title", "abstract")[0].reference.startswith("一段")


def test_tsv_two_fields_header_names_and_column_numbers(tmp_path):
    two = tmp_path / "two.tsv"
    two.write_text("正文一\t摘要一\n\n正文二\t摘要二\n", encoding="utf-8")
    assert [(e.source, e.reference) for e in read_summaries(two)] == [("正文一", "摘要一"),
                                                                      ("正文二", "摘要二")]
    header = tmp_path / "header.tsv"
    header.write_text("doc\tsumm\textra\n正文\t摘要\t其他\n", encoding="utf-8")
    (e,) = read_summaries(header, "DOC", "summ")
    assert (e.source, e.reference, e.where) == ("正文", "摘要", f"{header}:2")
    assert read_summaries(header, "2", "0")[1].reference == "正文"  # no names given: row 1 is data
    auto = tmp_path / "auto.tsv"
    auto.write_text("text\tsummary\n正文\t摘要\n", encoding="utf-8")
    assert len(read_summaries(auto)) == 1


BAD = [
    ("bad.tsv", "a\tb\tc\nd\te\n", "bad.tsv:2: expected 3 tab-separated fields, found 2"),
    ("bad.tsv", "only one field\n", "bad.tsv:1: expected 2 (text, summary) or 3"),
    ("bad.tsv", "正文\t \n", "bad.tsv:1: the reference summary is empty"),
    ("bad.tsv", "a\tb\n", "bad.tsv:1: no column 'title' in the first row"),
    ("bad.jsonl", '{"text": "t", "summary": "s"}\n{"text": "t", \n', "bad.jsonl:2: invalid JSON"),
    ("bad.jsonl", '{"text": "t", "summary": "s"}\n{"text": "t"}\n',
     "bad.jsonl:2: no field 'summary'; fields: 'text'"),
    ("bad.jsonl", '{"text": "", "summary": "s"}\n', "bad.jsonl:1: the source text is empty"),
    ("bad.jsonl", '{"body": "t", "summary": "s"}\n', "bad.jsonl:1: no source column among text"),
    ("bad.jsonl", '[1, 2]\n', "bad.jsonl:1: expected a JSON object, found list"),
    ("bad.json", '[\n {"text": "t",\n  "summary": "s"},\n {"text": "t"}\n]',
     "bad.json:4: no field 'summary'"),
    ("bad.json", '[\n {"text": "t" "summary": "s"}\n]', "bad.json:2: invalid JSON"),
    ("bad.csv", "text,summary\na,b\nc\n", "bad.csv:3: expected 2 comma-separated fields, found 1"),
    ("bad.csv", "text,title\na,b\n", "bad.csv:1: no reference column 'headline'; columns: 'text', 'title'"),
    ("bad.tsv", b"a\tb\n\xff\xfe\tc\n", "bad.tsv:2: not UTF-8 text"),
    ("PART_I.txt", "<summary>\n  标题\n</summary>\n", "PART_I.txt:1: expected <summary>"),
    ("PART_I.txt", "just text\n", "PART_I.txt: no <summary> tag"),
    ("empty.jsonl", "\n\n", "empty.jsonl: no examples"),
    ("data.parquet", "x", "data.parquet: unknown summarization format"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[m.split(": ", 1)[1][:30] for *_, m in BAD])
def test_bad_summarization_files_give_one_line_errors_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    target = "headline" if "headline" in message else "title" if "'title' in" in message else None
    with pytest.raises(UserError) as e:
        read_summaries(path, target_field=target)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(tmp_path))
    assert message in text


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nothing.tsv: no such file"):
        read_summaries(tmp_path / "nothing.tsv")


# ----------------------------------------------------------------------------- the task

SOURCES = ["今天天气很好，我们去公园散步。", "中国的经济发展很快，人民生活水平不断提高。",
           "这个手机的屏幕很大，电池也很耐用。", "机器学习和自然语言处理很有意思。"]


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    torch.manual_seed(0)
    return Llama(tiny_config(vocab_size=tiny_tokenizer.vocab_size, max_position_embeddings=64,
                             num_hidden_layers=2)).eval()


@pytest.fixture
def summaries(tmp_path):
    path = tmp_path / "sum.jsonl"
    rows = [{"text": s, "summary": s[:6]} for s in SOURCES]
    rows.append({"text": "人民日报发表新年献词，" * 12, "summary": "新年献词"})  # > 64 tokens
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def options(path, **kw) -> RougeOptions:
    return RougeOptions(data=str(path), progress=False,
                        generation=GenerationConfig(temperature=0, max_new_tokens=8), **kw)


def test_run_rouge_scores_its_predictions_as_rouge_score_does(tiny_model, tiny_tokenizer, summaries):
    result = run_rouge(tiny_model, tiny_tokenizer, options(summaries, batch_size=2))
    assert result.task == "rouge" and result.data == str(summaries)
    assert result.metrics["n"] == len(result.examples) == 5
    pairs = [(rouge_tokens(e["prediction"]), rouge_tokens(e["reference"])) for e in result.examples]
    theirs = reference_scores(pairs)
    for name in ("rouge1", "rouge2", "rougeL"):
        for kind, attr in (("f", "fmeasure"), ("p", "precision"), ("r", "recall")):
            expected = sum(getattr(t[name], attr) for t in theirs) / len(theirs)
            assert result.metrics[f"{name}_{kind}"] == pytest.approx(expected, abs=1e-12)
        assert [e[f"{name}_f"] for e in result.examples] == \
            pytest.approx([t[name].fmeasure for t in theirs], abs=1e-12)
    assert all("\n" not in e["prediction"] and e["prediction"] == e["prediction"].strip()
               for e in result.examples)
    assert result.rows[0]["ROUGE-1 F"] == result.metrics["rouge1_f"]
    assert set(result.columns) >= {"examples", "ROUGE-1 F", "ROUGE-2 F", "ROUGE-L F"}
    assert result.settings["max_new_tokens"] == 8 and "temperature" not in result.settings


def test_too_long_source_is_shortened_and_counted(tiny_model, tiny_tokenizer, summaries):
    result = run_rouge(tiny_model, tiny_tokenizer, options(summaries))
    assert result.metrics["shortened"] == result.settings["shortened"] == 1
    assert [e["shortened"] for e in result.examples] == [False] * 4 + [True]
    assert all(e["prompt_tokens"] + 8 <= 64 for e in result.examples)
    ids, shortened = fit_prompt(tiny_tokenizer, "{text}\n摘要：", "人民日报发表新年献词，" * 12,
                                chat=False, budget=30)
    text = tiny_tokenizer.decode(ids)
    assert shortened and len(ids) <= 30 and text.startswith("人民日报") and text.endswith("\n摘要：")


def test_limit_and_chat_template(tiny_model, tiny_tokenizer, summaries):
    result = run_rouge(tiny_model, tiny_tokenizer, options(summaries, limit=2, chat=True))
    assert result.metrics["n"] == 2 and [e["reference"] for e in result.examples] == \
        [s[:6] for s in SOURCES[:2]]
    assert result.settings["limit"] == 2 and result.settings["chat"] is True


@pytest.mark.parametrize("kw,message", [
    ({"level": "sentence"}, "--rouge-level must be one of char, word"),
    ({"template": "摘要："}, "must contain {text}"),
    ({"limit": 0}, "limit must be at least 1"),
    ({"template": "请为下面的文章写一个很短的中文标题。" * 8 + "{text}"}, "template alone takes"),
])
def test_bad_options_are_user_errors(tiny_model, tiny_tokenizer, summaries, kw, message):
    with pytest.raises(UserError, match=message):
        run_rouge(tiny_model, tiny_tokenizer, options(summaries, **kw))


def test_word_level_run(tiny_model, tiny_tokenizer, summaries):
    pytest.importorskip("jieba")
    result = run_rouge(tiny_model, tiny_tokenizer, options(summaries, level="word", limit=2))
    assert result.settings["level"] == "word"
    pairs = [(rouge_tokens(e["prediction"], "word"), rouge_tokens(e["reference"], "word"))
             for e in result.examples]
    expected = sum(t["rouge1"].fmeasure for t in reference_scores(pairs)) / 2
    assert result.metrics["rouge1_f"] == pytest.approx(expected, abs=1e-12)
