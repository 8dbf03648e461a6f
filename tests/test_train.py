"""The trainer loop: loss falls, exact resume after SIGKILL, DDP equals one process,
schedules, and the non-finite guard."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from babyllama.config import TrainConfig, load_config
from babyllama.train.schedule import lr_at

from conftest import TINY_MODEL, TINY_TRAIN, babyllama_cmd, cli_env, interrupt_pretraining_at


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(babyllama_cmd() + args, env=cli_env(), capture_output=True, text=True,
                          timeout=300, **kw)


def test_loss_falls_on_a_tiny_corpus(tiny_data, tmp_path):
    from babyllama.train.pretrain import run_pretrain

    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=60", "train.eval_every=30",
                                                             "train.save_every=60"])
    cfg.data, cfg.out_dir = str(tiny_data), str(tmp_path / "run")
    run_pretrain(cfg)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < losses[0] - 2.0, losses
    assert len(vals) == 2 and vals[-1] < vals[0]
    run = tmp_path / "run"
    for name in ("config.yaml", "model.safetensors", "loss.png", "tokenizer/tokenizer_config.json",
                 "resume/trainer.json", "resume/optimizer.pt"):
        assert (run / name).exists(), name


def test_evaluation_accumulates_in_a_dtype_every_device_has(tiny_data, tiny_tokenizer, monkeypatch):
    """Apple's MPS has no float64: there the sums are float32, which moves the metrics by
    float32 rounding only (checked here on the CPU by forcing float32)."""
    from babyllama.data.shards import TokenShards
    from babyllama.eval.scoring import wide_float
    from babyllama.model.llama import Llama, ModelConfig
    from babyllama.train import trainer
    from babyllama.train.batches import validation_windows
    from babyllama.train.distributed import DistInfo

    assert wide_float(torch.device("mps")) == torch.float32
    assert wide_float(torch.device("cpu")) == wide_float(torch.device("cuda")) == torch.float64
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))
    windows = validation_windows(TokenShards(tiny_data, "val"), 32, 8)
    eval_set = trainer.EvalSet.from_windows(windows, 4, tiny_tokenizer)
    wide = trainer.evaluate(model, eval_set, torch.device("cpu"), "fp32", DistInfo())
    monkeypatch.setattr(trainer, "wide_float", lambda device: torch.float32)
    narrow = trainer.evaluate(model, eval_set, torch.device("cpu"), "fp32", DistInfo())
    assert narrow.keys() == wide.keys()
    for k in wide:
        assert narrow[k] == pytest.approx(wide[k], rel=1e-6), k


def test_a_device_that_is_not_there_is_a_user_error():
    from babyllama.errors import UserError
    from babyllama.device import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="'tpu' is not a device name"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="'cuda': CUDA is not available"):
            pick_device("cuda")
    else:
        with pytest.raises(UserError, match="'cuda:99': there are"):
            pick_device("cuda:99")


def pretrain_args(data: Path, out: Path, steps: int, extra=()) -> list[str]:
    return (["pretrain", "--preset", "demo-cpu", "--data", str(data), "-o", str(out)]
            + TINY_MODEL + TINY_TRAIN + [f"train.max_steps={steps}", "train.save_every=5",
                                         "train.log_every=5", "model.dropout=0.1"] + list(extra))


def test_resume_after_sigkill_gives_the_uninterrupted_weights(tiny_data, tmp_path):
    steps = 400
    straight = run_cli(pretrain_args(tiny_data, tmp_path / "straight", steps))
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(babyllama_cmd() + pretrain_args(tiny_data, out, steps), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "resume" / "trainer.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if json.loads(marker.read_text())["step"] >= 100:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads((out / "resume" / "trainer.json").read_text())["step"] \
        if (out / "resume" / "trainer.json").exists() else None
    assert killed_at is not None and killed_at < steps

    resumed = run_cli(pretrain_args(tiny_data, out, steps)[:7]
                      + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The log of the resumed run reads as one run: every step once.
    steps_logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(l)]
    assert steps_logged == sorted(set(steps_logged))


def test_starting_over_an_existing_run_needs_resume(tiny_data, tmp_path):
    first = run_cli(pretrain_args(tiny_data, tmp_path / "r", 5))
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(pretrain_args(tiny_data, tmp_path / "r", 5))
    assert again.returncode == 2
    assert "--resume" in again.stderr and "Traceback" not in again.stderr


def test_two_ddp_processes_match_one_process_at_the_same_global_batch(tiny_data, tmp_path):
    # grad_accum=2 exercises DDP's no_sync on the first micro-step.
    common = TINY_MODEL + [o for o in TINY_TRAIN if not o.startswith("train.batch_size")] + \
        ["train.max_steps=6", "train.save_every=6", "train.device=cpu", "train.grad_accum=2"]
    one = run_cli(["pretrain", "--preset", "demo-cpu", "--data", str(tiny_data), "-o", str(tmp_path / "one"),
                   "train.batch_size=4"] + common)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "babyllama.cli", "pretrain", "--preset", "demo-cpu", "--data", str(tiny_data),
         "-o", str(tmp_path / "two"), "train.batch_size=2"] + common,
        env=cli_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    changed = load_file(str(tmp_path / "one" / "resume" / "model.safetensors"))
    assert changed.keys() == a.keys()


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedules_warm_up_then_end_at_their_floor(schedule):
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=100, schedule=schedule)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(1e-3)
    else:
        assert lrs[-1] == pytest.approx(1e-4, rel=0.05)
    if schedule == "wsd":
        assert lrs[79] == pytest.approx(1e-3)  # stable until the last 20% of the steps


def test_non_finite_steps_are_skipped_and_logged(tiny_data, tmp_path):
    """A batch that makes the loss NaN must not touch the weights or the optimizer."""
    from babyllama.data.shards import TokenShards
    from babyllama.model.llama import Llama
    from babyllama.tokenizer import Tokenizer
    from babyllama.train.batches import PretrainBatches
    from babyllama.train.trainer import train

    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=3", "train.save_every=0"])
    cfg.model.vocab_size = TokenShards(tiny_data).vocab_size
    tok = Tokenizer.load(tiny_data / "tokenizer")
    torch.manual_seed(0)
    model = Llama(cfg.model)

    class PoisonedStep(PretrainBatches):
        def get(self, step, micro, device):
            x, y, extra = super().get(step, micro, device)
            if step == 1:
                model.model.norm.weight.data[0] = float("nan")
            elif step == 2:
                model.model.norm.weight.data[0] = before_norm
            return x, y, extra

    data = PoisonedStep(TokenShards(tiny_data), 32, 4, 1, seed=0)
    snapshot = {}
    original_step = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        snapshot["calls"] = snapshot.get("calls", 0) + 1
        return original_step(self, *a, **k)

    torch.optim.AdamW.step = counting_step
    try:
        before_norm = float(model.model.norm.weight.data[0])
        train(cfg, model, tok, data, None, tmp_path, torch.device("cpu"))
    finally:
        torch.optim.AdamW.step = original_step
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "skipped" in r] == [2]
    assert snapshot["calls"] == 2  # steps 1 and 3 updated, step 2 was skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed", "bf16-true"])
def test_every_precision_trains_with_finite_loss(tiny_data, tmp_path, precision):
    from babyllama.train.pretrain import run_pretrain

    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=4", "train.save_every=4",
                                                             f"train.precision={precision}"])
    cfg.data, cfg.out_dir = str(tiny_data), str(tmp_path / "run")
    run_pretrain(cfg)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(map(lambda v: v == v and v < 20, losses))
    assert not any("skipped" in r for r in records)
    if precision == "fp16-mixed":
        opt = torch.load(tmp_path / "run" / "resume" / "optimizer.pt", weights_only=True)
        assert opt["scaler"]["scale"] > 0  # the loss scaler's state is part of the resume state


def test_adamw8bit_trains_and_resumes(tiny_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    from babyllama.train.pretrain import run_pretrain

    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=3", "train.save_every=3",
                                                             "train.optimizer=adamw8bit"])
    cfg.data, cfg.out_dir = str(tiny_data), str(tmp_path / "run")
    run_pretrain(cfg)
    cfg.train.max_steps = 6
    run_pretrain(cfg, resume=True)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


CHATGLM2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "chatglm2" / "tokenizer.model"


@pytest.mark.skipif(not CHATGLM2.exists(), reason="../shared/data is absent")
def test_pretrain_with_a_reused_sentencepiece_tokenizer(corpus_file, tmp_path):
    """A SentencePiece tokenizer reused from another model (ChatGLM2's, which has no pad
    piece): prepare + pretrain + generate with it."""
    from babyllama.data.shards import TokenShards, prepare
    from babyllama.llm import load
    from babyllama.tokenizer import Tokenizer
    from babyllama.train.pretrain import run_pretrain

    tok = Tokenizer.load(CHATGLM2)
    assert tok.pad_id >= 64789  # ChatGLM2 has no pad piece: ours is appended after its last id
    prepare([str(corpus_file)], tok, tmp_path / "data", val_fraction=0.1, workers=1, progress=False)
    assert TokenShards(tmp_path / "data").vocab_size == tok.vocab_size
    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=3"])
    cfg.data, cfg.out_dir = str(tmp_path / "data"), str(tmp_path / "run")
    run_pretrain(cfg)
    llm = load(tmp_path / "run", device="cpu")
    assert llm.model.config.vocab_size == tok.vocab_size
    assert isinstance(llm.generate("今天", max_new_tokens=5, temperature=0), str)


def test_resume_works_from_another_working_directory(tiny_data, tmp_path):
    (tmp_path / "a").mkdir()
    args = ["pretrain", "--preset", "demo-cpu", "--data", str(tiny_data), "-o", "run"] + TINY_MODEL + TINY_TRAIN
    first = run_cli(args + ["train.max_steps=3", "train.save_every=3"], cwd=tmp_path / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(["pretrain", "-o", str(tmp_path / "a" / "run"), "--resume", "train.max_steps=5"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    records = [json.loads(l) for l in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]


def test_log_every_zero_is_refused_before_training():
    """The loop logs every `log_every` steps: 0 would divide by zero mid-run, so it is a
    config error that names the key."""
    from babyllama.errors import UserError

    with pytest.raises(UserError, match="train.log_every must be positive"):
        load_config("demo-cpu", ["train.log_every=0"])


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    from babyllama.model.llama import Llama
    from babyllama.train.trainer import MuonAdamW, build_optimizer

    cfg = load_config("demo-cpu", TINY_MODEL + ["train.optimizer=muon", "model.tie_word_embeddings=false"])
    model = Llama(cfg.model)
    opt = build_optimizer(model, cfg.train)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon and all(".layers." in n and n.endswith("proj.weight") for n in muon)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= adamw and not muon & adamw
    assert muon | adamw == set(names.values())


def test_muon_leaves_lora_adapters_to_adamw():
    pytest.importorskip("peft")
    from babyllama.config import LoraConfig
    from babyllama.lora import apply_lora
    from babyllama.model.llama import Llama
    from babyllama.train.trainer import build_optimizer

    cfg = load_config("demo-cpu", TINY_MODEL + ["train.optimizer=muon"])
    model = apply_lora(Llama(cfg.model), LoraConfig(r=4, alpha=8))
    opt = build_optimizer(model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert not any(g["params"] for g in opt.muon.param_groups)
    assert adamw and all("lora_" in n for n in adamw)


def test_muon_trains_and_resumes_to_the_uninterrupted_weights(tiny_data, tmp_path, monkeypatch):
    from babyllama.train.pretrain import run_pretrain

    def run(out, resume=False):
        cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=8", "train.save_every=4",
                                                                 "train.optimizer=muon"])
        cfg.data, cfg.out_dir = str(tiny_data), str(out)
        run_pretrain(cfg, resume=resume)

    run(tmp_path / "straight")
    restore = interrupt_pretraining_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "halves")
    restore()
    run(tmp_path / "halves", resume=True)
    records = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "halves" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_an_evaluation_task_on_missing_data_is_refused_before_the_first_step(tiny_data, tmp_path):
    out = tmp_path / "r"
    r = run_cli(pretrain_args(tiny_data, out, 5, ["train.eval_tasks=[{task: lm, data: nothere.txt}]"]))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train.eval_tasks[0]: lm: nothere.txt: no such file or folder" in r.stderr
    assert not (out / "resume").exists()  # refused before training, not at its first evaluation
