"""Chat templates: our renderer agrees with transformers' apply_chat_template (text, ids and
assistant mask), prompts encode to a prefix of the trained conversation, masks cover exactly
the answers, and user mistakes are one-line UserErrors."""

from __future__ import annotations

import pytest

from babyllama.errors import UserError
from babyllama.tokenizer import Tokenizer
from babyllama.tokenizer.chat_template import (DEFAULT_TEMPLATE, TEMPLATES, encode_chat, render,
                                               resolve_template, stop_token_ids)
from conftest import SHARED_DATA

SYSTEM = {"role": "system", "content": "你是一个乐于助人的助手。"}
TURNS = [
    {"role": "user", "content": "今天天气怎么样？"},
    {"role": "assistant", "content": "今天天气很好，我们去公园散步。"},
    {"role": "user", "content": "The quick brown fox?"},
    {"role": "assistant", "content": "jumps over the lazy dog 123."},
]
DOCUMENT = "人民日报发表新年献词，迈向充满希望的新世纪。"
# What each preset's generation block holds after an answer (besides the answer itself).
BEFORE = {"chatml": "", "babyllama": "", "phi2": " ", "llama2-chinese": " "}
AFTER = {"chatml": "<|im_end|>", "babyllama": "</s>", "phi2": "</s>", "llama2-chinese": "\n</s>"}

CASES = [(preset, system, document)
         for preset in TEMPLATES for system in (False, True) for document in (False, True)]


def conversation(system: bool, n_turns: int = len(TURNS)) -> list[dict]:
    return ([SYSTEM] if system else []) + TURNS[:n_turns]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_tokenizer):
    """transformers' view of the same byte-level BPE (a copy: transformers may modify it)."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(tiny_tokenizer.backend.to_str()),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def hf_documents(document: bool):
    return [{"title": "", "text": DOCUMENT}] if document else None


@pytest.mark.parametrize("preset,system,document", CASES)
@pytest.mark.parametrize("n_turns,gen", [(4, False), (3, True), (1, True), (2, False)])
def test_transformers_renders_the_same_text(hf_tokenizer, preset, system, document, n_turns, gen):
    messages = conversation(system, n_turns)
    ours, _ = render(TEMPLATES[preset], messages, document=DOCUMENT if document else None,
                     add_generation_prompt=gen,
                     special_tokens={"bos": "<s>", "eos": "</s>", "pad": "<pad>"})
    theirs = hf_tokenizer.apply_chat_template(messages, chat_template=TEMPLATES[preset],
                                              tokenize=False, add_generation_prompt=gen,
                                              documents=hf_documents(document))
    assert ours == theirs


@pytest.mark.parametrize("preset,system,document", CASES)
def test_ids_and_mask_match_transformers_assistant_mask(tiny_tokenizer, hf_tokenizer, preset,
                                                        system, document):
    messages = conversation(system)
    enc = encode_chat(tiny_tokenizer, messages, document=DOCUMENT if document else None,
                      template=preset)
    out = hf_tokenizer.apply_chat_template(messages, chat_template=TEMPLATES[preset],
                                           tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True,
                                           documents=hf_documents(document))
    text, _ = render(TEMPLATES[preset], messages, document=DOCUMENT if document else None)
    assert enc.ids == tiny_tokenizer.encode(text, parse_special=True) == list(out["input_ids"])
    assert enc.mask == [bool(m) for m in out["assistant_masks"]]
    assert sum(enc.mask) > 0


@pytest.mark.parametrize("preset,system,document", CASES)
def test_generation_prompt_encodes_to_a_prefix_of_the_trained_conversation(
        tiny_tokenizer, preset, system, document):
    doc = DOCUMENT if document else None
    full = encode_chat(tiny_tokenizer, conversation(system), document=doc, template=preset)
    for k, (start, _) in enumerate(full.spans):
        # The history up to the (k+1)-th user turn, as the chat loop renders it at inference.
        prompt = encode_chat(tiny_tokenizer, conversation(system, 2 * k + 1), document=doc,
                             add_generation_prompt=True, template=preset)
        assert prompt.ids == full.ids[:start]
        assert prompt.mask == full.mask[:start]


@pytest.mark.parametrize("preset", TEMPLATES)
def test_masked_tokens_are_exactly_the_answers_and_the_turn_end(tiny_tokenizer, preset):
    enc = encode_chat(tiny_tokenizer, conversation(True), document=DOCUMENT, template=preset)
    answers = [m["content"] for m in TURNS if m["role"] == "assistant"]
    assert [tiny_tokenizer.decode(enc.ids[a:b], skip_special_tokens=False) for a, b in enc.spans] \
        == [BEFORE[preset] + a + AFTER[preset] for a in answers]
    masked = [i for i, m in zip(enc.ids, enc.mask) if m]
    assert tiny_tokenizer.decode(masked, skip_special_tokens=False) \
        == "".join(BEFORE[preset] + a + AFTER[preset] for a in answers)
    assert enc.mask == [any(a <= i < b for a, b in enc.spans) for i in range(len(enc.ids))]


def test_answer_starting_with_newlines_is_encoded_apart_from_the_header(tiny_tokenizer):
    # Whole-text encoding would merge "assistant\n" + "\n\n..." across the boundary; encoding
    # segment-wise keeps the prompt's tokens whatever the answer starts with.
    messages = [TURNS[0], {"role": "assistant", "content": "\n\n今天天气很好"}]
    full = encode_chat(tiny_tokenizer, messages)
    prompt = encode_chat(tiny_tokenizer, messages[:1], add_generation_prompt=True)
    assert full.ids[:len(prompt.ids)] == prompt.ids
    (a, b), = full.spans
    assert a == len(prompt.ids)
    assert tiny_tokenizer.decode(full.ids[a:b], skip_special_tokens=False) \
        == "\n\n今天天气很好<|im_end|>"


def test_template_defaults_to_the_tokenizers_own_then_chatml(tiny_tokenizer):
    messages = conversation(False, 2)
    assert DEFAULT_TEMPLATE == "chatml"
    saved = tiny_tokenizer.chat_template
    try:
        tiny_tokenizer.chat_template = None
        assert encode_chat(tiny_tokenizer, messages).ids \
            == encode_chat(tiny_tokenizer, messages, template="chatml").ids
        tiny_tokenizer.chat_template = TEMPLATES["babyllama"]
        assert encode_chat(tiny_tokenizer, messages).ids \
            == encode_chat(tiny_tokenizer, messages, template="babyllama").ids
    finally:
        tiny_tokenizer.chat_template = saved


def test_special_token_variables_come_from_the_tokenizer():
    text, spans = render(TEMPLATES["babyllama"], conversation(False, 2),
                         special_tokens={"bos": "<BOS>", "eos": "<EOS>"})
    assert text == "人类：今天天气怎么样？\n\n助手：<BOS>今天天气很好，我们去公园散步。<EOS>\n\n"
    assert [text[a:b] for a, b in spans] == ["今天天气很好，我们去公园散步。<EOS>"]


def test_stop_tokens_are_eos_and_im_end(tiny_tokenizer):
    assert stop_token_ids(tiny_tokenizer) == (tiny_tokenizer.eos_id,
                                              tiny_tokenizer.token_to_id("<|im_end|>"))


@pytest.fixture(scope="module")
def sp_tokenizer():
    path = SHARED_DATA / "tokenizers" / "chatglm2" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return Tokenizer.load(path)


@pytest.mark.parametrize("preset", TEMPLATES)
def test_sentencepiece_tokenizer_masks_the_answers(sp_tokenizer, preset):
    messages = conversation(True)
    enc = encode_chat(sp_tokenizer, messages, document=DOCUMENT, template=preset)
    answers = [m["content"] for m in TURNS if m["role"] == "assistant"]
    # SentencePiece's decode drops the dummy-prefix space at the start of a piece, hence strip.
    decoded = [sp_tokenizer.decode(enc.ids[a:b], skip_special_tokens=True)
               for a, b in enc.spans]
    assert [d.strip() for d in decoded] == answers
    # Each answer ends with the token that stops generation.
    end = "<|im_end|>" if preset == "chatml" else "</s>"
    assert [enc.ids[b - 1] for _, b in enc.spans] == [sp_tokenizer.token_to_id(end)] * 2
    assert sp_tokenizer.token_to_id(end) in stop_token_ids(sp_tokenizer)
    prompt = encode_chat(sp_tokenizer, messages[:-1], document=DOCUMENT,
                         add_generation_prompt=True, template=preset)
    assert prompt.ids == enc.ids[:enc.spans[-1][0]]


# -- user mistakes ------------------------------------------------------------------------


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and message
    return message


def test_resolve_template_accepts_presets_files_and_jinja(tmp_path):
    assert resolve_template("phi2") == TEMPLATES["phi2"]
    source = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert resolve_template(source) == source
    (tmp_path / "t.jinja").write_text(source, encoding="utf-8")
    assert resolve_template(str(tmp_path / "t.jinja")) == source


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserError) as e:
        resolve_template("chatmll")
    assert "'chatmll'" in one_line(e) and all(name in str(e.value) for name in TEMPLATES)


def test_template_syntax_error_names_the_line(tmp_path):
    bad = "{% for m in messages %}\n{{ m.content }\n{% endfor %}"
    with pytest.raises(UserError) as e:
        resolve_template(bad)
    assert one_line(e).startswith("chat template line 2:")
    path = tmp_path / "bad.jinja"
    path.write_text(bad, encoding="utf-8")
    with pytest.raises(UserError) as e:
        resolve_template(str(path))
    assert one_line(e).startswith(f"{path}:2:")


@pytest.mark.parametrize("preset", TEMPLATES)
def test_unknown_role_is_a_user_error(tiny_tokenizer, preset):
    messages = [TURNS[0], {"role": "tool", "content": "42"}]
    with pytest.raises(UserError) as e:
        encode_chat(tiny_tokenizer, messages, template=preset)
    assert "unknown role 'tool'" in one_line(e)


def test_system_message_after_the_first_is_a_user_error(tiny_tokenizer):
    with pytest.raises(UserError) as e:
        encode_chat(tiny_tokenizer, TURNS[:2] + [SYSTEM])
    assert "system message must be the first" in one_line(e)


def test_template_without_generation_blocks_cannot_train(tiny_tokenizer):
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(UserError) as e:
        encode_chat(tiny_tokenizer, TURNS[:2], template=plain)
    assert "{% generation %}" in one_line(e)
    # Prompting for inference needs no mask, so it still works.
    assert encode_chat(tiny_tokenizer, TURNS[:1], template=plain, add_generation_prompt=True).ids
