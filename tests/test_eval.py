"""Evaluation's shared scoring against transformers on the same weights, the `lm` task's
perplexity / accuracy / bits per character, the generation metrics, and result files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from babyllama.errors import UserError
from babyllama.eval.generation import distinct_n, find_loop, rep_n, run_generation
from babyllama.eval.lm import LMOptions, run_lm, window_requests
from babyllama.eval.report import write_result
from babyllama.eval.scoring import score_requests, target_scores
from babyllama.eval.tasks import task_options
from babyllama.model.llama import Llama

from conftest import corpus_lines, hf_twin
from test_model import tiny_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(5)
    model = Llama(tiny_config(vocab_size=400, max_position_embeddings=48)).eval()
    return model, hf_twin(model)


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, vocab) log-probabilities of each next token, one unbatched forward."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids[:-1]])).logits[0].float(), -1)


def test_scored_continuations_equal_transformers_log_likelihoods(pair):
    model, hf = pair
    g = torch.Generator().manual_seed(0)
    requests = [(torch.randint(3, 400, (int(n),), generator=g).tolist(),
                 torch.randint(3, 400, (int(k),), generator=g).tolist())
                for n, k in [(5, 3), (1, 1), (30, 10), (60, 4), (47, 2), (5, 1)]]
    requests.append((requests[0][0], [7]))  # shares its input row with requests[0]'s first token
    scored = score_requests(model, requests, batch_size=3, progress=False)
    for (ctx, cont), s in zip(requests, scored):
        seq = (ctx + cont)[-(48 + 1):]  # cut on the left to the context, as documented
        lp = hf_logprobs(hf, seq)
        rows = range(len(seq) - 1 - len(cont), len(seq) - 1)
        ref = sum(lp[r, seq[r + 1]].item() for r in rows)
        hits = sum(int(lp[r].argmax().item() == seq[r + 1]) for r in rows)
        assert s.logprob == pytest.approx(ref, abs=1e-4)
        assert (s.tokens, s.correct, s.greedy) == (len(cont), hits, hits == len(cont))
        assert s.truncated == (len(ctx) + len(cont) - 1 > 48)


def test_greedy_continuation_is_reported_greedy(pair):
    model, hf = pair
    ctx = [1, 5, 9, 13]
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([ctx]), max_new_tokens=4, do_sample=False, pad_token_id=0)[0, 4:]
    s = score_requests(model, [(ctx, greedy.tolist())], progress=False)[0]
    assert s.greedy and s.correct == 4


def test_target_scores_equal_transformers_cross_entropy(pair):
    model, hf = pair
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 400, (3, 20), generator=g)
    y = torch.randint(0, 400, (3, 20), generator=g)
    y[0, :7] = -100
    y[2] = -100
    nats, n, correct = target_scores(model, x, y)
    with torch.no_grad():
        logits = hf(x).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="none")
    hit = (logits.argmax(-1) == y) & (y != -100)
    assert torch.allclose(nats.float(), ce.sum(1), atol=1e-4)
    assert n.tolist() == [13, 20, 0] and correct.tolist() == hit.sum(1).tolist()


@pytest.mark.parametrize("length,context,stride", [(2, 8, 8), (9, 8, 8), (40, 8, 8), (40, 8, 3), (17, 16, 1)])
def test_windows_predict_every_token_once_within_the_context(length, context, stride):
    ids = list(range(100, 100 + length))
    windows = window_requests(ids, context, stride)
    predicted = [t for _, cont in windows for t in cont]
    assert predicted == ids[1:]
    for ctx, cont in windows:
        assert 1 <= len(ctx) and len(ctx) + len(cont) - 1 <= context and len(cont) <= stride
        assert ids[ids.index(ctx[0]):ids.index(cont[-1]) + 1] == ctx + cont  # contiguous
    if stride < context and length > context:  # sliding: later windows see a full context
        ctx, cont = windows[-1]
        assert len(ctx) + len(cont) - 1 == context


def test_lm_task_equals_transformers_perplexity_accuracy_and_bits(pair, tiny_tokenizer, tmp_path):
    model, hf = pair
    docs = [line[:20] for line in corpus_lines(12)]  # short: each fits the 48-token context
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    result = run_lm(model, tiny_tokenizer, LMOptions(str(path), batch_size=5, progress=False))
    nats, n, hits = 0.0, 0, 0
    for doc in docs:
        ids = [tiny_tokenizer.bos_id] + tiny_tokenizer.encode(doc) + [tiny_tokenizer.eos_id]
        assert len(ids) <= 49
        lp = hf_logprobs(hf, ids)
        target = torch.tensor(ids[1:])
        nats -= lp.gather(1, target[:, None]).sum().item()
        n += len(target)
        hits += (lp.argmax(-1) == target).sum().item()
    m = result.metrics
    assert m["tokens"] == n and m["documents"] == 12
    assert m["ppl"] == pytest.approx(math.exp(nats / n), rel=1e-5)
    assert m["acc"] == hits / n
    chars = sum(len(d) for d in docs)
    assert m["bpc"] == pytest.approx(nats / math.log(2) / chars, rel=1e-5)
    assert m["bpb"] == pytest.approx(nats / math.log(2) / sum(len(d.encode()) for d in docs), rel=1e-5)


def test_lm_task_on_prepared_shards_scores_every_token_after_bos(tiny_data, tiny_tokenizer):
    from babyllama.data.shards import TokenShards

    torch.manual_seed(0)
    model = Llama(tiny_config(vocab_size=tiny_tokenizer.vocab_size, max_position_embeddings=32)).eval()
    val = TokenShards(tiny_data, "val")
    result = run_lm(model, tiny_tokenizer, LMOptions(str(tiny_data), stride=20, progress=False))
    assert result.metrics["tokens"] == val.n_tokens - val.n_documents
    assert result.metrics["documents"] == val.n_documents
    # An untrained model is near uniform: perplexity close to the vocabulary size.
    assert 0.5 * tiny_tokenizer.vocab_size < result.metrics["ppl"] < 2 * tiny_tokenizer.vocab_size


def test_lm_task_refuses_data_from_another_tokenizer(tiny_data, tiny_tokenizer):
    model = Llama(tiny_config(vocab_size=tiny_tokenizer.vocab_size + 1, max_position_embeddings=32))
    with pytest.raises(UserError, match="prepare the data with this run's tokenizer"):
        run_lm(model, tiny_tokenizer, LMOptions(str(tiny_data), progress=False))


def test_distinct_and_rep_count_characters_across_answers():
    assert distinct_n(["abab", "ab"], 1) == 2 / 6
    assert distinct_n(["abab", "ab"], 2) == 2 / 4  # ab, ba, ab | ab
    assert distinct_n(["我 爱 你"], 2) == 1.0      # whitespace ignored
    assert rep_n("abcdabcd") == 1 - 4 / 5
    assert rep_n("abc") == 0.0


@pytest.mark.parametrize("text,unit", [
    ("我们是中国人。我们是中国人。我们是中国人。", "我们是中国人。"),
    ("今天" + "的" * 12, "的"),
    ("他说：好的好的好的好的好的好的", "好的"),
    ("哈哈哈，真有意思。", None),                  # short laughter is not a loop
    ("今天天气很好，我们去公园散步。", None),
    ("abcabc", None),                               # only two repeats
    ("1. A A A A A A A", " A"),                     # spaced repeats are a loop too
])
def test_loop_is_a_piece_repeated_back_to_back(text, unit):
    assert find_loop(text, repeats=3, min_chars=12) == unit


def test_generation_task_reports_loops_of_its_own_answers(pair, tiny_tokenizer, tmp_path):
    model, _ = pair
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n"
                               for p in ["今天", "中国的", "这个手机", "机器学习"]), encoding="utf-8")
    opts, = [task_options({"task": "generation", "data": str(prompts), "limit": 3,
                           "generation": {"max_new_tokens": 30}}, progress=False)[1]]
    result = run_generation(model, tiny_tokenizer, opts)
    answers = [e["answer"] for e in result.examples]
    assert len(answers) == 3 and result.metrics["n"] == 3
    assert result.metrics["loop_rate"] == sum(find_loop(a) is not None for a in answers) / 3
    assert result.metrics["distinct_1"] == distinct_n(answers, 1)
    md = write_result(result, tmp_path / "run")
    assert md.name == "generation-prompts.md" and "| prompts | distinct-1" in md.read_text(encoding="utf-8")
    saved = json.loads(md.with_suffix(".json").read_text(encoding="utf-8"))
    assert saved["metrics"]["loop_rate"] == result.metrics["loop_rate"]
    assert len((tmp_path / "run" / "eval" / "generation-prompts.examples.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("spec,needle", [
    ({"task": "lm"}, "needs at least `task` and `data`"),
    ({"task": "bleu", "data": "x"}, "unknown evaluation task 'bleu'"),
    ({"task": "lm", "data": "x", "strid": 4}, "did you mean stride"),
    ({"task": "lm", "data": "x", "stride": 0}, "--stride must be at least 1"),
    ({"task": "generation", "data": "x", "generation": {"top_p": 0}}, "top_p"),
    ({"task": "choice", "data": "x", "shots": -1}, "--shots must be 0 or more"),
    ({"task": "rouge", "data": "x", "template": "no slot"}, "--template must contain"),
])
def test_task_settings_are_checked_with_one_clear_line(spec, needle):
    with pytest.raises(UserError, match=needle):
        task_options(spec)


def test_llm_evaluate_runs_the_same_task_as_the_command(pair, tiny_tokenizer, tmp_path):
    from babyllama.llm import LLM

    model, _ = pair
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(line[:20] for line in corpus_lines(5)) + "\n", encoding="utf-8")
    llm = LLM(model, tiny_tokenizer, torch.device("cpu"))
    via_api = llm.evaluate("lm", path, progress=False).metrics
    direct = run_lm(model, tiny_tokenizer, LMOptions(str(path), progress=False)).metrics
    assert via_api == direct
    with pytest.raises(UserError, match="did you mean limit"):
        llm.evaluate("lm", path, limt=3)
