"""The stages after SFT, end to end on tiny runs: DPO (and IPO, SimPO, LoRA, QLoRA), the reward
model (`babyllama score`, transformers export), GRPO (a Python reward, the math reward), exact
resume, token-correct accumulation, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SENTENCES, babyllama_cmd, cli_env

QUESTIONS = ["你好", "今天天气怎么样？", "说点什么吧", "你喜欢什么？", "讲个故事", "随便聊聊"]
# Settings every run here shares: no periodic evals, samples or warmup; a line per step.
QUIET = ["train.eval_every=0", "train.sample_every=0", "train.sample_prompts=[]", "train.log_every=1",
         "train.warmup_steps=0"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# Short answers (1-13 tokens with the tiny tokenizer: every pair fits the 64-token context).
CHOSEN = ["今天天气很好", "我们去公园散步。", "中国的经济发展很快"]
REJECTED = ["人民生活水平不断提高。", "房间很干净", "服务也很周到"]
LONG_ANSWER = "机器学习和自然语言处理很有意思。" * 2  # 66 tokens: no pair with it fits


def preference_pairs(n: int = 20) -> list[dict]:
    """Pairs whose chosen and rejected answers differ (two sets of corpus clauses)."""
    return [{"prompt": QUESTIONS[i % len(QUESTIONS)], "chosen": CHOSEN[i % 3], "rejected": REJECTED[(i // 3) % 3]}
            for i in range(n)]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def cli(capsys, *args) -> tuple[int, str, str]:
    """`babyllama ARGS` in this process: (exit code, stdout, stderr)."""
    from babyllama.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


BAR = re.compile(r"(train|scoring pairs): +\d+%\|[^\r\n]*?\]")  # a tqdm progress line


def one_line_error(rc: int, err: str, *needles: str) -> None:
    """Exit code 2 and, progress bars aside, one line on stderr: `error: ...` naming `needles`."""
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in re.split(r"[\r\n]", BAR.sub("", err)) if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_pairs())


def pair_examples(run: Path, split: str = "train") -> list:
    """The pairs of a DPO/reward run as the run encoded them (same split, same template)."""
    from babyllama.run import Run
    from babyllama.train.pairs import load_pair_data

    r = Run(run)
    cfg = r.config()
    max_len = cfg.train.seq_len + (0 if cfg.stage == "reward" else 1)
    data = load_pair_data(cfg, r.load_tokenizer(), max_len)
    return getattr(data, split)


@torch.no_grad()
def pair_logps(model, examples, pad_id: int) -> torch.Tensor:
    """(N, 2) summed answer log-probs (chosen, rejected) of `examples` under `model` (fp32)."""
    from babyllama.train.dpo import answer_logps
    from babyllama.train.pairs import pair_scores

    model.eval()
    return pair_scores(lambda b: answer_logps(model, b)[0], examples, 8, pad_id, torch.device("cpu"))


def base_model(run: Path):
    from babyllama.run import Run

    return Run(run).load_model().eval()


# ---------------------------------------------------------------------------------------------
# DPO


def test_dpo_end_to_end_prefers_the_chosen_answers(chat_run, pairs_file, tmp_path, capsys):
    from babyllama.run import Run

    out = tmp_path / "dpo"
    rc, stdout, err = cli(capsys, "dpo", "--base", chat_run, "--data", pairs_file, "-o", out,
                          "train.max_steps=6", "train.batch_size=4", "train.lr=3e-3", *QUIET)
    assert rc == 0, err[-3000:]
    assert "reference log-probs of 20 pairs" in stdout and "train: 19 pairs, val: 1 pair" in stdout
    assert f"babyllama chat {out}" in stdout
    for name in ("model.safetensors", "config.yaml", "reference_logps.safetensors", "metrics.jsonl",
                 "tokenizer"):
        assert (out / name).exists(), name
    cfg = Run(out).config()
    assert cfg.stage == "dpo" and cfg.dpo.loss == "sigmoid" and cfg.sft.base == str(Path(chat_run).resolve())
    saved = (out / "config.yaml").read_text(encoding="utf-8")
    assert "stage: dpo" in saved and "\ndpo:" in saved and "\ngrpo:" not in saved
    assert Run(out).chats()

    records = metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps:
        assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen"} <= set(r)
        assert r["tokens"] == 4 * r["step"]  # units are pairs
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy is the reference
    assert steps[-1]["rewards/margins"] > 0
    val = [r for r in records if "val_loss" in r]
    assert val and {"val_rewards/accuracies", "val_rewards/margins"} <= set(val[-1])

    # The stored reference is the base's log-probs of exactly these pairs.
    train_ex = pair_examples(out)
    tokenizer = Run(out).load_tokenizer()
    before = pair_logps(base_model(chat_run), train_ex, tokenizer.pad_id)
    reference = load_file(str(out / "reference_logps.safetensors"))
    torch.testing.assert_close(reference["train"], before, atol=1e-4, rtol=1e-5)
    assert reference["val"].shape == (1, 2)

    # DPO moved the policy the right way: chosen over rejected by more than the base did.
    after = pair_logps(base_model(out), train_ex, tokenizer.pad_id)
    margin_before = (before[:, 0] - before[:, 1]).mean()
    margin_after = (after[:, 0] - after[:, 1]).mean()
    assert margin_after > margin_before + 1.0, (margin_before, margin_after)
    assert ((after[:, 0] - after[:, 1]) > (before[:, 0] - before[:, 1])).float().mean() > 0.8

    # A DPO run is a chat run like its base.
    rc, stdout, err = cli(capsys, "chat", out, "--prompt", "你好", "--max-new-tokens", "4", "--seed", "0")
    assert rc == 0 and stdout.strip(), err[-2000:]


def test_dpo_resume_is_exact_and_reads_the_stored_reference(chat_run, pairs_file, tmp_path, capsys,
                                                            monkeypatch):
    from babyllama.train import dpo

    common = ["--base", chat_run, "--data", pairs_file, "train.batch_size=4", "train.lr=3e-3",
              "train.schedule=constant", *QUIET]
    rc, _, err = cli(capsys, "dpo", *common, "-o", tmp_path / "whole", "train.max_steps=4")
    assert rc == 0, err[-3000:]
    rc, _, err = cli(capsys, "dpo", *common, "-o", tmp_path / "split", "train.max_steps=2")
    assert rc == 0, err[-3000:]
    reference = tmp_path / "split" / "reference_logps.safetensors"
    stamp = reference.stat().st_mtime_ns

    def no_recompute(*args, **kwargs):
        raise AssertionError("the reference log-probs were recomputed on resume")

    monkeypatch.setattr(dpo, "compute_reference", no_recompute)
    rc, stdout, err = cli(capsys, "dpo", "-o", tmp_path / "split", "--resume", "train.max_steps=4")
    assert rc == 0, err[-3000:]
    assert "reference log-probs of" not in stdout
    assert reference.stat().st_mtime_ns == stamp
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert [r["step"] for r in metrics(tmp_path / "split") if "loss" in r] == [1, 2, 3, 4]

    # Resuming with another stage's command is refused before anything loads.
    rc, _, err = cli(capsys, "grpo", "-o", tmp_path / "split", "--resume", "train.max_steps=5")
    one_line_error(rc, err, "is a dpo run", "babyllama dpo")


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_dpo_with_adapters_saves_the_adapter_and_its_reference_is_the_base(
        chat_run, pairs_file, tmp_path, capsys, kind):
    from babyllama.lora import load_adapter, quantize_base
    from babyllama.model.llama import Llama
    from babyllama.model.weights import load_weights
    from babyllama.run import Run

    if kind == "qlora":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / kind
    rc, stdout, err = cli(capsys, "dpo", "--base", chat_run, "--data", pairs_file, "-o", out, f"--{kind}",
                          "lora.r=4", "lora.alpha=8", "train.max_steps=3", "train.batch_size=4",
                          "train.lr=1e-2", *QUIET)
    assert rc == 0, err[-3000:]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    run = Run(out)
    assert run.is_lora() and run.config().lora.qlora == (kind == "qlora")

    # The reference: the starting model with its adapter off (for QLoRA the NF4 base).
    tokenizer = run.load_tokenizer()
    train_ex = pair_examples(out)
    start = base_model(chat_run)
    full_precision = pair_logps(start, train_ex, tokenizer.pad_id)
    if kind == "qlora":
        quantize_base(start, torch.float32)
    expected = pair_logps(start, train_ex, tokenizer.pad_id)
    if kind == "qlora":  # the NF4 base scores the answers measurably differently
        assert (expected - full_precision).abs().max() > 1e-2
    reference = load_file(str(out / "reference_logps.safetensors"))["train"]
    torch.testing.assert_close(reference, expected, atol=1e-4, rtol=1e-5)

    # Loading the run merges the adapter into the full-precision base.
    merged = run.load_model().eval()
    assert type(merged) is Llama
    model = Llama(run.config().model)
    load_weights(model, Path(chat_run) / "model.safetensors")
    x = torch.tensor([train_ex[0].chosen.ids.tolist()])
    with torch.no_grad():
        adapted = load_adapter(model, out).eval()(x)[0]
        torch.testing.assert_close(merged(x)[0], adapted, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(adapted, base_model(chat_run)(x)[0], atol=1e-4)  # it learned


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_ipo_and_simpo_train(chat_run, pairs_file, tmp_path, capsys, loss):
    out = tmp_path / loss
    rc, _, err = cli(capsys, "dpo", "--base", chat_run, "--data", pairs_file, "-o", out, "--loss", loss,
                     "train.max_steps=2", "train.batch_size=4", *QUIET)
    assert rc == 0, err[-3000:]
    assert (out / "reference_logps.safetensors").exists() == (loss != "simpo")
    steps = [r for r in metrics(out) if "loss" in r]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    if loss == "ipo":  # at the reference Δ = 0: (0 - 1/(2β))² with β = 0.1
        assert steps[0]["loss"] == pytest.approx(25.0, rel=1e-4)


class GradRecorder(torch.optim.SGD):
    """An optimizer that keeps a copy of the gradients it is given and leaves the weights alone."""
    made: list = []

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        GradRecorder.made.append(self)

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                      if p.grad is not None]


def recorded_step(monkeypatch, run_fn, cfgs: dict) -> dict:
    """{key: (first metrics record, gradients)} of one step of `run_fn(cfg)` per config."""
    from babyllama.train import trainer

    monkeypatch.setattr(trainer, "build_optimizer", lambda model, cfg, lr_scale=None: GradRecorder(
        [p for p in model.parameters() if p.requires_grad]))
    out = {}
    for key, cfg in cfgs.items():
        GradRecorder.made.clear()
        run = run_fn(cfg)
        out[key] = [r for r in metrics(run) if "loss" in r][0], GradRecorder.made[-1].grads
    return out


def assert_same_step(a, b) -> None:
    (one, g_one), (split, g_split) = a, b
    assert split["tokens"] == one["tokens"]
    assert split["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert split["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    for x, y in zip(g_one, g_split, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-7)


def stage_cfg(stage: str, base, out: Path, data: Path, extra=()):
    from babyllama.config import parse_overrides
    from babyllama.train.sft import sft_config

    values = parse_overrides([*QUIET, "train.precision=fp32", "train.device=cpu", "train.grad_clip=0",
                              "model.dropout=0", *extra])
    values.setdefault("sft", {})["sources"] = [str(data)]
    values["out_dir"] = str(out)
    return sft_config(base, values, stage=stage)


def test_dpo_step_is_the_mean_over_its_pairs_whatever_the_micro_batch_split(
        chat_run, tmp_path, monkeypatch):
    """batch 4 x accumulation 1 and batch 2 x accumulation 2 over the same four pairs (of
    different lengths) give the same loss, statistics and gradients."""
    from babyllama.train.dpo import run_dpo

    pairs = [{"prompt": QUESTIONS[i], "chosen": CHOSEN[i % 3] * (1 + i % 2), "rejected": REJECTED[i % 3] + "。" * i}
             for i in range(4)]
    data = write_jsonl(tmp_path / "four.jsonl", pairs)
    cfgs = {(b, a): stage_cfg("dpo", chat_run, tmp_path / f"{b}x{a}", data,
                              ["train.max_steps=1", "sft.val_fraction=0", f"train.batch_size={b}",
                               f"train.grad_accum={a}"]) for b, a in ((4, 1), (2, 2))}
    steps = recorded_step(monkeypatch, run_dpo, cfgs)
    assert steps[4, 1][0]["tokens"] == 4
    assert steps[4, 1][0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # log 2 for every pair at the start
    assert_same_step(steps[4, 1], steps[2, 2])

    # Both are the gradient of the mean of the four pairs' DPO losses, computed here by hand.
    from babyllama.run import Run
    from babyllama.train.dpo import answer_logps
    from babyllama.train.pairs import collate

    model = base_model(chat_run)
    examples = pair_examples(tmp_path / "4x1")
    batch = collate(examples, list(range(4)), Run(tmp_path / "4x1").load_tokenizer().pad_id, None,
                    torch.device("cpu"))
    logps, _ = answer_logps(model, batch)
    ref = logps.detach()  # the reference is the starting policy
    delta = (logps[:4] - ref[:4]) - (logps[4:] - ref[4:])
    (-torch.nn.functional.logsigmoid(0.1 * delta)).mean().backward()
    expected = [p.grad for p in model.parameters() if p.grad is not None]
    for x, y in zip(expected, steps[4, 1][1], strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Reward model


def test_reward_model_trains_scores_and_exports_to_transformers(chat_run, pairs_file, tmp_path, capsys):
    from babyllama.errors import UserError
    from babyllama.llm import load
    from babyllama.model.reward import RewardModel
    from babyllama.run import Run

    rm = tmp_path / "rm"
    rc, stdout, err = cli(capsys, "reward", "--base", chat_run, "--data", pairs_file, "-o", rm,
                          "train.max_steps=8", "train.batch_size=4", "train.lr=3e-3", *QUIET)
    assert rc == 0, err[-3000:]
    assert f"babyllama score {rm}" in stdout and "reward model:" in stdout
    run = Run(rm)
    assert run.is_reward_model() and not Run(chat_run).is_reward_model() and not run.chats()
    model = run.load_reward_model().eval()
    assert isinstance(model, RewardModel)
    assert not (rm / "reference_logps.safetensors").exists()
    records = metrics(rm)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 8 and {"accuracy", "margin"} <= set(steps[0])
    val = [r for r in records if "val_accuracy" in r]
    assert val and 0 <= val[-1]["val_accuracy"] <= 1 and "val_margin" in val[-1]
    assert steps[-1]["loss"] < steps[0]["loss"]

    # babyllama score: a table, the accuracy line and one JSON row per pair.
    rows_file = tmp_path / "rewards.jsonl"
    rc, stdout, err = cli(capsys, "score", rm, "--data", pairs_file, "--jsonl", rows_file, "--show", "3")
    assert rc == 0, err[-3000:]
    lines = stdout.splitlines()
    assert lines[0].split() == ["pair", "chosen", "rejected", "margin", "right"]
    assert "pairs.jsonl:1" in lines[1] and "20 pairs" in stdout and "accuracy" in stdout
    rows = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 20 and rows[0]["source"].endswith("pairs.jsonl:1")
    assert sum(r["correct"] for r in rows) >= 18, stdout[-500:]  # it learned the preference (100% here)
    assert f"accuracy {sum(r['correct'] for r in rows) / 20:.1%}" in stdout
    for row in rows:
        assert row["margin"] == pytest.approx(row["chosen"] - row["rejected"], abs=1e-6)
        assert row["correct"] == (row["chosen"] > row["rejected"])
    # The scores are the model's on the encoded pairs.
    examples = pair_examples(rm, "train") + pair_examples(rm, "val")
    by_source = {r["source"]: r for r in rows}
    e = examples[0]
    with torch.no_grad():
        c = model(torch.tensor([e.chosen.ids.tolist()])).item()
    assert by_source[e.source]["chosen"] == pytest.approx(c, abs=1e-5)

    # transformers' LlamaForSequenceClassification gives the same rewards, pads included.
    hf_dir = tmp_path / "hf"
    rc, _, err = cli(capsys, "export", rm, "--format", "hf", "-o", hf_dir)
    assert rc == 0, err[-3000:]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    tokenizer = run.load_tokenizer()
    seqs = [examples[0].chosen.ids.tolist(), examples[1].rejected.ids.tolist()[:9],
            examples[2].chosen.ids.tolist()[:5]]
    T = max(map(len, seqs))
    x = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    assert (x == tokenizer.pad_id).any()
    last = torch.tensor([len(s) - 1 for s in seqs])
    with torch.no_grad():
        ours = model(x, last)
        theirs = hf(input_ids=x).logits[:, 0].float()
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    # What a reward model cannot do is one line.
    rc, _, err = cli(capsys, "export", rm, "--format", "gguf", "-o", tmp_path / "gguf")
    one_line_error(rc, err, "reward model exports only to transformers")
    rc, _, err = cli(capsys, "chat", rm, "--prompt", "你好")
    one_line_error(rc, err, "is a reward model", "babyllama score")
    with pytest.raises(UserError, match="is a reward model"):
        load(rm, device="cpu")
    rc, _, err = cli(capsys, "score", chat_run, "--data", pairs_file)
    one_line_error(rc, err, "not a reward model run")

    # grpo.reward=rm:RUN scores a prompt and an answer as the conversation the template renders.
    from babyllama.tokenizer.chat_template import encode_chat
    from babyllama.train.rewards import load_reward

    reward = load_reward(f"rm:{rm}")
    prompts, answers = ["你好", "今天天气怎么样？"], ["今天天气很好", "房间很干净"]
    got = reward(prompts, answers, ["", ""])
    for p, a, g in zip(prompts, answers, got):
        ids = encode_chat(tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": a}]).ids
        with torch.no_grad():
            assert g == pytest.approx(model(torch.tensor([ids])).item(), abs=1e-5)


def test_reward_model_resume_is_exact(chat_run, pairs_file, tmp_path, capsys):
    common = ["--base", chat_run, "--data", pairs_file, "train.batch_size=4", "train.lr=3e-3",
              "train.schedule=constant", *QUIET]
    rc, _, err = cli(capsys, "reward", *common, "-o", tmp_path / "whole", "train.max_steps=4")
    assert rc == 0, err[-3000:]
    rc, _, err = cli(capsys, "reward", *common, "-o", tmp_path / "split", "train.max_steps=2")
    assert rc == 0, err[-3000:]
    rc, _, err = cli(capsys, "reward", "-o", tmp_path / "split", "--resume", "train.max_steps=4")
    assert rc == 0, err[-3000:]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert "score.weight" in a and "lm_head.weight" not in a and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# GRPO


@pytest.fixture(scope="module")
def loose_chat(pretrained_run, tmp_path_factory) -> Path:
    """A chat run whose answers to any question vary among corpus sentences (30 SFT steps on six
    questions x six answers): samples differ, so rewards do too."""
    from babyllama.config import parse_overrides
    from babyllama.train.sft import run_sft, sft_config

    root = tmp_path_factory.mktemp("loose")
    data = write_jsonl(root / "loose.jsonl", [
        {"messages": [{"role": "user", "content": QUESTIONS[i % 6]},
                      {"role": "assistant", "content": SENTENCES[(i * 5) % 6]}]} for i in range(36)])
    values = parse_overrides(["train.lr=1e-2", "train.batch_size=8", "train.log_every=1", "train.max_steps=30",
                              "train.sample_prompts=[]", "sft.val_fraction=0"])
    values["sft"]["sources"] = [str(data)]
    values["out_dir"] = str(root / "sft")
    return run_sft(sft_config(pretrained_run, values))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl",
                       [{"question": q, "answer": "1"} for q in QUESTIONS * 2])


@pytest.fixture(scope="module")
def rewards_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(
        "import math\n\n"
        "def weather(prompts, completions, answer):\n"
        "    return [1.0 if '天气' in c else 0.0 for c in completions]\n\n"
        "def length(prompts, completions, answer):\n"
        "    return [float(len(c)) for c in completions]\n\n"
        "def broken(prompts, completions, answer):\n"
        "    raise ValueError('no reward today')\n\n"
        "def nan(prompts, completions, answer):\n"
        "    return [math.nan] * len(completions)\n\n"
        "def short(prompts, completions, answer):\n"
        "    return [0.0] * (len(completions) - 1)\n\n"
        "def strings(prompts, completions, answer):\n"
        "    return ['1'] * len(completions)\n\n"
        "def mapping(prompts, completions, answer):\n"
        "    return {i: 1.0 for i in range(len(completions))}\n\n"
        "def huge(prompts, completions, answer):\n"
        "    return [1e308, -1e308] * (len(completions) // 2)\n\n"
        "def exits(prompts, completions, answer):\n"
        "    raise SystemExit(3)\n", encoding="utf-8")
    return path


GRPO_FAST = ["grpo.max_new_tokens=8", *QUIET]


def test_grpo_with_a_python_reward_raises_the_share_of_rewarded_answers(
        loose_chat, prompts_file, rewards_module, tmp_path, capsys):
    out = tmp_path / "grpo"
    rc, stdout, err = cli(capsys, "grpo", "--base", loose_chat, "--data", prompts_file, "-o", out,
                          f"grpo.reward={rewards_module}:weather", "--num-generations", "8",
                          "train.batch_size=16", "train.max_steps=16", "train.lr=3e-3",
                          "train.schedule=constant", *GRPO_FAST)
    assert rc == 0, err[-3000:]
    assert "2 prompts x 8 answers per step -> 16 steps" in stdout
    assert (out / "model.safetensors").exists()
    cfg_text = (out / "config.yaml").read_text(encoding="utf-8")
    assert "stage: grpo" in cfg_text and "\ngrpo:" in cfg_text
    steps = [r for r in metrics(out) if "loss" in r]
    assert len(steps) == 16
    assert {"reward", "solved", "answer_tokens", "zero_std_groups", "clip_ratio"} <= set(steps[0])
    first = sum(r["reward"] for r in steps[:3]) / 3
    last = sum(r["reward"] for r in steps[-3:]) / 3
    # (16 seeds of this setup: from 0.25-0.6 over the first three steps to 0.94-1.0 over the last)
    assert last > first + 0.25 and last > 0.85, [r["reward"] for r in steps]


def test_grpo_step_is_the_mean_over_answer_tokens_whatever_the_micro_batch_split(
        loose_chat, prompts_file, rewards_module, tmp_path, monkeypatch):
    """The same sampled answers (two prompts x two) split 4 x 1 or 2 x 2 give the same loss and
    gradients: the loss is normalised over all the step's answer tokens."""
    from babyllama.train.grpo import RolloutBatches, run_grpo

    rollouts = []
    sample = RolloutBatches.sample
    monkeypatch.setattr(RolloutBatches, "sample", lambda self, step, device: rollouts.append(
        sample(self, step, device)) or rollouts[-1])
    cfgs = {(b, a): stage_cfg("grpo", loose_chat, tmp_path / f"{b}x{a}", prompts_file,
                              ["train.max_steps=1", "grpo.num_generations=2", "grpo.max_new_tokens=8",
                               f"grpo.reward={rewards_module}:length", f"train.batch_size={b}",
                               f"train.grad_accum={a}", "train.seed=1"]) for b, a in ((4, 1), (2, 2))}
    steps = recorded_step(monkeypatch, run_grpo, cfgs)
    one, split = rollouts
    assert torch.equal(one.input_ids, split.input_ids) and torch.equal(one.advantages, split.advantages)
    answer_tokens = (split.targets != -100).sum(-1)
    assert answer_tokens[:2].sum() != answer_tokens[2:].sum()  # a mean of micro-batch means would differ
    assert (one.advantages != 0).all()  # every answer has a gradient
    assert steps[4, 1][0]["reward"] == steps[2, 2][0]["reward"]
    assert steps[4, 1][0]["tokens"] == int(answer_tokens.sum())
    assert_same_step(steps[4, 1], steps[2, 2])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grpo_kl_penalty_starts_at_zero_against_the_starting_model(
        loose_chat, prompts_file, rewards_module, tmp_path, capsys, lora):
    """grpo.beta > 0: the reference is a frozen copy of the start (full fine-tuning) or the model
    with its adapter off (LoRA); either way the first step's KL is 0 and later ones are not."""
    out = tmp_path / "kl"
    rc, _, err = cli(capsys, "grpo", "--base", loose_chat, "--data", prompts_file, "-o", out,
                     f"grpo.reward={rewards_module}:length", "grpo.beta=0.1", "grpo.num_generations=4",
                     "train.batch_size=8", "train.max_steps=3", "train.lr=1e-2", *GRPO_FAST,
                     *(["--lora", "lora.r=4"] if lora else []))
    assert rc == 0, err[-3000:]
    assert (out / ("adapter_model.safetensors" if lora else "model.safetensors")).exists()
    kl = [r["kl"] for r in metrics(out) if "loss" in r]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-6, kl


def test_grpo_math_reward_on_builtin_arithmetic(loose_chat, tmp_path, capsys):
    out = tmp_path / "math"
    rc, stdout, err = cli(capsys, "grpo", "--base", loose_chat, "--data", "builtin:arith-zh", "-o", out,
                          "grpo.num_generations=2", "train.batch_size=4", "train.max_steps=2",
                          "grpo.max_prompts=8", *GRPO_FAST,
                          # the problems take 67-100 tokens of prompt; RoPE extends to a longer context
                          "model.max_position_embeddings=128")
    assert rc == 0, err[-3000:]
    assert "reward math" in stdout
    steps = [r for r in metrics(out) if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert {"reward", "solved", "answer_tokens"} <= set(r)
        assert 0 <= r["solved"] <= 1 and 0 < r["answer_tokens"] <= 8


def test_grpo_resume_is_exact(loose_chat, prompts_file, rewards_module, tmp_path, capsys):
    common = ["--base", loose_chat, "--data", prompts_file, f"grpo.reward={rewards_module}:length",
              "grpo.num_generations=2", "train.batch_size=4", "train.lr=5e-3", "train.schedule=constant",
              *GRPO_FAST]
    rc, _, err = cli(capsys, "grpo", *common, "-o", tmp_path / "whole", "train.max_steps=4")
    assert rc == 0, err[-3000:]
    rc, _, err = cli(capsys, "grpo", *common, "-o", tmp_path / "split", "train.max_steps=2")
    assert rc == 0, err[-3000:]
    rc, _, err = cli(capsys, "grpo", "-o", tmp_path / "split", "--resume", "train.max_steps=4")
    assert rc == 0, err[-3000:]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    start = load_file(str(loose_chat / "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the steps did update the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert [r["reward"] for r in metrics(tmp_path / "split") if "loss" in r] == \
        [r["reward"] for r in metrics(tmp_path / "whole") if "loss" in r]


def test_a_python_reward_is_found_as_module_function_or_file_function(rewards_module, monkeypatch):
    from babyllama.train.rewards import load_reward

    completions = ["今天天气很好", "房间很干净"]
    by_file = load_reward(f"{rewards_module}:weather")
    assert by_file(["a", "b"], completions, ["1", "1"]) == [1.0, 0.0]
    monkeypatch.syspath_prepend(str(rewards_module.parent))  # sys.path is restored afterwards
    monkeypatch.chdir(rewards_module.parent)
    by_module = load_reward("my_rewards:weather")
    assert by_module(["a", "b"], completions, ["1", "1"]) == [1.0, 0.0]
    assert load_reward("math")(["1+1"], ["所以答案是2。"], ["2"]) == [1.0]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2


@pytest.mark.parametrize("function, message", [
    ("broken", r"prompts\.jsonl:(\d+): the reward function broken raised ValueError: no reward today "
               r"\(prompt '(.+)'\.\.\.\)"),
    ("nan", r"prompts\.jsonl:(\d+): the reward function nan returned nan for the prompt '(.+)'"),
    ("short", r"prompts\.jsonl:\d+: the reward function short returned 3 rewards for 4 completions"),
    ("strings", r"prompts\.jsonl:(\d+): the reward function strings returned str '1' for the prompt '(.+)', "
                r"not a number"),
    ("mapping", r"the reward function mapping must return a list of numbers, got dict"),
    ("huge", r"prompts\.jsonl:(\d+): the reward function huge returned 1e\+308 for the prompt '(.+)' "
             r"\(rewards must be finite"),
    ("exits", r"the reward function exits raised SystemExit: 3"),
])
def test_a_bad_reward_function_stops_grpo_in_one_line(loose_chat, prompts_file, rewards_module, tmp_path,
                                                      capsys, function, message):
    rc, _, err = cli(capsys, "grpo", "--base", loose_chat, "--data", prompts_file, "-o", tmp_path / "g",
                     f"grpo.reward={rewards_module}:{function}", "grpo.num_generations=2",
                     "train.batch_size=4", "train.max_steps=1", *GRPO_FAST)
    one_line_error(rc, err)
    found = re.search(message, err)
    assert found, err
    if found.groups():  # file:line is the line of the prompt the message quotes
        line, prompt = found.groups()
        assert (QUESTIONS * 2)[int(line) - 1] == prompt


@pytest.mark.parametrize("args, needles", [
    (["grpo.reward=nosuchmodule_xyz:f"], ["nosuchmodule_xyz", "cannot import"]),
    (["grpo.reward=REWARDS:nofunction"], ["has no function 'nofunction'"]),
    (["grpo.reward=/no/such/file.py:f"], ["no such file"]),
    (["grpo.reward=bleu"], ["give math, rm:PATH"]),
    (["grpo.num_generations=1"], ["grpo.num_generations must be at least 2"]),
    (["grpo.num_generations=2", "train.batch_size=3"], ["must be a multiple of grpo.num_generations (2)"]),
    (["grpo.reward=rm:BASE"], ["not a reward model run"]),
])
def test_bad_grpo_settings_are_one_line(loose_chat, prompts_file, rewards_module, tmp_path, capsys,
                                        args, needles):
    subst = {"REWARDS": str(rewards_module), "BASE": str(loose_chat)}
    args = [a.replace("REWARDS", subst["REWARDS"]).replace("BASE", subst["BASE"]) for a in args]
    rc, _, err = cli(capsys, "grpo", "--base", loose_chat, "--data", prompts_file, "-o", tmp_path / "g",
                     "train.max_steps=1", *GRPO_FAST, *args)
    one_line_error(rc, err, *needles)
    assert not (tmp_path / "g" / "resume").exists()


def test_bad_pairs_are_named_and_long_pairs_dropped_and_counted(chat_run, tmp_path, capsys):
    same = write_jsonl(tmp_path / "same.jsonl", preference_pairs(3) + [
        {"prompt": "你好", "chosen": "一样的回答", "rejected": "一样的回答"}])
    rc, _, err = cli(capsys, "dpo", "--base", chat_run, "--data", same, "-o", tmp_path / "a", "train.max_steps=1")
    one_line_error(rc, err, f"{same}:4:", "'chosen' and 'rejected' are the same answer")

    some_long = write_jsonl(tmp_path / "long.jsonl", preference_pairs(6) + [
        {"prompt": "你好", "chosen": LONG_ANSWER, "rejected": "好"}])
    rc, stdout, err = cli(capsys, "dpo", "--base", chat_run, "--data", some_long, "-o", tmp_path / "b",
                          "train.max_steps=1", "train.batch_size=2", "sft.val_fraction=0", *QUIET)
    assert rc == 0, err[-3000:]
    assert "pairs: 7 pairs -> 6 examples; 1 dropped (1 last exchange longer than 65 tokens)" in stdout
    assert "train: 6 pairs" in stdout

    all_long = write_jsonl(tmp_path / "all_long.jsonl", [
        {"prompt": q, "chosen": LONG_ANSWER, "rejected": "好"} for q in QUESTIONS])
    rc, _, err = cli(capsys, "reward", "--base", chat_run, "--data", all_long, "-o", tmp_path / "c",
                     "train.max_steps=1", "sft.val_fraction=0")
    one_line_error(rc, err, "no training pairs left", "6 dropped", "longer than 64 tokens")
    assert not (tmp_path / "c" / "model.safetensors").exists()


def test_a_lora_sft_run_as_base_must_be_merged_first(pretrained_run, pairs_file, tmp_path, capsys):
    data = write_jsonl(tmp_path / "greet.jsonl", [
        {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}] * 4)
    lora = tmp_path / "lora-sft"
    rc, _, err = cli(capsys, "sft", "--base", pretrained_run, "--data", data, "-o", lora, "--lora",
                     "train.max_steps=1", "sft.val_fraction=0", *QUIET)
    assert rc == 0, err[-3000:]
    for stage in ("dpo", "reward", "grpo"):
        rc, _, err = cli(capsys, stage, "--base", lora, "--data", pairs_file, "-o", tmp_path / stage,
                         "train.max_steps=1")
        one_line_error(rc, err, "is a LoRA run; merge it first", "babyllama merge-lora")


def test_missing_base_is_one_line_from_the_command(tmp_path, pairs_file):
    """The real command (a subprocess): exit code 2, one line, no traceback."""
    r = subprocess.run(babyllama_cmd() + ["dpo", "--data", str(pairs_file), "-o", str(tmp_path / "x")],
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr == "error: pass --base RUN (the chat run to start dpo from)\n"
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Bugs found while writing these tests, fixed: each stays as a test of its behaviour.


def test_a_new_dpo_run_never_reuses_reference_logps_of_another_base(chat_run, loose_chat, pairs_file, tmp_path,
                                                                    capsys, monkeypatch):
    from babyllama.run import Run
    from babyllama.train import dpo

    out = tmp_path / "dpo"
    args = ["--data", pairs_file, "-o", out, "train.max_steps=1", "train.batch_size=4", *QUIET]

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C after the reference, before the first checkpoint

    with monkeypatch.context() as m:
        m.setattr(dpo, "train", interrupted)
        assert cli(capsys, "dpo", "--base", chat_run, *args)[0] == 130
    assert (out / "reference_logps.safetensors").exists() and not (out / "resume").exists()
    rc, _, err = cli(capsys, "dpo", "--base", loose_chat, *args)  # a new run here, from another base
    assert rc == 0, err[-3000:]
    stored = load_file(str(out / "reference_logps.safetensors"))["train"]
    expected = pair_logps(base_model(loose_chat), pair_examples(out), Run(out).load_tokenizer().pad_id)
    torch.testing.assert_close(stored, expected, atol=1e-4, rtol=1e-5)


def test_grpo_resume_finds_a_relative_reward_file_from_another_directory(
        loose_chat, prompts_file, rewards_module, tmp_path, capsys, monkeypatch):
    out = tmp_path / "grpo"
    monkeypatch.chdir(rewards_module.parent)
    rc, _, err = cli(capsys, "grpo", "--base", loose_chat, "--data", prompts_file, "-o", out,
                     "grpo.reward=my_rewards.py:weather", "grpo.num_generations=2", "train.batch_size=4",
                     "train.max_steps=1", *GRPO_FAST)
    assert rc == 0, err[-3000:]
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "grpo", "-o", out, "--resume", "train.max_steps=2")
    assert rc == 0, err[-3000:]


def test_a_reward_model_as_base_is_refused_by_name(chat_run, pairs_file, tmp_path, capsys):
    rm = tmp_path / "rm"
    rc, _, err = cli(capsys, "reward", "--base", chat_run, "--data", pairs_file, "-o", rm, "train.max_steps=1",
                     "train.batch_size=4", *QUIET)
    assert rc == 0, err[-3000:]
    rc, _, err = cli(capsys, "dpo", "--base", rm, "--data", pairs_file, "-o", tmp_path / "dpo", "train.max_steps=1")
    one_line_error(rc, err, "is a reward model")


def test_an_error_during_training_starts_its_own_line(loose_chat, prompts_file, rewards_module, tmp_path, capsys):
    rc, _, err = cli(capsys, "grpo", "--base", loose_chat, "--data", prompts_file, "-o", tmp_path / "g",
                     f"grpo.reward={rewards_module}:broken", "grpo.num_generations=2", "train.batch_size=4",
                     "train.max_steps=1", *GRPO_FAST)
    one_line_error(rc, err, "no reward today")
    assert any(line.startswith("error: ") for line in err.split("\n")), repr(err)


def test_grpo_prompts_need_no_answer_for_a_reward_that_checks_none(loose_chat, rewards_module, tmp_path, capsys):
    # RLHF prompts are plain questions: only the math reward needs a numeric answer.
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": q} for q in QUESTIONS])
    rc, _, err = cli(capsys, "grpo", "--base", loose_chat, "--data", plain, "-o", tmp_path / "g",
                     f"grpo.reward={rewards_module}:weather", "grpo.num_generations=2", "train.batch_size=4",
                     "train.max_steps=1", *GRPO_FAST)
    assert rc == 0, err[-2000:]
    rc, _, err = cli(capsys, "grpo", "--base", loose_chat, "--data", plain, "-o", tmp_path / "m",
                     "train.max_steps=1", *GRPO_FAST)
    one_line_error(rc, err, "plain.jsonl:1", "no answer field")


def test_grpo_prompts_follow_the_system_prompt(loose_chat, prompts_file, tmp_path):
    from babyllama.data.problems import iter_problems
    from babyllama.run import Run
    from babyllama.train.grpo import encode_prompts

    tokenizer = Run(loose_chat).load_tokenizer()
    problems = list(iter_problems(prompts_file))[:2]
    _, plain, _ = encode_prompts(problems, tokenizer, 128, 8)
    _, led, _ = encode_prompts(problems, tokenizer, 128, 8, system="你是一个助手。")
    assert all(len(b) > len(a) for a, b in zip(plain, led))
    assert "你是一个助手。" in tokenizer.decode(led[0])


@pytest.mark.parametrize("stage, args, needles", [
    ("dpo", ["dpo.beta=nan"], ["dpo.beta must be a finite number"]),
    ("reward", ["train.lr=inf"], ["train.lr must be a finite number"]),
    ("grpo", ["dpo.beta=0.5"], ["dpo.* settings are for `babyllama dpo`, not grpo"]),
    ("grpo", ["grpo.max_prompts=-1"], ["grpo.max_prompts must not be negative"]),
])
def test_settings_that_cannot_work_are_refused_before_training(chat_run, pairs_file, tmp_path, capsys,
                                                               stage, args, needles):
    rc, _, err = cli(capsys, stage, "--base", chat_run, "--data", pairs_file, "-o", tmp_path / "x", *QUIET, *args)
    one_line_error(rc, err, *needles)


def test_resume_without_state_and_an_output_file_are_refused_at_once(chat_run, pairs_file, tmp_path, capsys,
                                                                    monkeypatch):
    from babyllama.errors import UserError
    from babyllama.train import dpo

    def interrupted(*args, **kwargs):  # a run stopped while computing its reference log-probs
        raise UserError("interrupted")

    monkeypatch.setattr(dpo, "compute_reference", interrupted)
    rc, _, err = cli(capsys, "dpo", "--base", chat_run, "--data", pairs_file, "-o", tmp_path / "run", *QUIET)
    one_line_error(rc, err, "interrupted")
    monkeypatch.setattr(dpo, "compute_reference", lambda *a, **k: pytest.fail("work before the check"))
    rc, _, err = cli(capsys, "dpo", "-o", tmp_path / "run", "--resume")
    one_line_error(rc, err, "nothing to resume")
    (tmp_path / "file.jsonl").write_text("", encoding="utf-8")
    rc, _, err = cli(capsys, "dpo", "--base", chat_run, "--data", pairs_file, "-o", tmp_path / "file.jsonl", *QUIET)
    one_line_error(rc, err, "file.jsonl: exists and is not a directory")


def test_two_ddp_processes_train_dpo_like_one_process(chat_run, pairs_file, tmp_path):
    """DPO under torchrun: two ranks of 2 pairs each take the same pairs as one process of 4,
    so the step's loss, its gradient norm, the weights and the held-out numbers (reduced over
    ranks) are the same."""
    import sys

    common = ["--base", str(chat_run), "--data", str(pairs_file), "train.max_steps=2", "train.schedule=constant",
              "train.warmup_steps=0", "train.grad_clip=0", "train.device=cpu", "train.precision=fp32",
              "train.eval_every=2", "train.sample_every=0", "train.sample_prompts=[]", "train.log_every=1"]
    one = subprocess.run(babyllama_cmd() + ["dpo", *common, "-o", str(tmp_path / "one"), "train.batch_size=4"],
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "babyllama.cli", "dpo", *common, "-o", str(tmp_path / "two"), "train.batch_size=2"],
        env=cli_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    steps_a, steps_b = [r for r in a if "loss" in r], [r for r in b if "loss" in r]
    assert [r["tokens"] for r in steps_a] == [r["tokens"] for r in steps_b] == [4, 8]  # pairs
    for x, y in zip(steps_a, steps_b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)
        assert y["rewards/accuracies"] == pytest.approx(x["rewards/accuracies"])
    val_a, val_b = [r for r in a if "val_loss" in r][-1], [r for r in b if "val_loss" in r][-1]
    assert val_b["val_loss"] == pytest.approx(val_a["val_loss"], rel=1e-4)
    wa = load_file(str(tmp_path / "one" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)


def test_a_flag_and_an_override_that_disagree_are_refused(chat_run, pairs_file, tmp_path, capsys):
    rc, _, err = cli(capsys, "dpo", "--base", chat_run, "--data", pairs_file, "-o", tmp_path / "x",
                     "--loss", "ipo", "dpo.loss=simpo", *QUIET)
    one_line_error(rc, err, "--loss ipo and dpo.loss=simpo disagree")
