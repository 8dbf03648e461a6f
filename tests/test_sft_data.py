"""SFT sequences: targets, truncation, packing that computes what separate runs compute, and
batches that are a pure function of (seed, step, micro, rank)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from babyllama.data.conversations import Conversation
from babyllama.data.sft import (IGNORE, SFTBatches, SFTExample, build_examples, eval_batches, mix,
                                split_validation)
from babyllama.model.llama import Llama, ModelConfig

QUESTIONS = ["你好", "今天天气怎么样？", "你喜欢什么书？", "讲个笑话吧。"]
ANSWERS = ["你好，很高兴见到你。", "今天天气很好，我们去公园散步。",
           "机器学习和自然语言处理很有意思。", "The quick brown fox jumps over the lazy dog."]


def chat(*turns: str, system: str | None = None, document: str | None = None) -> Conversation:
    roles = ["user", "assistant"]
    return Conversation(messages=[{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)],
                        system=system, document=document)


def decode_targets(tok, ex: SFTExample) -> str:
    return tok.decode(ex.ids[ex.mask].tolist(), skip_special_tokens=False)


def synthetic_examples(n: int, lo: int, hi: int, seed: int = 0) -> list[SFTExample]:
    """Examples with distinct token sequences (their first two tokens spell the index)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(10, 300, size=int(rng.integers(lo, hi + 1))).astype(np.int32)
        ids[0], ids[1] = 300 + i // 100, 300 + i % 100
        mask = rng.random(len(ids)) < 0.5
        mask[0], mask[-1] = False, True
        out.append(SFTExample(ids, mask))
    return out


def segments(x: torch.Tensor, pos: torch.Tensor) -> list[torch.Tensor]:
    """The pieces of a packed row, cut where the position ids restart at 0."""
    starts = torch.nonzero(pos == 0).flatten().tolist() + [len(pos)]
    return [x[a:b] for a, b in zip(starts, starts[1:])]


def rows_of(batches: SFTBatches, pad_id: int, steps) -> list[tuple[int, ...]]:
    """The example input sequences in the micro-batches of `steps` (this rank's share)."""
    seen = []
    for step in steps:
        for micro in range(batches.grad_accum):
            x, _, extra = batches.get(step, micro, "cpu")
            for r in range(len(x)):
                if batches.mode == "pack":
                    pieces = segments(x[r], extra["position_ids"][r])
                    seen += [tuple(p.tolist()) for p in pieces if not (p == pad_id).all()]
                else:
                    seen.append(tuple(x[r][x[r] != pad_id].tolist()))
    return seen


# ---------------------------------------------------------------------------------------------
# Packing is exact


def test_packed_row_gives_the_logits_and_loss_of_each_conversation_alone(tiny_tokenizer):
    tok = tiny_tokenizer
    convs = [chat(QUESTIONS[0], ANSWERS[0]),
             chat(QUESTIONS[1], ANSWERS[1], QUESTIONS[2], ANSWERS[2], system="你是助手"),
             chat(QUESTIONS[3], ANSWERS[3])]
    examples, _ = build_examples(convs, tok, 257)
    assert sum(len(e.ids) - 1 for e in examples) < 256  # one row, with a padded tail
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256)).eval()
    batches = SFTBatches(examples, seq_len=256, batch_size=1, grad_accum=1, seed=0,
                         pad_id=tok.pad_id, mode="pack")
    x, y, extra = batches.get(0, 0, "cpu")
    assert x.shape == (1, 256) and batches.batches_per_epoch == 1
    with torch.no_grad():
        packed, packed_loss = model(x, y, **extra)
    assert torch.isfinite(packed).all()  # the padded tail attends to itself, no NaN

    at, nll, n_targets = 0, 0.0, 0
    assert sorted(batches.batch_examples(0)) == [0, 1, 2]
    for i in batches.batch_examples(0):
        xi, yi = (torch.from_numpy(a.astype(np.int64))[None] for a in examples[i].inputs_targets())
        with torch.no_grad():
            alone, loss = model(xi, yi)
        n = xi.shape[1]
        torch.testing.assert_close(packed[:, at:at + n], alone, rtol=0, atol=1e-5)
        assert torch.equal(y[:, at:at + n], yi)  # its own targets, none across the boundary
        nll += float(loss) * int((yi != IGNORE).sum())
        n_targets += int((yi != IGNORE).sum())
        at += n
    assert (y[0, at:] == IGNORE).all() and (x[0, at:] == tok.pad_id).all()
    assert float(packed_loss) == pytest.approx(nll / n_targets, rel=1e-5)

    # The same with activation checkpointing in training mode (the path SFT trains on).
    model.train()
    model.gradient_checkpointing = True
    _, ckpt_loss = model(x, y, **extra)
    assert ckpt_loss.item() == pytest.approx(float(packed_loss), rel=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager is the CPU's only path
def test_flex_attention_block_mask_gives_the_logits_and_loss_of_the_boolean_mask(tiny_tokenizer):
    """The CUDA path for packed rows (FlexAttention block masks) against the CPU path (SDPA with
    the boolean mask), on the same rows: several conversations per row, a padded tail,
    grouped-query attention and 2 rows of different layouts. Forward only: FlexAttention's
    backward exists on CUDA alone (benchmarks/gpu_check.py compares the training losses there)."""
    from torch.nn.attention.flex_attention import BlockMask

    examples = synthetic_examples(12, 5, 40, seed=1)
    kwargs = dict(seq_len=96, batch_size=2, grad_accum=1, seed=0, pad_id=tiny_tokenizer.pad_id, mode="pack")
    x, y, boolean = SFTBatches(examples, **kwargs).get(0, 0, "cpu")
    x2, y2, flex = SFTBatches(examples, **kwargs, block_mask=True).get(0, 0, "cpu")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert isinstance(flex["attn_mask"], BlockMask) and torch.equal(flex["position_ids"], boolean["position_ids"])
    assert x.shape[0] == 2 and ((boolean["position_ids"] == 0).sum(-1) > 2).all()  # several segments a row
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    with torch.no_grad():
        logits_mask, loss_mask = model(x, y, **boolean)
        logits_flex, loss_flex = model(x, y, **flex)
    torch.testing.assert_close(logits_flex, logits_mask, rtol=0, atol=1e-5)
    assert float(loss_flex) == pytest.approx(float(loss_mask), rel=1e-6)


def test_flex_attention_refuses_attention_dropout_in_training():
    from babyllama.model.llama import packed_block_mask

    model = Llama(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, max_position_embeddings=32, dropout=0.1)).train()
    x = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="no attention dropout"):
        model(x, attn_mask=packed_block_mask(torch.zeros(1, 8, dtype=torch.long)))


def test_packed_mask_is_block_diagonal_causal(tiny_tokenizer):
    examples = synthetic_examples(6, 4, 9)
    batches = SFTBatches(examples, seq_len=32, batch_size=2, grad_accum=1, seed=3,
                         pad_id=tiny_tokenizer.pad_id)
    x, y, extra = batches.get(0, 0, "cpu")
    mask, pos = extra["attn_mask"], extra["position_ids"]
    assert mask.dtype == torch.bool and mask.shape == (len(x), 1, 32, 32)
    seg = (pos == 0).cumsum(-1)
    for r in range(len(x)):
        expect = (seg[r][:, None] == seg[r][None, :]) & torch.ones(32, 32, dtype=torch.bool).tril()
        assert torch.equal(mask[r, 0], expect)
        assert mask[r, 0].any(-1).all()  # no query row fully masked


# ---------------------------------------------------------------------------------------------
# Targets and truncation


def test_only_assistant_answers_and_their_end_tokens_are_targets(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = chat(QUESTIONS[0], ANSWERS[0], QUESTIONS[1], ANSWERS[1], system="你是助手",
                document="人民日报发表新年献词")
    (ex,), _ = build_examples([conv], tok, 1000)
    assert decode_targets(tok, ex) == f"{ANSWERS[0]}<|im_end|>{ANSWERS[1]}<|im_end|>"
    x, y = ex.inputs_targets()
    assert np.array_equal(x, ex.ids[:-1]) and ((y == IGNORE) == ~ex.mask[1:]).all()

    (last,), _ = build_examples([conv], tok, 1000, loss_on="last")
    assert decode_targets(tok, last) == f"{ANSWERS[1]}<|im_end|>"
    assert np.array_equal(last.ids, ex.ids)


def test_long_conversations_lose_their_oldest_turns_first(tiny_tokenizer):
    tok = tiny_tokenizer
    turns = [t for q, a in zip(QUESTIONS, ANSWERS) for t in (q, a)]
    conv = chat(*turns, system="你是助手")
    (full,), _ = build_examples([conv], tok, 10_000)
    (two,), _ = build_examples([chat(*turns[4:], system="你是助手")], tok, 10_000)
    examples, stats = build_examples([conv], tok, len(two.ids) + 3)  # room for 2 of 4 exchanges
    (ex,) = examples
    assert np.array_equal(ex.ids, two.ids) and len(ex.ids) < len(full.ids)
    text = tok.decode(ex.ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n你是助手") and QUESTIONS[0] not in text
    assert decode_targets(tok, ex).endswith(f"{ANSWERS[3]}<|im_end|>")
    assert (stats.conversations, stats.examples, stats.truncated, stats.dropped) == (1, 1, 1, 0)
    assert stats.turns_dropped == 4


def test_a_too_long_document_is_cut_at_its_end_and_the_answer_kept(tiny_tokenizer):
    tok = tiny_tokenizer
    document = "".join(ANSWERS) * 4
    (whole,), _ = build_examples([chat(QUESTIONS[0], ANSWERS[0], document=document)], tok, 10_000)
    examples, stats = build_examples([chat(QUESTIONS[0], ANSWERS[0], document=document)], tok,
                                     len(whole.ids) // 2)
    (ex,) = examples
    text = tok.decode(ex.ids.tolist(), skip_special_tokens=False)
    assert document[:20] in text and document not in text
    assert decode_targets(tok, ex) == f"{ANSWERS[0]}<|im_end|>"
    assert stats.truncated == 1 and stats.documents_shortened == 1


def test_an_answer_that_cannot_fit_is_dropped_and_counted_never_cut(tiny_tokenizer):
    tok = tiny_tokenizer
    convs = [chat(QUESTIONS[0], ANSWERS[2] * 5), chat(QUESTIONS[1], ANSWERS[1]),
             chat(QUESTIONS[2], ANSWERS[2] * 5, document="人民日报")]
    examples, stats = build_examples(convs, tok, 60)
    assert len(examples) == 1 and decode_targets(tok, examples[0]) == f"{ANSWERS[1]}<|im_end|>"
    assert (stats.conversations, stats.examples, stats.dropped) == (3, 1, 2)
    assert stats.reasons == {"last exchange longer than 60 tokens": 2}
    summary = stats.summary()
    assert "3 conversations -> 1 examples" in summary and "2 dropped" in summary
    assert "longer than 60 tokens" in summary


# ---------------------------------------------------------------------------------------------
# Validation split and mixing


def test_validation_split_is_stable_when_data_is_appended():
    items = list(range(200))
    train, val = split_validation(items, 0.1, seed=7)
    assert sorted(train + val) == items and 5 <= len(val) <= 40
    train2, val2 = split_validation(items + list(range(200, 400)), 0.1, seed=7)
    assert [v for v in val2 if v < 200] == val
    assert split_validation(items, 0.1, seed=8)[1] != val
    # Tiny data still gets a validation item (and keeps a training one).
    for n in (2, 3):
        t, v = split_validation(list(range(n)), 0.01, seed=0)
        assert len(v) == 1 and len(t) == n - 1
    assert split_validation(items, 0.0, seed=0) == (items, [])


def test_mix_repeats_and_subsamples_by_weight():
    a, b, c = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)], [f"c{i}" for i in range(10)]
    out = mix([a, b, c], [2, 0.5, 1.5], seed=0)
    assert Counter(x[0] for x in out) == {"a": 20, "b": 5, "c": 15}
    assert len(set(x for x in out if x.startswith("b"))) == 5
    assert mix([a, b, c], [2, 0.5, 1.5], seed=0) == out
    assert mix([a, b, c], [2, 0.5, 1.5], seed=1) != out


# ---------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_batches_are_a_pure_function_of_seed_step_and_micro(mode):
    examples = synthetic_examples(60, 3, 30)
    kw = dict(seq_len=40, batch_size=4, grad_accum=2, seed=5, pad_id=2, mode=mode)
    a, b = SFTBatches(examples, **kw), SFTBatches(examples, **kw)
    for step, micro in [(3, 1), (0, 0), (3, 1), (17, 0)]:
        xa, ya, ea = a.get(step, micro, "cpu")
        xa2, ya2, _ = a.get(step, micro, "cpu")
        xb, yb, eb = b.get(step, micro, "cpu")
        assert torch.equal(xa, xa2) and torch.equal(ya, ya2)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert a.steps_for_epochs(3) == -(-3 * a.batches_per_epoch // 2)


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_each_epoch_shows_every_example_once_in_a_new_order(mode):
    examples = synthetic_examples(57, 3, 30)
    batches = SFTBatches(examples, seq_len=40, batch_size=3, grad_accum=1, seed=1, pad_id=2,
                         mode=mode)
    n = batches.batches_per_epoch
    expected = sorted(tuple(e.ids[:-1].tolist()) for e in examples)
    first, second = rows_of(batches, 2, range(n)), rows_of(batches, 2, range(n, 2 * n))
    assert sorted(first) == expected and sorted(second) == expected
    assert first != second


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_ddp_ranks_take_disjoint_batches_that_together_cover_the_epoch(mode):
    examples = synthetic_examples(80, 3, 30)
    kw = dict(seq_len=40, batch_size=2, grad_accum=2, seed=0, pad_id=2, mode=mode, world_size=2)
    r0, r1 = SFTBatches(examples, rank=0, **kw), SFTBatches(examples, rank=1, **kw)
    steps = range(r0.batches_per_epoch // 4)  # whole steps of epoch 0 (2 micro x 2 ranks)
    seen0, seen1 = rows_of(r0, 2, steps), rows_of(r1, 2, steps)
    assert seen0 and seen1 and not set(seen0) & set(seen1)
    if r0.batches_per_epoch % 4 == 0:
        assert sorted(seen0 + seen1) == sorted(tuple(e.ids[:-1].tolist()) for e in examples)


def test_rank_r_of_w_takes_global_batch_step_accum_micro_times_w_plus_r():
    examples = synthetic_examples(80, 3, 30)
    kw = dict(seq_len=40, batch_size=2, seed=0, pad_id=2, mode="pad")
    one = SFTBatches(examples, grad_accum=1, **kw)
    for rank in (0, 1):
        r = SFTBatches(examples, grad_accum=2, rank=rank, world_size=2, **kw)
        # step 1, micro 1 is global batch (1 * 2 + 1) * 2 + rank: step 6 + rank of one process
        # without accumulation.
        assert torch.equal(r.get(1, 1, "cpu")[0], one.get(6 + rank, 0, "cpu")[0])


def test_packing_fills_rows_and_refuses_an_example_longer_than_a_row():
    examples = synthetic_examples(300, 3, 20)
    batches = SFTBatches(examples, seq_len=128, batch_size=4, grad_accum=1, seed=0, pad_id=2)
    real = sum(len(e.ids) - 1 for e in examples)
    rows = sum(len(batches.get(s, 0, "cpu")[0]) for s in range(batches.batches_per_epoch))
    assert batches.fill == pytest.approx(real / (rows * 128)) and batches.fill > 0.9
    with pytest.raises(ValueError, match="seq_len"):
        SFTBatches(examples, seq_len=10, batch_size=4, grad_accum=1, seed=0, pad_id=2)


def test_pad_mode_sorts_by_length_so_batches_carry_little_padding():
    examples = synthetic_examples(400, 3, 120, seed=2)
    lengths = np.array([len(e.ids) - 1 for e in examples])
    batches = SFTBatches(examples, seq_len=128, batch_size=8, grad_accum=1, seed=0, pad_id=2,
                         mode="pad")
    real = padded = 0
    for step in range(batches.batches_per_epoch):
        x, y, extra = batches.get(step, 0, "cpu")
        assert extra == {}
        padded += x.numel()
        real += int((x != 2).sum())
    assert real == lengths.sum()
    order = np.random.default_rng(0).permutation(len(lengths))
    random_slots = sum(8 * lengths[order[i:i + 8]].max() for i in range(0, len(order), 8))
    assert 1 - real / padded < 0.2 * (1 - lengths.sum() / random_slots)
    assert batches.fill == pytest.approx(real / padded)


def test_eval_batches_are_sorted_and_right_padded():
    examples = synthetic_examples(11, 3, 30)
    out = eval_batches(examples, 4, pad_id=2)
    assert [len(x) for x, _ in out] == [4, 4, 3]
    widths = [x.shape[1] for x, _ in out]
    assert widths == sorted(widths)
    rows = sorted(tuple(r[r != 2].tolist()) for x, _ in out for r in x)
    assert rows == sorted(tuple(e.ids[:-1].tolist()) for e in examples)
    assert sum(int((y != IGNORE).sum()) for _, y in out) == sum(int(e.mask.sum()) for e in examples)


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_replay_adds_pretraining_rows_that_are_all_targets(mode, tiny_data):
    from babyllama.data.shards import TokenShards

    shards = TokenShards(tiny_data, "train")
    examples = synthetic_examples(40, 3, 30)
    kw = dict(seq_len=32, batch_size=4, grad_accum=2, seed=0, pad_id=2, mode=mode, replay=shards)
    batches = SFTBatches(examples, replay_ratio=0.5, **kw)
    plain = SFTBatches(examples, **kw)
    for step in range(3):
        x, y, extra = batches.get(step, 1, "cpu")
        px, py, _ = plain.get(step, 1, "cpu")
        n = len(px)
        assert len(x) == n + 2  # 0.5 * batch_size extra rows
        assert torch.equal(x[:n], px) and torch.equal(y[:n], py)
        assert (y[n:] != IGNORE).all() and torch.equal(y[n:, :-1], x[n:, 1:])
        if mode == "pack":
            T = x.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            assert (extra["attn_mask"][n:, 0] == causal).all()
            assert (extra["position_ids"][n:] == torch.arange(T)).all()
        assert torch.equal(batches.get(step, 1, "cpu")[0], x)
    # A fractional ratio rounds at random per micro-batch, exact on average.
    sometimes = SFTBatches(examples, replay_ratio=0.3, **kw)
    extra_rows = [len(sometimes.get(s, m, "cpu")[0]) - len(plain.get(s, m, "cpu")[0])
                  for s in range(40) for m in range(2)]
    assert set(extra_rows) == {1, 2} and 1.1 < np.mean(extra_rows) < 1.3


def test_conversations_that_ended_unanswered_are_counted_in_the_build_stats(tiny_tokenizer, tmp_path):
    import json

    from babyllama.data.conversations import iter_conversations

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "在吗？"}]}, ensure_ascii=False) + "\n", encoding="utf-8")
    convs = list(iter_conversations(str(path))) + [chat("问", "答")]
    examples, stats = build_examples(convs, tiny_tokenizer, 1000)
    assert len(examples) == 2 and stats.unanswered == 1
    assert "1 ended with an unanswered user turn (dropped; trained on their answered turns)" \
        in stats.summary()
