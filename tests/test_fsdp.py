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
    # grad_accum=2 exercises the gradient-sync switch on the first micro-step; eval_every
    # the padded evaluation rounds (3 eval batches over 2 ranks); sample_every the samples
    # written from gathered weights.
    return (["pretrain", "--preset", "demo-cpu", "--data", str(data), "-o", str(out)]
            + [o for o in TINY_MODEL + TINY_TRAIN
               if not o.startswith(("train.batch_size", "train.eval_batches", "train.sample"))]
            + [f"train.batch_size={batch_size}", f"train.max_steps={STEPS}", "train.grad_accum=2",
               "train.save_every=4", "train.eval_every=6", "train.eval_batches=3", "train.device=cpu",
               "train.sample_every=6", "train.sample_prompts=[中国]", "train.sample_max_new_tokens=4",
               "train.precision=fp32", "model.dropout=0"] + list(extra))


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)


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


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory):
    """Two DDP processes at batch 2: the same evaluation windows as the FSDP run (the eval set
    is train.eval_batches batches of train.batch_size windows)."""
    out = tmp_path_factory.mktemp("ddp") / "two"
    r = run(torchrun(2) + pretrain(tiny_data, out, 2))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_fsdp_processes_train_like_one_process_at_the_same_global_batch(fsdp_runs, ddp_run):
    one, two = fsdp_runs
    assert_same_weights(one, two)
    a, b = records(one), records(two)
    losses = [(r["step"], r["loss"]) for r in a if "loss" in r]
    assert [(s, pytest.approx(v, rel=1e-5)) for s, v in losses] == [(r["step"], r["loss"]) for r in b if "loss" in r]
    # Samples come from the gathered weights, on the main process only.
    assert (two / "samples.txt").read_text().count("## step") == 2
    # Evaluation: every window scored once, however the ranks split them (3 batches over 2
    # ranks: the sharded forward's padded round must not count twice).
    val_fsdp, val_ddp = ([r["val_loss"] for r in records(d) if "val_loss" in r] for d in (two, ddp_run))
    assert len(val_fsdp) == len(val_ddp) == 2
    assert val_fsdp == pytest.approx(val_ddp, rel=1e-5)


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
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = out / "resume" / "trainer.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(marker.read_text())["step"] >= 4:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both of its workers
    proc.wait()
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
