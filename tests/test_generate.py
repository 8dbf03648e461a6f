"""The generation engine against transformers' `generate` on the same weights: greedy and beam
search give the same tokens, the logit processors the same distributions; batching, several
samples per prompt, stop strings, streaming and long prompts behave."""

from __future__ import annotations

import pytest
import torch

from babyllama.errors import UserError
from babyllama.infer.beam import beam_search
from babyllama.infer.config import GenerationConfig, generation_config
from babyllama.infer.engine import Batch, Decoder
from babyllama.infer.generate import Detokenizer, StopStrings, complete, stream
from babyllama.infer.logits import History, process_logits
from babyllama.model.llama import Llama

from conftest import hf_twin
from test_model import tiny_config

transformers = pytest.importorskip("transformers")
from transformers.generation import (MinPLogitsWarper, NoRepeatNGramLogitsProcessor,  # noqa: E402
                                     RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                     TopKLogitsWarper, TopPLogitsWarper)

# The "end of text" id for the beam tests: a token this random model likes (its greedy 4th
# token after the beam prompt), so hypotheses do end on it and the finished-beam path is tested.
EOS = 90


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(3)
    model = Llama(tiny_config(max_position_embeddings=128)).eval()
    return model, hf_twin(model)


def decode(model, prompts, stop_ids=(), **settings) -> Decoder:
    decoder = Decoder(model, prompts, GenerationConfig(**settings), stop_ids)
    with torch.inference_mode():
        while not decoder.done:
            decoder.step()
    return decoder


def hf_new_tokens(hf, prompt, **kw) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("settings", [
    {}, {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {"repetition_penalty": 0.8,
                                                                      "no_repeat_ngram_size": 3}])
def test_greedy_tokens_equal_transformers_generate(pair, settings):
    model, hf = pair
    prompt = [1, 2, 3, 2, 1, 5, 17, 42]
    ours = decode(model, [prompt], temperature=0, max_new_tokens=30, **settings).tokens[0]
    theirs = hf_new_tokens(hf, prompt, max_new_tokens=30, min_new_tokens=30, eos_token_id=None, **settings)
    assert ours == theirs


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", [
    (2, 1.0, False), (3, 0.5, False), (4, 2.0, True), (3, 1.0, "never"), (3, -1.0, False), (5, 1.0, True)])
def test_beam_search_equals_transformers(pair, num_beams, length_penalty, early_stopping):
    model, hf = pair
    prompt = [5, 17, 42, 99, 7]
    cfg = GenerationConfig(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                           max_new_tokens=12, num_return_sequences=num_beams)
    with torch.inference_mode():
        ours = beam_search(model, [prompt], cfg, stop_ids=(EOS,))[0]
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, num_beams=num_beams,
                      length_penalty=length_penalty, early_stopping=early_stopping,
                      num_return_sequences=num_beams, pad_token_id=0, eos_token_id=EOS,
                      output_scores=True, return_dict_in_generate=True)
    theirs = []
    for seq in out.sequences[:, len(prompt):].tolist():
        theirs.append(seq[:seq.index(EOS) + 1] if EOS in seq else seq)
    assert [h.tokens + ([EOS] if h.finish_reason == "stop" else []) for h in ours] == theirs
    assert any(h.finish_reason == "stop" for h in ours)  # the finished-hypothesis path is exercised
    torch.testing.assert_close(torch.tensor([h.score for h in ours]), out.sequences_scores)


def test_beam_search_with_repetition_penalty_equals_transformers(pair):
    model, hf = pair
    prompt = [4, 4, 8, 15, 16, 23, 42]
    cfg = GenerationConfig(num_beams=3, repetition_penalty=1.5, no_repeat_ngram_size=2, max_new_tokens=10)
    with torch.inference_mode():
        ours = beam_search(model, [prompt], cfg, stop_ids=(EOS,))[0][0]
    theirs = hf_new_tokens(hf, prompt, max_new_tokens=10, num_beams=3, repetition_penalty=1.5,
                           no_repeat_ngram_size=2, eos_token_id=EOS)
    theirs = theirs[:theirs.index(EOS) + 1] if EOS in theirs else theirs
    assert ours.tokens + ([EOS] if ours.finish_reason == "stop" else []) == theirs


@pytest.mark.parametrize("temperature, top_k, top_p, min_p, penalty, ngram", [
    (0.7, 0, 1.0, 0.0, 1.0, 0), (1.0, 20, 1.0, 0.0, 1.0, 0), (1.0, 0, 0.9, 0.0, 1.0, 0),
    (0.8, 50, 0.95, 0.0, 1.2, 0), (1.3, 5, 0.5, 0.0, 0.8, 0), (1.0, 0, 1.0, 0.1, 1.0, 0),
    (0.6, 40, 0.9, 0.05, 1.1, 2)])
def test_processed_distributions_equal_transformers(temperature, top_k, top_p, min_p, penalty, ngram):
    torch.manual_seed(0)
    logits = torch.randn(3, 300) * 3
    seen = torch.randint(0, 30, (3, 12))  # small ids: n-grams repeat
    cfg = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=penalty, no_repeat_ngram_size=ngram)
    ours = process_logits(logits, History(seen.tolist(), 300, cfg, torch.device("cpu")), cfg)
    processors = [RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else []
    if ngram:
        processors.append(NoRepeatNGramLogitsProcessor(ngram))
    processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    if min_p:
        processors.append(MinPLogitsWarper(min_p))
    theirs = logits.clone()
    for p in processors:
        theirs = p(seen, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1))


def test_frequency_and_presence_penalties_count_only_generated_tokens(pair):
    cfg = GenerationConfig(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.25)
    history = History([[7, 7, 9]], 20, cfg, torch.device("cpu"))
    for t in (3, 3, 5):
        history.append(torch.tensor([t]), [t])
    scores = process_logits(torch.zeros(1, 20), history, cfg)[0]
    assert scores[3] == pytest.approx(-(0.5 * 2 + 0.25))
    assert scores[5] == pytest.approx(-(0.5 + 0.25))
    assert scores[7] == 0 and scores[9] == 0  # prompt tokens are not penalised (OpenAI, vLLM)


def test_batched_prompts_of_mixed_lengths_equal_each_alone(pair):
    model, _ = pair
    prompts = [[5, 17, 42, 99, 7], [3], [9, 9, 8, 7, 6, 5, 4, 3, 2, 1, 12], [60, 61]]
    with torch.inference_mode():
        batch = Batch(model, prompts, 4)
        for r, p in enumerate(prompts):
            alone = Batch(model, [p], 4)
            torch.testing.assert_close(batch.logits[r], alone.logits[0], rtol=1e-5, atol=1e-5)
    together = decode(model, prompts, temperature=0, max_new_tokens=25, repetition_penalty=1.2)
    for r, p in enumerate(prompts):
        assert together.tokens[r] == decode(model, [p], temperature=0, max_new_tokens=25,
                                            repetition_penalty=1.2).tokens[0]


def test_rows_leave_the_batch_at_their_stop_token_and_the_rest_go_on(pair):
    model, _ = pair
    prompts = [[5, 17, 42], [8, 1, 2, 3], [30]]
    free = decode(model, prompts, temperature=0, max_new_tokens=15)
    stop = free.tokens[0][4]
    stopped = decode(model, prompts, stop_ids=(stop,), temperature=0, max_new_tokens=15)
    for r in range(3):
        expected = free.tokens[r][:free.tokens[r].index(stop)] if stop in free.tokens[r] else free.tokens[r]
        assert stopped.tokens[r] == expected
        assert stopped.finish_reasons[r] == ("stop" if stop in free.tokens[r] else "length")


def test_beam_search_batches_prompts_like_alone(pair):
    model, _ = pair
    prompts = [[5, 17, 42, 99, 7], [3, 1], [50, 51, 52]]
    cfg = GenerationConfig(num_beams=3, max_new_tokens=10)
    with torch.inference_mode():
        together = beam_search(model, prompts, cfg, stop_ids=(EOS,))
        for p, hyps in zip(prompts, together):
            assert [h.tokens for h in hyps] == [h.tokens for h in beam_search(model, [p], cfg, stop_ids=(EOS,))[0]]


def test_several_samples_share_one_prefill_and_seeded_sampling_is_reproducible(pair):
    model, _ = pair
    settings = dict(max_new_tokens=20, temperature=1.0, top_k=40, seed=7, num_return_sequences=4)
    state = torch.get_rng_state()
    a = decode(model, [[3, 4, 5], [6]], **settings).tokens
    assert a == decode(model, [[3, 4, 5], [6]], **settings).tokens
    assert torch.equal(state, torch.get_rng_state())
    assert len(a) == 8 and len({tuple(t) for t in a[:4]}) > 1  # samples of one prompt differ
    assert decode(model, [[3, 4, 5], [6]], **{**settings, "seed": 8}).tokens != a
    greedy = decode(model, [[3, 4, 5]], temperature=0, max_new_tokens=10, num_return_sequences=3).tokens
    assert greedy[0] == greedy[1] == greedy[2] == decode(model, [[3, 4, 5]], temperature=0, max_new_tokens=10).tokens[0]


def test_generation_stops_at_the_context_end_and_long_prompts_are_refused_or_cut(pair):
    model, _ = pair
    d = decode(model, [list(range(1, 120))], temperature=0, max_new_tokens=50)
    assert len(d.tokens[0]) == 9 and d.finish_reasons[0] == "length"
    with pytest.raises(UserError, match="130 tokens; the model's context is 128.*truncate='left'"):
        decode(model, [list(range(1, 131))], temperature=0)
    cut = decode(model, [list(range(1, 131))], temperature=0, max_new_tokens=20, truncate="left")
    assert cut.prompt_lengths == [108] and len(cut.tokens[0]) == 20
    assert cut.tokens[0] == decode(model, [list(range(23, 131))], temperature=0, max_new_tokens=20).tokens[0]
    with pytest.raises(UserError, match="empty"):
        decode(model, [[]])
    assert decode(model, [[3]], max_new_tokens=0).tokens == [[]]


@pytest.mark.parametrize("max_new_tokens", [60, 128, 500])
def test_truncate_left_never_cuts_a_prompt_that_fits(pair, max_new_tokens):
    # A 16-token prompt in a 128-token context: with or without truncate="left" it is kept
    # whole and generation stops at the context (the shared case truncate-left-fitting-prompt).
    model, _ = pair
    prompt = list(range(1, 17))
    plain = decode(model, [prompt], temperature=0, max_new_tokens=max_new_tokens)
    left = decode(model, [prompt], temperature=0, max_new_tokens=max_new_tokens, truncate="left")
    assert left.prompt_lengths == plain.prompt_lengths == [16]
    assert left.tokens == plain.tokens
    assert len(left.tokens[0]) == min(max_new_tokens, 128 - 16)
    assert left.finish_reasons == ["length"]


def test_truncate_left_keeps_at_least_half_the_context_of_a_too_long_prompt(pair):
    # max_new_tokens >= context once shrank the prompt to its last token (BOS and question lost).
    model, _ = pair
    cut = decode(model, [list(range(1, 200))], temperature=0, max_new_tokens=500, truncate="left")
    assert cut.prompt_lengths == [64] and len(cut.tokens[0]) == 64


def test_settings_are_validated_with_clear_messages():
    with pytest.raises(UserError, match="unknown generation setting.*top_n"):
        generation_config({"top_n": 5})
    with pytest.raises(UserError, match="top_p must be in"):
        generation_config({"top_p": 0})
    with pytest.raises(UserError, match="num_return_sequences \\(4\\) cannot exceed num_beams \\(2\\)"):
        generation_config({"num_beams": 2, "num_return_sequences": 4})
    assert generation_config({"stop": "。"}).stop == ("。",)
    assert generation_config({"stop_token_ids": 5}).stop_token_ids == (5,)
    with pytest.raises(UserError, match="max_new_tokens must be an integer, got 2.5"):
        generation_config({"max_new_tokens": 2.5})
    with pytest.raises(UserError, match="stop token ids must be non-negative integers"):
        generation_config({"stop_token_ids": ("5",)})


def test_stop_strings_are_found_across_pieces_and_never_shown_in_part():
    s = StopStrings(("<|end|>", "Q:"))
    shown = []
    for piece in ["ab", "c<", "|e", "x", " Q", "z <|", "en", "d|> tail"]:
        out, stopped = s.push(piece)
        shown.append(out)
        assert "<|e" not in "".join(shown) or "<|ex" in "".join(shown)
        if stopped:
            break
    assert stopped and "".join(shown) == "abc<|ex Qz "


def test_stop_strings_end_generation_in_stream_and_batch(pair, tiny_tokenizer):
    torch.manual_seed(1)
    model = Llama(tiny_config(vocab_size=tiny_tokenizer.vocab_size, max_position_embeddings=128)).eval()
    prompt = [tiny_tokenizer.bos_id] + tiny_tokenizer.encode("今天")
    free = complete(model, tiny_tokenizer, [prompt], GenerationConfig(temperature=0, max_new_tokens=40))[0]
    # A stop string that straddles a token boundary, from the middle of the free text.
    ids = free.ids
    k = len(ids) // 2
    stop = tiny_tokenizer.decode(ids[k - 1:k + 1])
    before = free.text[:free.text.find(stop)]
    cfg = GenerationConfig(temperature=0, max_new_tokens=40, stop=(stop,))
    got = complete(model, tiny_tokenizer, [prompt, prompt[:2]], cfg)
    assert got[0].text == before and got[0].finish_reason == "stop"
    assert len(got[0].ids) < len(ids)
    assert "".join(stream(model, tiny_tokenizer, prompt, cfg)) == before


def test_beam_search_and_samples_through_the_text_api(pair, tiny_tokenizer):
    torch.manual_seed(1)
    model = Llama(tiny_config(vocab_size=tiny_tokenizer.vocab_size, max_position_embeddings=128)).eval()
    prompt = [tiny_tokenizer.bos_id] + tiny_tokenizer.encode("中国")
    beams = complete(model, tiny_tokenizer, [prompt], GenerationConfig(num_beams=3, num_return_sequences=2,
                                                                       max_new_tokens=12))
    assert len(beams) == 2 and beams[0].text == tiny_tokenizer.decode(beams[0].ids)
    assert "".join(stream(model, tiny_tokenizer, prompt, GenerationConfig(num_beams=3, max_new_tokens=12))) \
        == beams[0].text


def test_streamed_pieces_never_end_inside_a_character(tiny_tokenizer):
    text = "龘龘好😀"  # absent from the training text: spelled with single-byte tokens
    ids = tiny_tokenizer.encode(text)
    assert len(ids) >= 8
    detok = Detokenizer(tiny_tokenizer)
    pieces = [p for p in (detok.push(t) for t in ids) if p]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_streamed_sentencepiece_pieces_keep_their_spaces():
    from pathlib import Path

    from babyllama.tokenizer import Tokenizer

    model = Path(__file__).resolve().parents[2] / "shared/data/tokenizers/chinese-llama2/tokenizer.model"
    if not model.exists():
        pytest.skip("../shared/data is absent")
    tok = Tokenizer.load(model)
    ids = tok.encode("今天 天气 hello world 很好 ok")
    detok = Detokenizer(tok)
    assert "".join(detok.push(t) for t in ids) + detok.flush() == tok.decode(ids)


def test_llm_api_generates_batches_and_streams(tiny_data, tmp_path):
    import babyllama
    from babyllama.config import load_config
    from babyllama.train.pretrain import run_pretrain

    from conftest import TINY_MODEL, TINY_TRAIN

    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=30"])
    cfg.data, cfg.out_dir = str(tiny_data), str(tmp_path / "run")
    run_pretrain(cfg)
    llm = babyllama.load(tmp_path / "run", device="cpu")
    pieces = list(llm.stream("今天", max_new_tokens=30, temperature=1.0, seed=1))
    assert "".join(pieces) == llm.generate("今天", max_new_tokens=30, temperature=1.0, seed=1)
    batch = llm.generate(["今天", "中国人民"], max_new_tokens=8, temperature=0)
    assert batch == [llm.generate("今天", max_new_tokens=8, temperature=0),
                     llm.generate("中国人民", max_new_tokens=8, temperature=0)]
    samples = llm.generate(["今天", "中国"], max_new_tokens=8, num_return_sequences=3, seed=0)
    assert len(samples) == 2 and all(len(s) == 3 for s in samples)
    assert isinstance(llm.generate("今天", num_beams=2, max_new_tokens=8), str)
    with pytest.raises(UserError, match="unknown generation setting"):
        llm.generate("今天", temprature=0.5)
    for bad in ([], None, ["今天", 3]):
        with pytest.raises(UserError, match="prompts must be a string or a non-empty list of strings"):
            llm.generate(bad)
    with pytest.raises(UserError, match="the prompt must be a string"):
        list(llm.stream(["今天"]))


def test_load_opens_a_transformers_llama_directory(tiny_tokenizer, tmp_path):
    """`babyllama.load` accepts a directory saved by transformers' `save_pretrained`."""
    import babyllama

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save(tmp_path / "hf")
    llm = babyllama.load(tmp_path / "hf", device="cpu")
    x = torch.tensor([[tiny_tokenizer.bos_id] + tiny_tokenizer.encode("今天天气很好")])
    with torch.no_grad():
        torch.testing.assert_close(llm.model(x)[0], hf(x).logits, rtol=1e-5, atol=1e-5)


def test_sampling_draws_from_the_distribution_and_never_a_zero_probability_token():
    from babyllama.infer.logits import sample_rows

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_rows(probs, g) for _ in range(20000)])
    freq = torch.bincount(draws[:, 0], minlength=6) / draws.size(0)
    assert torch.allclose(freq, probs[0], atol=0.015)
    assert (draws[:, 1] == 0).all()
    # Unnormalised rows (what a softmax in low precision may give) are drawn from as normalised.
    assert torch.allclose(torch.bincount(torch.stack([sample_rows(probs[:1] * 3, g) for _ in range(5000)])[:, 0],
                                         minlength=6) / 5000, probs[0], atol=0.03)
