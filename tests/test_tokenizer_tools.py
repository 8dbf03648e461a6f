"""Tokenizer tools: trimming a SentencePiece vocabulary, and measuring how a tokenizer fits a
corpus (one tokenizer, or a sweep of byte-level BPE vocabulary sizes)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from babyllama.errors import UserError
from babyllama.tokenizer import Tokenizer
from babyllama.tokenizer import trim as trim_module
from babyllama.tokenizer.report import (held_out_split, parameter_counts, sweep_table,
                                        sweep_vocab_sizes, tokenizer_report)
from babyllama.tokenizer.trim import (ID_MAP_FILE, REASONS, is_cjk_ideograph, load_id_map,
                                      read_retain_file, remap_embeddings, remap_ids,
                                      trim_sentencepiece)
from conftest import SHARED_DATA, corpus_lines

CHATGLM2 = SHARED_DATA / "tokenizers/chatglm2/tokenizer.model"
ZHWIKI = SHARED_DATA / "pretrain/zhwiki/paragraphs.jsonl"
needs_chatglm2 = pytest.mark.skipif(not (CHATGLM2.is_file() and ZHWIKI.is_file()),
                                    reason="needs shared/data chatglm2 tokenizer and zhwiki")

ENGLISH = ["Machine learning models need data.", "The tokenizer splits words into pieces.",
           "Small models train quickly on two CPU cores."]
EMOJI = "llamas 🦙🦙 and rockets 🚀 and a rare character 𪚥"


def pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.id_to_token(i) for i in ids]


def assert_same_encodings(result, original: Tokenizer, texts: list[str]) -> None:
    """Every text: the same piece strings, and new ids = old ids mapped through old_to_new."""
    new_tok = result.tokenizer
    for text, old, new in zip(texts, original.encode_batch(texts), new_tok.encode_batch(texts)):
        assert pieces(new_tok, new) == pieces(original, old), text
        assert new == result.old_to_new[old].tolist()


# ----------------------------------------------------------------------------------------
# Trimming tiny SentencePiece models trained here (always run)


def _train_sentencepiece(tmp_path, model_type: str, **options) -> Tokenizer:
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(300) + ENGLISH * 5) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / model_type),
                                   model_type=model_type, vocab_size=400, hard_vocab_limit=False,
                                   minloglevel=2, **options)
    return Tokenizer.load(tmp_path / f"{model_type}.model")


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory) -> Tokenizer:
    return _train_sentencepiece(tmp_path_factory.mktemp("sp"), "bpe", byte_fallback=True)


# A trimming corpus that uses part of the vocabulary, with characters the models lack (bytes
# or <unk>) and one of our special tokens inside the text.
TRIM_TEXTS = corpus_lines(40)[::3] + ENGLISH[:1] + [EMOJI, "<|im_start|>user\n你好"]


@pytest.mark.parametrize("model_type, options", [
    ("bpe", {"byte_fallback": True}),
    ("unigram", {}),  # no byte fallback: unknown characters become <unk>
    ("unigram", {"byte_fallback": True}),
])
def test_trimmed_tiny_model_encodes_the_corpus_identically(tmp_path, model_type, options):
    tok = _train_sentencepiece(tmp_path, model_type, **options)
    result = trim_sentencepiece(tok, TRIM_TEXTS, keep_cjk=False, progress=False)

    assert result.new_pieces < result.original_pieces
    assert sum(result.kept_by_reason.values()) == result.new_pieces
    assert list(result.kept_by_reason) == list(REASONS)
    assert result.new_vocab_size == result.tokenizer.vocab_size
    assert_same_encodings(result, tok, TRIM_TEXTS)
    # The written model is a plain SentencePiece model.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=result.model_bytes)
    assert sp.get_piece_size() == result.new_pieces
    assert sp.encode(TRIM_TEXTS[0], out_type=str) == tok.backend.encode(TRIM_TEXTS[0], out_type=str)


def test_saved_trim_loads_with_tokenizer_load_and_maps_ids(tiny_bpe, tmp_path):
    result = trim_sentencepiece(tiny_bpe, TRIM_TEXTS, keep_cjk=False, progress=False)
    out = result.save(tmp_path / "trimmed")
    assert {p.name for p in out.iterdir()} == {"tokenizer.model", "tokenizer_config.json", ID_MAP_FILE}
    assert (out / "tokenizer.model").read_bytes() == result.model_bytes

    loaded = Tokenizer.load(out)
    assert loaded.vocab_size == result.new_vocab_size
    assert loaded.special_token_ids == result.tokenizer.special_token_ids
    # Same roles as the original; our appended specials follow the new last piece.
    assert loaded.special_tokens == tiny_bpe.special_tokens
    assert loaded.pad_id == result.new_pieces
    assert result.old_to_new[tiny_bpe.pad_id] == loaded.pad_id
    for text in TRIM_TEXTS:
        assert loaded.decode(loaded.encode(text)) == tiny_bpe.decode(tiny_bpe.encode(text))
    assert loaded.encode_batch(TRIM_TEXTS) == result.tokenizer.encode_batch(TRIM_TEXTS)

    np.testing.assert_array_equal(load_id_map(out), result.old_to_new)
    assert result.old_to_new.dtype == np.int32 and len(result.old_to_new) == tiny_bpe.vocab_size


def test_remap_embeddings_and_ids(tiny_bpe):
    import torch

    result = trim_sentencepiece(tiny_bpe, TRIM_TEXTS, keep_cjk=False, progress=False)
    weight = torch.arange(tiny_bpe.vocab_size * 2, dtype=torch.float32).view(-1, 2)
    new = remap_embeddings(weight, result)
    assert new.shape == (result.new_vocab_size, 2)
    old_ids = tiny_bpe.encode(TRIM_TEXTS[0], add_bos=True, add_eos=True)
    new_ids = remap_ids(old_ids, result.old_to_new)
    assert new_ids.tolist() == result.tokenizer.encode(TRIM_TEXTS[0], add_bos=True, add_eos=True)
    # A model keeps each kept token's vector: new row of a token == its old row.
    torch.testing.assert_close(new[torch.as_tensor(new_ids)], weight[torch.as_tensor(old_ids)])
    np.testing.assert_array_equal(remap_embeddings(weight.numpy(), result), new.numpy())

    removed = int(np.flatnonzero(result.old_to_new < 0)[0])
    with pytest.raises(UserError, match="removed"):
        remap_ids([removed], result.old_to_new)
    with pytest.raises(UserError, match="rows"):
        remap_embeddings(weight[:-1], result)


def test_keep_cjk_and_retain_add_pieces(tiny_bpe, tmp_path):
    base = trim_sentencepiece(tiny_bpe, TRIM_TEXTS[:2], keep_cjk=False, progress=False)
    with_cjk = trim_sentencepiece(tiny_bpe, TRIM_TEXTS[:2], keep_cjk=True, progress=False)
    cjk = [p for p in map(tiny_bpe.id_to_token, range(base.original_pieces))
           if p.lstrip("▁") and all(map(is_cjk_ideograph, p.lstrip("▁")))]
    assert with_cjk.new_pieces > base.new_pieces
    assert all(with_cjk.tokenizer.token_to_id(p) is not None for p in cjk)

    retain_file = tmp_path / "retain.txt"
    piece = pieces(tiny_bpe, tiny_bpe.encode("Machine"))[0]  # a piece the two texts lack
    retain_file.write_text(f"{piece}\nmodels need\n\nquickly\n", encoding="utf-8")
    retain = read_retain_file(retain_file)
    assert retain == [piece, "models need", "quickly"]
    result = trim_sentencepiece(tiny_bpe, TRIM_TEXTS[:2], keep_cjk=False, retain=retain, progress=False)
    assert result.retain_entries == 3
    assert result.retain_not_pieces == 2  # "models need" and "quickly" are tokenized
    assert result.kept_by_reason["retain"] > 0
    assert_same_encodings(result, tiny_bpe, retain + TRIM_TEXTS[:2])


def test_trim_rejects_hf_tokenizers_and_empty_corpora(tiny_tokenizer, tiny_bpe, tmp_path):
    tiny_tokenizer.save(tmp_path / "bpe")
    for tok in (tmp_path / "bpe" / "tokenizer.json", tiny_tokenizer):
        with pytest.raises(UserError, match="trim works on SentencePiece models.*--vocab-size"):
            trim_sentencepiece(tok, ["你好"], progress=False)
    with pytest.raises(UserError, match="empty corpus"):
        trim_sentencepiece(tiny_bpe, ["", "  \n"], progress=False)
    with pytest.raises(UserError, match="retain"):
        read_retain_file(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------------------
# Trimming ChatGLM2 on zhwiki (shared data)


@pytest.fixture(scope="module")
def chatglm2() -> Tokenizer:
    return Tokenizer.load(CHATGLM2)


@pytest.fixture(scope="module")
def zhwiki() -> list[str]:
    with ZHWIKI.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def chatglm2_trimmed(chatglm2, zhwiki):
    return trim_sentencepiece(chatglm2, zhwiki, keep_cjk=False, progress=False)


@needs_chatglm2
def test_chatglm2_trimmed_on_zhwiki_encodes_every_paragraph_identically(chatglm2, zhwiki,
                                                                        chatglm2_trimmed, tmp_path):
    result = chatglm2_trimmed
    assert result.original_pieces == 64_789 and result.documents == len(zhwiki)
    assert result.new_pieces < 40_000  # 24,289 when written
    assert result.kept_by_reason["closure"] > 0
    assert result.kept_by_reason["special"] == 259  # <unk>, <s>, </s> and 256 bytes
    assert_same_encodings(result, chatglm2, zhwiki)

    # Bytes are kept, so text the corpus never had still encodes, to byte pieces, and decodes.
    new = result.tokenizer
    ids = new.encode(EMOJI)
    assert "<0xF0>" in pieces(new, ids) and new.decode(ids) == EMOJI

    loaded = Tokenizer.load(result.save(tmp_path / "trimmed"))
    assert loaded.encode_batch(zhwiki[:50]) == new.encode_batch(zhwiki[:50])
    assert (loaded.bos_id, loaded.eos_id, loaded.unk_id) == (1, 2, 0)


@needs_chatglm2
def test_chatglm2_keep_cjk_keeps_every_chinese_piece(chatglm2, zhwiki, chatglm2_trimmed):
    result = trim_sentencepiece(chatglm2, zhwiki, keep_cjk=True, progress=False)
    assert chatglm2_trimmed.new_pieces < result.new_pieces < 64_789  # 37,247 when written
    assert result.kept_by_reason["cjk"] > 10_000
    assert_same_encodings(result, chatglm2, zhwiki[:200])


@needs_chatglm2
def test_chatglm2_retained_english_words_encode_as_before(chatglm2, zhwiki):
    words = ["tokenizer", "transformer", "▁the", "embedding", "quantization"]
    result = trim_sentencepiece(chatglm2, zhwiki[:20], keep_cjk=False, retain=words, progress=False)
    assert result.retain_not_pieces == 4  # only "▁the" is a piece
    assert_same_encodings(result, chatglm2, words + [" ".join(words)])
    plain = trim_sentencepiece(chatglm2, zhwiki[:20], keep_cjk=False, progress=False)
    assert plain.tokenizer.encode("tokenizer") != plain.old_to_new[chatglm2.encode("tokenizer")].tolist()


@needs_chatglm2
def test_without_the_substring_closure_encodings_change(chatglm2, zhwiki, monkeypatch):
    """Why the closure is there: without it, BPE loses intermediate merges."""
    monkeypatch.setattr(trim_module, "_substring_closure", lambda proto, kept: set(kept))
    result = trim_sentencepiece(chatglm2, zhwiki, keep_cjk=False, progress=False)
    new = result.tokenizer
    changed = sum(pieces(new, n) != pieces(chatglm2, o)
                  for o, n in zip(chatglm2.encode_batch(zhwiki), new.encode_batch(zhwiki)))
    assert changed > 0


# ----------------------------------------------------------------------------------------
# Reports


REPORT_TEXTS = ["今天天气很好，我们去公园散步。", "The quick brown fox 123.", "🦙 羴 emoji", ""]


def test_report_numbers_match_a_direct_computation(tiny_tokenizer):
    report = tokenizer_report(tiny_tokenizer, REPORT_TEXTS, top_k=5)
    texts = [t for t in REPORT_TEXTS if t]
    ids = [i for t in texts for i in tiny_tokenizer.encode(t)]
    counts = Counter(ids)
    assert report.documents == 3
    assert report.characters == sum(map(len, texts))
    assert report.utf8_bytes == sum(len(t.encode("utf-8")) for t in texts)
    assert report.tokens == len(ids)
    assert report.chars_per_token == pytest.approx(report.characters / len(ids))
    assert report.bytes_per_token == pytest.approx(report.utf8_bytes / len(ids))
    # Byte-level: a token that is part of a character decodes to U+FFFD on its own.
    partial = sum(c for i, c in counts.items() if "\ufffd" in tiny_tokenizer.decode([i]))
    assert report.byte_fallback_tokens == partial > 0
    assert report.unknown_tokens == 0
    assert report.distinct_tokens == len(counts)
    assert report.coverage == pytest.approx(len(counts) / tiny_tokenizer.vocab_size)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]  # ties: lower id first
    assert [(t["id"], t["count"]) for t in report.top_tokens] == top
    assert report.embedding_share is None

    d = report.to_dict()
    assert json.loads(json.dumps(d))["tokens"] == len(ids)
    table = report.table()
    assert "| characters / token |" in table and table.count("\n| ") >= 10 + 5


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_arithmetic_matches_the_model(tied):
    from babyllama.model.llama import Llama, ModelConfig

    config = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    assert parameter_counts(config) == Llama(config).parameter_counts()
    counts = parameter_counts(config, vocab_size=1000)
    assert counts["embedding"] == 1000 * 32 and counts["lm_head"] == (0 if tied else 1000 * 32)


def test_report_with_a_preset(tiny_tokenizer):
    from babyllama.config import load_config

    report = tokenizer_report(tiny_tokenizer, REPORT_TEXTS, "43m")
    counts = parameter_counts(load_config("43m").model, tiny_tokenizer.vocab_size)
    assert report.parameters == counts and report.preset == "43m"
    share = (counts["embedding"] + counts["lm_head"]) / counts["total"]
    assert report.embedding_share == pytest.approx(share)
    assert "embedding + LM head share (43m)" in report.table()  # 43m has an untied head
    with pytest.raises(UserError, match="empty corpus"):
        tokenizer_report(tiny_tokenizer, ["", ""])


def test_sweep_of_vocab_sizes(tmp_path):
    reports = sweep_vocab_sizes(lambda: iter(corpus_lines(400)), [500, 300, 400],
                                corpus_lines(500)[400:], "demo-cpu", save_dir=tmp_path,
                                progress=False)
    assert [r.vocab_size for r in reports] == [300, 400, 500]
    cpt = [r.chars_per_token for r in reports]
    share = [r.embedding_share for r in reports]
    assert cpt == sorted(cpt)
    assert share[0] < share[1] < share[2]
    assert Tokenizer.load(tmp_path / "vocab-400").vocab_size == 400
    table = sweep_table(reports)
    assert len(table.splitlines()) == 2 + 3 and "embedding share" in table


def test_held_out_split_is_disjoint_and_rereadable():
    docs = [f"doc {k}" for k in range(1000)]
    training, held_out = held_out_split(lambda: iter(docs), every=10, limit=50)
    assert held_out == docs[0:500:10]
    train = list(training())
    assert list(training()) == train  # a fresh iterator each call
    assert sorted(train + held_out) == sorted(docs) and not set(train) & set(held_out)


@needs_chatglm2
def test_chatglm2_report_counts_byte_fallback_pieces(chatglm2, zhwiki):
    emoji = tokenizer_report(chatglm2, [EMOJI * 3, "表情 😀🎉👍 很多 🦙"])
    assert emoji.byte_fallback_rate > 0.3 and emoji.unknown_tokens == 0
    wiki = tokenizer_report(chatglm2, zhwiki[:200], "43m")
    assert wiki.chars_per_token > 1.2 and wiki.byte_fallback_rate < 0.01
    assert 0.7 < wiki.embedding_share < 0.8  # the 43m preset's note: 77% at vocab 64,789
