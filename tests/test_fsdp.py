"""train.strategy=fsdp (FSDP2 + distributed checkpoints) on CPU with gloo: two sharded processes
train like one process at the same global batch, SIGKILL + resume is exact, the sharded
checkpoint consolidates to the run's weights, and what FSDP cannot run is refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from babyllama.config import load_config
from babyllama.model.llama import Llama

from conftest import TINY_MODEL, TINY_TRAIN, babyllama_cmd, cli_env

STEPS = 12


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "babyllama.cli"]


def pretrain(data: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    # grad_accum=2 exercises the gradient-sync switch on the first micro-step; eval_every the
    # split evaluation (eval_batches counts global batches: 3 x 4 windows whatever the split);
    # sample_every the samples written from gathered weights.
    return (["pretrain", "--preset", "demo-cpu", "--data", str(data), "-o", str(out)]
            + [o for o in TINY_MODEL + TINY_TRAIN
               if not o.startswith(("train.batch_size", "train.eval_batches", "train.sample"))]
            + [f"train.batch_size={batch_size}", f"train.max_steps={STEPS}", "train.grad_accum=2",
               "train.save_every=4", "train.eval_every=6", "train.eval_batches=3", "train.device=cpu",
               "train.sample_every=6", "train.sample_prompts=[中国]", "train.sample_max_new_tokens=4",
               "train.precision=fp32", "model.dropout=0"] + list(extra))


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc). torchrun starts each worker in a session of its
    own, so killing torchrun's process group leaves the workers training."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and all of its workers at once, as a crash or an OOM killer would."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a_dir: Path, b_dir: Path, exact: bool = False) -> None:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def fsdp_runs(tiny_data, tmp_path_factory):
    """One process (batch 4) and two FSDP processes (batch 2 each): the same global batch."""
    root = tmp_path_factory.mktemp("fsdp")
    one = run(babyllama_cmd() + pretrain(tiny_data, root / "one", 4))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(torchrun(2) + pretrain(tiny_data, root / "two", 2, "train.strategy=fsdp"))
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "one", root / "two"


def test_two_fsdp_processes_train_like_one_process_at_the_same_global_batch(fsdp_runs):
    one, two = fsdp_runs
    assert_same_weights(one, two)
    a, b = records(one), records(two)
    losses = [(r["step"], r["loss"]) for r in a if "loss" in r]
    assert [(s, pytest.approx(v, rel=1e-5)) for s, v in losses] == [(r["step"], r["loss"]) for r in b if "loss" in r]
    # Samples come from the gathered weights, on the main process only.
    assert (two / "samples.txt").read_text().count("## step") == 2
    # Evaluation: the same windows (train.eval_batches global batches), each scored once
    # however the ranks split them (3 batches over 2 ranks: the sharded forward's padded round
    # must not count twice).
    val_one, val_two = ([r["val_loss"] for r in records(d) if "val_loss" in r] for d in (one, two))
    assert len(val_one) == len(val_two) == 2
    assert val_two == pytest.approx(val_one, rel=1e-5)


def test_a_sharded_evaluation_with_a_short_last_round_counts_each_example_once(fsdp_runs, tmp_path):
    """SFT's held-out set is batches of train.batch_size conversations: 3 batches over 2 ranks
    leave rank 1 without one in the last round, where it must still join the sharded forward
    (or rank 0 waits for ever) and count nothing."""
    one, _ = fsdp_runs
    questions = ["你好", "你是谁", "今天天气怎么样", "讲个笑话", "你喜欢什么", "再见", "早上好", "晚安", "谢谢", "请问"]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": q + "，你好。"}]},
                                       ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    common = ["sft", "--base", str(one), "--data", str(data), "train.max_steps=2", "train.batch_size=1",
              "sft.val_fraction=0.3", "train.device=cpu", "train.precision=fp32", "train.sample_prompts=[]",
              "model.dropout=0"]
    single = run(babyllama_cmd() + common + ["-o", str(tmp_path / "one"), "train.grad_accum=2"])
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = run(torchrun(2) + common + ["-o", str(tmp_path / "two"), "train.strategy=fsdp", "train.grad_accum=1"])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "val: 3 examples" in single.stdout
    val_one, val_two = ([r["val_loss"] for r in records(tmp_path / d) if "val_loss" in r] for d in ("one", "two"))
    assert len(val_one) >= 1 and val_two == pytest.approx(val_one, rel=1e-5)


def test_fsdp_checkpoint_is_sharded_and_consolidates_to_the_run_weights(fsdp_runs):
    from babyllama.train.fsdp import consolidate

    _, two = fsdp_runs
    dcp_dir = two / "resume" / "dcp"
    assert (dcp_dir / ".metadata").exists()
    assert {p.name for p in (two / "resume").glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    cfg = load_config(str(two / "config.yaml"))
    model = consolidate(dcp_dir, Llama(cfg.model))
    saved = load_file(str(two / "model.safetensors"))
    for k, v in model.state_dict().items():
        if k in saved:
            assert torch.equal(v, saved[k]), k


def test_fsdp_resume_after_sigkill_gives_the_uninterrupted_weights(fsdp_runs, tiny_data, tmp_path):
    _, straight = fsdp_runs
    out = tmp_path / "killed"
    cmd = torchrun(2) + pretrain(tiny_data, out, 2, "train.strategy=fsdp")
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "resume" / "trainer.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(marker.read_text())["step"] >= 4:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    workers = descendants(proc.pid)
    assert len(workers) >= 2, "torchrun's workers were not found"
    kill_job(proc)
    deadline = time.time() + 10
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "a worker outlived the kill"
    killed_at = json.loads(marker.read_text())["step"] if marker.exists() else None
    assert killed_at is not None and killed_at < STEPS, "the run finished before it could be killed"

    resumed = run(torchrun(2) + ["pretrain", "--resume", "-o", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(straight, out, exact=True)
    steps_logged = [r["step"] for r in records(out) if "loss" in r]
    assert steps_logged == sorted(set(steps_logged))


def test_a_run_resumes_with_the_strategy_it_was_trained_with(fsdp_runs, tmp_path):
    import shutil

    one, _ = fsdp_runs
    copy = tmp_path / "one"
    shutil.copytree(one, copy)
    resumed = run(torchrun(1) + ["pretrain", "--resume", "-o", str(copy), "train.strategy=fsdp",
                                 f"train.max_steps={STEPS + 2}"])
    assert resumed.returncode != 0
    assert "train.strategy cannot change when resuming" in resumed.stderr


@pytest.mark.parametrize("extra, message", [
    (["train.optimizer=muon"], "train.optimizer=muon needs whole tensors"),
    (["train.precision=fp16-mixed"], "fp16-mixed needs a loss scaler"),
])
def test_what_fsdp_cannot_run_is_refused_in_one_line(tiny_data, tmp_path, extra, message):
    r = run(babyllama_cmd() + pretrain(tiny_data, tmp_path / "r", 2, "train.strategy=fsdp", *extra))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_fsdp_in_a_single_process_says_to_use_torchrun(tiny_data, tmp_path):
    r = run(babyllama_cmd() + pretrain(tiny_data, tmp_path / "r", 2, "train.strategy=fsdp"))
    assert r.returncode == 2
    assert "nothing to shard" in r.stderr and "torchrun" in r.stderr and "Traceback" not in r.stderr


def test_resuming_on_another_number_of_processes_says_the_global_batch_changed(capsys):
    from babyllama.config import TrainConfig
    from babyllama.train.distributed import DistInfo
    from babyllama.train.trainer import note_world_size_change

    t = TrainConfig(batch_size=2, grad_accum=3)
    note_world_size_change(2, DistInfo(0, 2, 0, True), t)
    assert capsys.readouterr().err == ""
    note_world_size_change(2, DistInfo(0, 1, 0, True), t)
    assert "a step now takes 6 sequences instead of 12" in capsys.readouterr().err


def test_a_bf16_true_fsdp_run_saves_bf16_weights_as_one_process_does(tiny_data, tmp_path):
    r = run(torchrun(2) + pretrain(tiny_data, tmp_path / "r", 2, "train.strategy=fsdp", "train.precision=bf16-true",
                                   "train.max_steps=1", "train.eval_every=0", "train.sample_prompts=[]"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert {v.dtype for v in load_file(str(tmp_path / "r" / "model.safetensors")).values()} == {torch.bfloat16}
