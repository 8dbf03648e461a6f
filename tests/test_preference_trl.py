"""Our preference and RL losses against TRL's trainers (the reference implementation).

Same tiny Llama weights (ours and transformers' twin), same token rows, fp32: the loss, every
parameter's gradient and the logged statistics must agree. TRL's own code computes its side
wherever a trainer can be built on CPU without the Hub: DPOTrainer (sigmoid, IPO),
RewardTrainer, CPOTrainer (SimPO) and GRPOTrainer's `_compute_loss`; only GRPO's group
advantages, which TRL computes inside generation, are checked against its formula.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from conftest import hf_twin

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from babyllama.config import DPOConfig, RewardConfig  # noqa: E402
from babyllama.data.preference import PreferencePair, build_pairs  # noqa: E402
from babyllama.model.llama import Llama, ModelConfig  # noqa: E402
from babyllama.model.reward import RewardModel  # noqa: E402
from babyllama.train.dpo import answer_logps, compute_reference, dpo_objective  # noqa: E402
from babyllama.train.grpo import group_advantages, grpo_token_losses  # noqa: E402
from babyllama.train.logprobs import token_logps  # noqa: E402
from babyllama.train.pairs import IGNORE, PairBatch, collate  # noqa: E402
from babyllama.train.reward import reward_objective  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

# fp32 throughout (TRL's configs default to bf16 autocast: turned off). TRL's fused LM head
# sums log-probs in a different order than our full log-softmax, so the last bits differ; a
# gradient entry may be near zero, so its absolute tolerance scales with its tensor's largest.
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL, GRAD_ATOL_OF_MAX = 1e-4, 1e-5

# (system, earlier turns, question, chosen, rejected): answers of different lengths, one pair
# with a system prompt and one with an earlier exchange.
PAIRS = [
    (None, [], "今天天气怎么样", "今天天气很好，我们去公园散步。", "房间很干净。"),
    (None, [], "机器学习有意思吗", "机器学习和自然语言处理很有意思。", "不知道"),
    ("你是一个乐于助人的助手。", [], "这个手机怎么样", "屏幕很大，电池也很耐用。", "很贵"),
    (None, [("你好", "你好，有什么可以帮你？")], "说说新闻",
     "人民日报发表新年献词，迈向充满希望的新世纪。", "中国的经济发展很快。"),
]


@pytest.fixture(autouse=True)
def isolated():
    """TRL, transformers and datasets log and warn freely: quiet them. The trainers seed the
    global random generators (`set_seed`): give the other tests theirs back."""
    import random

    verbosity, bars = transformers.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    loggers = [logging.getLogger(name) for name in ("trl", "accelerate", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        transformers.logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_tokenizer, tmp_path_factory):
    """transformers' tokenizer of the tiny tokenizer (as `babyllama export --format hf` writes
    it) with our default chat template, ChatML."""
    from babyllama.export.hf import write_tokenizer_files
    from babyllama.tokenizer.chat_template import TEMPLATES

    out = tmp_path_factory.mktemp("hf_tokenizer")
    write_tokenizer_files(tiny_tokenizer, out, max_length=256)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = TEMPLATES["chatml"]
    assert tok.pad_token_id == tiny_tokenizer.pad_id and tok.eos_token_id == tiny_tokenizer.eos_id
    return tok


def model_config(tokenizer) -> ModelConfig:
    return ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256)


def perturbed(model: Llama, scale: float, seed: int) -> Llama:
    """A copy of `model` with Gaussian noise (std `scale`) added to every weight."""
    out = Llama(model.config)
    out.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


@pytest.fixture
def policy_and_reference(tiny_tokenizer):
    """(policy, reference): our Llama and a different one, so the log-ratios are not zero."""
    torch.manual_seed(0)
    reference = perturbed(Llama(model_config(tiny_tokenizer)), 0.05, 1)
    policy = perturbed(reference, 0.05, 7)  # prefers the chosen answer of two pairs in four
    return policy, reference


def preference_pairs() -> list[PreferencePair]:
    out = []
    for system, history, question, chosen, rejected in PAIRS:
        messages = [{"role": r, "content": c} for q, a in history for r, c in (("user", q), ("assistant", a))]
        out.append(PreferencePair(messages + [{"role": "user", "content": question}], chosen, rejected,
                                  system=system))
    return out


def trl_conversations() -> datasets.Dataset:
    """PAIRS in TRL's conversational preference format (explicit prompt)."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for pair in preference_pairs():
        head = pair.chosen_messages()[:-1]
        rows["prompt"].append(head)
        rows["chosen"].append([{"role": "assistant", "content": pair.chosen}])
        rows["rejected"].append([{"role": "assistant", "content": pair.rejected}])
    return datasets.Dataset.from_dict(rows)


def our_examples(tiny_tokenizer):
    examples, stats = build_pairs(preference_pairs(), tiny_tokenizer, 256, template="chatml")
    assert stats.examples == len(PAIRS) and not stats.truncated
    return examples


def trainer_args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / cls.__name__), report_to=[], use_cpu=True, seed=0,
               per_device_train_batch_size=len(PAIRS), disable_dropout=True, bf16=False, fp16=False,
               gradient_checkpointing=False, **kw)


def pair_batch_from_trl(batch: dict, reference: torch.Tensor | None = None) -> PairBatch:
    """A DPOTrainer batch (whole rows; `completion_mask` marks the answer tokens) as our
    PairBatch: inputs without the last column, targets the next tokens where TRL scores them."""
    ids, completion = batch["input_ids"], batch["completion_mask"]
    targets = ids[:, 1:].masked_fill(completion[:, 1:] == 0, IGNORE)
    last = batch["attention_mask"].sum(1) - 2
    B = ids.size(0) // 2
    return PairBatch(ids[:, :-1].contiguous(), targets, last, reference, torch.arange(B))


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def assert_same_gradients(ours, theirs) -> None:
    ours, theirs = gradients(ours), gradients(theirs)
    assert set(ours) == set(theirs)
    for name in ours:
        atol = GRAD_ATOL_OF_MAX * float(theirs[name].abs().max()) + 1e-12
        torch.testing.assert_close(ours[name], theirs[name], rtol=GRAD_RTOL, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert any(g.abs().max() > 0 for g in ours.values())


def trl_metrics(trainer) -> dict[str, float]:
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


# ---------------------------------------------------------------------------------------------
# DPO


@pytest.mark.parametrize("loss, beta", [("sigmoid", 0.1), ("ipo", 0.1), ("sigmoid", 0.5)])
def test_dpo_loss_gradients_and_rewards_equal_trl_dpo_trainer_on_its_first_batch(
        loss, beta, policy_and_reference, hf_tokenizer, tmp_path):
    policy, reference = policy_and_reference
    hf_policy, hf_reference = hf_twin(policy).train(), hf_twin(reference)
    args = trainer_args(trl.DPOConfig, tmp_path, loss_type=[loss], beta=beta, max_length=None)
    trainer = trl.DPOTrainer(model=hf_policy, ref_model=hf_reference, args=args,
                             train_dataset=trl_conversations(), processing_class=hf_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].size(0) == 2 * len(PAIRS)

    # The reference log-probs we precompute (answer_logps under the reference model).
    trl_ref_chosen, trl_ref_rejected = trainer.compute_ref_log_probs(hf_reference, batch)
    ours_batch = pair_batch_from_trl(batch)
    with torch.no_grad():
        ref_logps, lengths = answer_logps(reference.eval(), ours_batch)
    torch.testing.assert_close(ref_logps, torch.cat([trl_ref_chosen, trl_ref_rejected]), **LOSS_TOL)
    assert lengths.tolist() == batch["completion_mask"][:, 1:].sum(1).tolist()

    theirs = trainer.compute_loss(hf_policy, batch)
    theirs.backward()
    metrics = trl_metrics(trainer)

    ours_batch.reference = ref_logps
    result = dpo_objective(DPOConfig(loss=loss, beta=beta))(policy.train(), ours_batch)
    B = int(result.units)
    (result.total / B).backward()

    torch.testing.assert_close(result.total / B, theirs.detach(), **LOSS_TOL)
    assert not torch.isclose(theirs.detach(), torch.tensor(np.log(2.0), dtype=torch.float32), atol=1e-3)
    assert_same_gradients(policy, hf_policy)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        # abs 1e-5: fp32 sums of per-token log-probs (~1e-7 relative each) over whole answers,
        # and the margin is a difference of two such sums (measured 3.6e-6 apart on one CPU).
        assert float(result.stats[key]) / B == pytest.approx(metrics[key], rel=1e-5, abs=1e-5), key
    assert 0 < metrics["rewards/accuracies"] < 1


def test_collated_pairs_are_trl_rows_and_our_precomputed_reference_gives_trl_dpo_loss(
        policy_and_reference, tiny_tokenizer, hf_tokenizer, tmp_path):
    """Our whole data path (build_pairs -> compute_reference -> collate) against TRL's: the
    same tokens as TRL's tokenization of the conversations, TRL's collator on our prompt /
    answer split builds exactly our rows, and DPOTrainer's loss on them (its reference model
    run live) is ours with the stored reference log-probs."""
    policy, reference = policy_and_reference
    examples = our_examples(tiny_tokenizer)
    hf_policy, hf_reference = hf_twin(policy).train(), hf_twin(reference)
    args = trainer_args(trl.DPOConfig, tmp_path, loss_type=["sigmoid"], beta=0.1, max_length=None)
    trainer = trl.DPOTrainer(model=hf_policy, ref_model=hf_reference, args=args,
                             train_dataset=trl_conversations(), processing_class=hf_tokenizer)

    # Tokens: TRL's prompt + completion is our whole row. TRL's completion also holds the
    # newline the template writes after <|im_end|>, outside the {% generation %} block that our
    # mask follows (the model stops at <|im_end|>; nothing predicts that newline at inference).
    newline = hf_tokenizer.encode("\n", add_special_tokens=False)
    for e, row in zip(examples, trainer.train_dataset):
        for side, answer in ((e.chosen, row["chosen_ids"]), (e.rejected, row["rejected_ids"])):
            assert side.ids.tolist() == row["prompt_ids"] + answer
            assert e.prompt_len == len(row["prompt_ids"])
            end = int(np.flatnonzero(side.mask)[-1]) + 1
            assert side.mask.tolist() == [False] * e.prompt_len + [True] * (end - e.prompt_len) + \
                [False] * (len(side.ids) - end)
            assert side.ids[end:].tolist() == newline

    # Rows: TRL's collator on our split (answers up to the end of our mask) is our collate.
    def trl_example(e):
        p = e.prompt_len
        ends = [int(np.flatnonzero(s.mask)[-1]) + 1 for s in (e.chosen, e.rejected)]
        return {"prompt_ids": e.chosen.ids[:p].tolist(), "chosen_ids": e.chosen.ids[p:ends[0]].tolist(),
                "rejected_ids": e.rejected.ids[p:ends[1]].tolist()}

    index = list(range(len(examples)))
    table = compute_reference(reference, {"train": examples}, 3, tiny_tokenizer.pad_id, "cpu", "fp32",
                              progress=False)["train"]
    ours_batch = collate(examples, index, tiny_tokenizer.pad_id, table, "cpu")
    batch = trainer.data_collator([trl_example(examples[i]) for i in index])
    assert torch.equal(ours_batch.input_ids, batch["input_ids"])
    scored = ours_batch.targets != IGNORE
    assert torch.equal(scored[:, :-1], batch["completion_mask"][:, 1:].bool()) and not scored[:, -1].any()

    theirs = trainer.compute_loss(hf_policy, batch)
    theirs.backward()
    result = dpo_objective(DPOConfig(loss="sigmoid", beta=0.1))(policy.train(), ours_batch)
    (result.total / result.units).backward()
    torch.testing.assert_close(result.total / result.units, theirs.detach(), **LOSS_TOL)
    assert_same_gradients(policy, hf_policy)


# ---------------------------------------------------------------------------------------------
# Reward model


def hf_reward_twin(rm: RewardModel, pad_id: int):
    """transformers' LlamaForSequenceClassification (num_labels=1) with `rm`'s weights."""
    config = hf_twin(Llama(rm.config)).config
    config.num_labels = 1
    config.pad_token_id = pad_id
    hf = transformers.LlamaForSequenceClassification(config).eval()
    hf.load_state_dict(rm.state_dict(), strict=True)
    return hf


@pytest.fixture
def reward_model(tiny_tokenizer) -> RewardModel:
    torch.manual_seed(3)
    rm = RewardModel(model_config(tiny_tokenizer))
    with torch.no_grad():  # rewards of order 1, not the fresh head's ~0.02: the loss terms all matter
        rm.score.weight.normal_(0.0, 1.0)
    return rm


def test_reward_model_scores_right_padded_rows_like_transformers_sequence_classification(
        reward_model, tiny_tokenizer):
    examples = our_examples(tiny_tokenizer)
    batch = collate(examples, list(range(len(examples))), tiny_tokenizer.pad_id, None, "cpu", full=True)
    assert len(set((batch.input_ids != tiny_tokenizer.pad_id).sum(1).tolist())) > 1  # rows of several lengths
    hf = hf_reward_twin(reward_model, tiny_tokenizer.pad_id)
    with torch.no_grad():
        ours = reward_model.eval()(batch.input_ids, batch.last)
        theirs = hf(batch.input_ids).logits[:, 0]
        masked = hf(batch.input_ids, attention_mask=(batch.input_ids != tiny_tokenizer.pad_id).long()).logits[:, 0]
    torch.testing.assert_close(ours, theirs, **LOSS_TOL)
    torch.testing.assert_close(ours, masked, **LOSS_TOL)
    assert ours.abs().max() > 0.1


@pytest.mark.parametrize("margin, center", [(0.0, 0.0), (0.5, 0.01)])
def test_bradley_terry_loss_gradients_and_stats_equal_trl_reward_trainer(
        margin, center, reward_model, tiny_tokenizer, hf_tokenizer, tmp_path):
    examples = our_examples(tiny_tokenizer)
    hf = hf_reward_twin(reward_model, tiny_tokenizer.pad_id).train()
    data = trl_conversations()
    if margin:  # TRL reads a margin per pair from the data; ours is one for all pairs
        data = data.add_column("margin", [margin] * len(data))
    args = trainer_args(trl.RewardConfig, tmp_path, center_rewards_coefficient=center or None)
    trainer = trl.RewardTrainer(model=hf, args=args, train_dataset=data, processing_class=hf_tokenizer)

    # TRL tokenizes each whole conversation into exactly our reward-model rows.
    for e, row in zip(examples, trainer.train_dataset):
        assert e.chosen.ids.tolist() == row["chosen_ids"] and e.rejected.ids.tolist() == row["rejected_ids"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(examples))])
    ours_batch = collate(examples, list(range(len(examples))), tiny_tokenizer.pad_id, None, "cpu", full=True)
    assert torch.equal(ours_batch.input_ids, batch["input_ids"])
    assert ("margin" in batch) == bool(margin)

    theirs = trainer.compute_loss(hf, batch)
    theirs.backward()
    metrics = trl_metrics(trainer)
    result = reward_objective(RewardConfig(margin=margin, center_rewards_coefficient=center))(
        reward_model.train(), ours_batch)
    B = int(result.units)
    (result.total / B).backward()

    torch.testing.assert_close(result.total / B, theirs.detach(), **LOSS_TOL)
    assert_same_gradients(reward_model, hf)
    assert float(result.stats["accuracy"]) / B == pytest.approx(metrics["accuracy"])
    assert 0 < metrics["accuracy"] < 1
    assert float(result.stats["margin"]) / B == pytest.approx(metrics["margin"], rel=1e-5, abs=1e-6)
    mean = float(result.stats["rewards/chosen"] + result.stats["rewards/rejected"]) / (2 * B)
    assert mean == pytest.approx(metrics["mean_reward"], rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# SimPO


def test_simpo_loss_gradients_and_rewards_equal_trl_cpo_trainer_without_the_nll_term(
        policy_and_reference, hf_tokenizer, tmp_path):
    cpo = pytest.importorskip("trl.experimental.cpo")
    policy, _ = policy_and_reference
    hf = hf_twin(policy).train()
    beta, gamma = 2.0, 0.5
    args = trainer_args(cpo.CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=gamma,
                        max_length=256)
    trainer = cpo.CPOTrainer(model=hf, args=args, train_dataset=trl_conversations(), processing_class=hf_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    theirs, metrics = trainer.compute_loss(hf, batch, return_outputs=True)
    theirs.backward()

    # TRL's own concatenation of the chosen and rejected rows, as our (inputs, shifted targets).
    rows = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=hf_tokenizer.pad_token_id,
                                       device=torch.device("cpu"))
    ids, labels = rows["concatenated_input_ids"], rows["concatenated_labels"]
    B = ids.size(0) // 2
    ours_batch = PairBatch(ids[:, :-1].contiguous(), labels[:, 1:].contiguous(), None, None, torch.arange(B))
    result = dpo_objective(DPOConfig(loss="simpo", beta=beta, simpo_gamma=gamma))(policy.train(), ours_batch)
    (result.total / B).backward()

    torch.testing.assert_close(result.total / B, theirs.detach(), **LOSS_TOL)
    assert_same_gradients(policy, hf)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        # abs 1e-5: fp32 sums of per-token log-probs (~1e-7 relative each) over whole answers,
        # and the margin is a difference of two such sums (measured 3.6e-6 apart on one CPU).
        assert float(result.stats[key]) / B == pytest.approx(metrics[key], rel=1e-5, abs=1e-5), key
    assert 0 < metrics["rewards/accuracies"] < 1
    # CPO logs the per-token average log-probs (what SimPO compares); ours logs the sums.
    lengths = (ours_batch.targets != IGNORE).sum(1)
    with torch.no_grad():
        logps, _ = answer_logps(policy, ours_batch)
    assert float((logps[:B] / lengths[:B]).mean()) == pytest.approx(metrics["logps/chosen"], rel=1e-5)
    assert float(result.stats["logps/chosen"]) == pytest.approx(float(logps[:B].sum()), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# GRPO


def trl_group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """TRL GRPOTrainer's advantages, multi_objective_aggregation="sum_then_normalize" with one
    reward function (trl/trainer/grpo_trainer.py, `_generate_and_score_completions`, 1.16.0
    lines 2761-2787): group mean and Bessel-corrected `nanstd`, + 1e-4."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    advantages = rewards - mean
    return advantages / (std + 1e-4) if scale else advantages


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_follow_trl_grpo_formula(scale):
    g = torch.Generator().manual_seed(0)
    rewards = torch.cat([torch.randn(8, generator=g), torch.tensor([1.0, 1.0, 1.0, 1.0]),  # a group without signal
                         torch.tensor([0.0, 1.0, 0.0, 0.0])])
    ours = group_advantages(rewards, 4, scale)
    torch.testing.assert_close(ours, trl_group_advantages(rewards, 4, scale), rtol=1e-6, atol=1e-6)
    assert torch.equal(ours[8:12], torch.zeros(4))


N_ROWS, PROMPT, ANSWER = 6, 5, 8  # rows, prompt tokens (no padding), answer columns


def grpo_rows(policy, pad_id: int, temperature: float):
    """Fixed GRPO rows (prompt + right-padded answers of several lengths), advantages, and
    log-probs of an older policy (ratio != 1, so the clipping acts) and of a reference."""
    g = torch.Generator().manual_seed(4)
    N, P, C = N_ROWS, PROMPT, ANSWER
    V = policy.config.vocab_size
    prompt_ids = torch.randint(20, V, (N, P), generator=g)
    completion_mask = (torch.arange(C) < torch.tensor([8, 5, 3, 8, 1, 6])[:, None]).long()
    completion_ids = torch.randint(20, V, (N, C), generator=g).masked_fill(completion_mask == 0, pad_id)
    rows = torch.cat([prompt_ids, completion_ids], dim=1)
    targets = rows[:, 1:].clone()
    targets[:, :P - 1] = IGNORE
    targets[:, P - 1:] = targets[:, P - 1:].masked_fill(completion_mask == 0, IGNORE)
    with torch.no_grad():
        current = token_logps(policy, rows[:, :-1], targets, temperature)[:, P - 1:]
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.randn(N, generator=g),
              "old_per_token_logps": current + 0.3 * torch.randn(N, C, generator=g),
              "ref_per_token_logps": current + 0.2 * torch.randn(N, C, generator=g),
              "num_items_in_batch": completion_mask.sum()}
    return inputs, rows[:, :-1], targets


def trl_grpo_trainer(hf, hf_tokenizer, tmp_path, beta: float, temperature: float, **kw):
    args = trainer_args(trl.GRPOConfig, tmp_path, num_generations=4, max_completion_length=ANSWER,
                        loss_type="dapo", beta=0.0, epsilon=0.2, temperature=temperature,
                        **kw)
    trainer = trl.GRPOTrainer(model=hf, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["你好"] * 4}),
                              processing_class=hf_tokenizer)
    # Built with beta=0: with beta > 0 and no adapter, TRL loads a reference model from the
    # policy's Hub name. `_compute_loss` reads `beta` and the batch's reference log-probs only.
    trainer.beta = beta
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    return trainer


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.04, 1.0), (0.04, 0.7)])
def test_grpo_token_losses_give_trl_dapo_loss_gradients_and_stats(
        beta, temperature, policy_and_reference, hf_tokenizer, tmp_path):
    """TRL's own `_compute_loss` (loss_type="dapo", the KL term without TRL 1.16's new
    importance-ratio weighting, see the next test) on fixed rows, advantages, old and reference
    log-probs, against ours: the policy's log-probs (at the sampling temperature) through
    `grpo_token_losses`, summed and divided by the answer tokens."""
    policy, _ = policy_and_reference
    hf = hf_twin(policy).train()
    trainer = trl_grpo_trainer(hf, hf_tokenizer, tmp_path, beta, temperature)
    assert trainer.args.use_bias_correction_kl  # TRL's default, which grpo_token_losses follows
    inputs, x, y = grpo_rows(policy, hf_tokenizer.pad_token_id, temperature)
    theirs = trainer.compute_loss(hf, inputs)
    theirs.backward()
    metrics = trl_metrics(trainer)

    logps = token_logps(policy.train(), x, y, temperature)[:, PROMPT - 1:]
    mask = inputs["completion_mask"].bool()
    losses, stats = grpo_token_losses(logps, inputs["old_per_token_logps"], inputs["advantages"], mask, 0.2, beta,
                                      inputs["ref_per_token_logps"] if beta else None)
    n = mask.sum()
    (losses.sum() / n).backward()

    torch.testing.assert_close(losses.sum() / n, theirs.detach(), **LOSS_TOL)
    assert_same_gradients(policy, hf)
    clipped = float(stats["clip_ratio"] / n)
    assert clipped == pytest.approx(metrics["clip_ratio/region_mean"], rel=1e-6)
    assert 0 < clipped < 1
    if beta:
        assert float(stats["kl"] / n) == pytest.approx(metrics["kl"], rel=1e-5)


def test_grpo_kl_gradient_on_policy_equals_trl_default(policy_and_reference, hf_tokenizer, tmp_path):
    """Our trainer's case: one update per batch of samples (π_old = π, detached), beta > 0,
    against TRL's defaults: the ratio is 1, but its gradient weights the KL term, in TRL
    (use_bias_correction_kl) and in grpo_token_losses alike."""
    policy, _ = policy_and_reference
    hf = hf_twin(policy).train()
    beta = 0.04
    trainer = trl_grpo_trainer(hf, hf_tokenizer, tmp_path, beta, 1.0)
    assert trainer.args.use_bias_correction_kl
    inputs, x, y = grpo_rows(policy, hf_tokenizer.pad_token_id, 1.0)
    del inputs["old_per_token_logps"]  # on-policy: TRL uses its log-probs, detached
    theirs = trainer.compute_loss(hf, inputs)
    theirs.backward()

    logps = token_logps(policy.train(), x, y)[:, PROMPT - 1:]
    mask = inputs["completion_mask"].bool()
    losses, _ = grpo_token_losses(logps, logps.detach(), inputs["advantages"], mask, 0.2, beta,
                                  inputs["ref_per_token_logps"])
    (losses.sum() / mask.sum()).backward()
    torch.testing.assert_close(losses.sum() / mask.sum(), theirs.detach(), **LOSS_TOL)
    assert_same_gradients(policy, hf)
