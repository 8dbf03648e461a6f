"""Shared fixtures: a tiny tokenizer and prepared corpus, built once per session.

Everything is small enough for 2 CPU cores. Tests that read ../shared/data skip when it is
absent (a user's checkout will not have it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "今天天气很好，我们去公园散步。",
    "中国的经济发展很快，人民生活水平不断提高。",
    "这个手机的屏幕很大，电池也很耐用。",
    "机器学习和自然语言处理很有意思。",
    "人民日报发表新年献词，迈向充满希望的新世纪。",
    "房间很干净，服务也很周到，下次还会再来。",
    "The quick brown fox jumps over the lazy dog 123.",
]


def corpus_lines(n: int = 400) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]}第{i}号。{SENTENCES[(i * 3 + 1) % len(SENTENCES)]}"
            for i in range(n)]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_file, tmp_path_factory):
    from babyllama.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus_lines(), 400, show_progress=False)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok.save(out)
    return tok


@pytest.fixture(scope="session")
def tiny_data(corpus_file, tiny_tokenizer, tmp_path_factory) -> Path:
    from babyllama.data.shards import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare([str(corpus_file)], tiny_tokenizer, out, val_fraction=0.1, workers=1, progress=False)
    return out


def hf_twin(model):
    """transformers' LlamaForCausalLM with `model`'s config and weights (the reference the
    parity tests compare with). Imports transformers only when called."""
    import transformers

    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.kv_heads, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        attention_dropout=0.0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    state = {k: v for k, v in model.state_dict().items()
             if not (c.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}
    return hf


TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
              "model.num_attention_heads=4", "model.num_key_value_heads=2",
              "model.max_position_embeddings=64"]
# AdamW, not the demo preset's Muon: the learning rates and step counts of the tests' tiny runs
# were chosen with it; Muon has tests of its own (test_train.py).
TINY_TRAIN = ["train.optimizer=adamw", "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=2",
              "train.lr=3e-3",
              "train.eval_every=0", "train.sample_every=0", "train.eval_batches=2", "train.log_every=1",
              "train.sample_prompts=[]"]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def babyllama_cmd() -> list[str]:
    return [sys.executable, "-m", "babyllama.cli"]


GREETING = "你好，我是小助手。"


@pytest.fixture(scope="session")
def pretrained_run(tiny_data, tmp_path_factory) -> Path:
    """A tiny pretrained run (30 steps: its greedy text varies with the prompt)."""
    from babyllama.config import load_config
    from babyllama.train.pretrain import run_pretrain

    out = tmp_path_factory.mktemp("pretrained") / "base"
    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=30", "train.save_every=0"])
    cfg.data, cfg.out_dir = str(tiny_data), str(out)
    run_pretrain(cfg)
    return out


def greeting_sft(base: Path, out: Path) -> Path:
    """An SFT run of `base` in `out`/sft (100 steps) that answers every greeting with GREETING
    (greedy): real Chinese text, ended by the chat template's end-of-turn token."""
    import json

    from babyllama.config import parse_overrides
    from babyllama.train.sft import run_sft, sft_config

    questions = ["你好", "你好啊", "您好", "嗨，你好", "你是谁", "请介绍一下你自己"]
    data = out / "greet.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": questions[i % 6]},
                                                     {"role": "assistant", "content": GREETING}]},
                                       ensure_ascii=False) + "\n" for i in range(40)), encoding="utf-8")
    values = parse_overrides(["train.lr=1e-2", "train.batch_size=8", "train.log_every=1", "train.max_steps=100",
                              "train.sample_prompts=[]", "sft.val_fraction=0.1"])
    values["sft"]["sources"] = [str(data)]
    values["out_dir"] = str(out / "sft")
    return run_sft(sft_config(base, values))


@pytest.fixture(scope="session")
def chat_run(pretrained_run, tmp_path_factory) -> Path:
    """greeting_sft of the pretrained run (a 64-token context)."""
    return greeting_sft(pretrained_run, tmp_path_factory.mktemp("chat"))


# A small encoder: 32x32 pictures in 8x8 patches, 16 positions per image.
TINY_VISION = ["vlm.vision.hidden_size=32", "vlm.vision.intermediate_size=64", "vlm.vision.num_hidden_layers=2",
               "vlm.vision.num_attention_heads=2", "vlm.vision.image_size=32", "vlm.vision.patch_size=8"]


def vision_stage(stage: str, base: Path, out: Path, *overrides: str) -> Path:
    """A short `stage` (align or instruct) run of `base` on builtin:shapes-zh in `out`."""
    from babyllama.config import parse_overrides
    from babyllama.train.sft import sft_config
    from babyllama.train.vision import run_vision_stage

    values = parse_overrides(["train.batch_size=8", "train.max_steps=6", "train.log_every=1",
                              "sft.val_fraction=0.01", *(TINY_VISION if stage == "align" else []), *overrides])
    values.setdefault("sft", {})["sources"] = ["builtin:shapes-zh"]
    values["out_dir"] = str(out)
    return run_vision_stage(sft_config(base, values, stage=stage))


@pytest.fixture(scope="session")
def vision_base(tiny_data, tmp_path_factory) -> Path:
    """A tiny pretrained run with room for a picture and a caption (a 256-token context)."""
    from babyllama.config import load_config
    from babyllama.train.pretrain import run_pretrain

    out = tmp_path_factory.mktemp("vision-base") / "base"
    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["model.max_position_embeddings=256",
                                                             "train.max_steps=10", "train.save_every=0"])
    cfg.data, cfg.out_dir = str(tiny_data), str(out)
    run_pretrain(cfg)
    return out


@pytest.fixture(scope="session")
def vision_run(vision_base, tmp_path_factory) -> Path:
    """An image-text run: align (6 steps) then instruct (6 steps) of a pretrained run, on
    builtin:shapes-zh with a tiny encoder. Its answers are not good: it is for plumbing."""
    root = tmp_path_factory.mktemp("vision")
    align = vision_stage("align", vision_base, root / "align")
    return vision_stage("instruct", align, root / "instruct")


class Served:
    """A `babyllama serve` app running in this process (uvicorn in a thread) on a free port;
    `wrap` puts ASGI middleware of a test's own in front of the app."""

    def __init__(self, run, api_key=None, wrap=None, app_options=None, **engine_options):
        import threading

        import uvicorn

        from babyllama.cli.serve import open_socket
        from babyllama.serve.app import create_app
        from babyllama.serve.worker import EngineThread

        self.engine = EngineThread(run, device="cpu", **engine_options)
        self.app = create_app(self.engine, api_key=api_key, **(app_options or {}))
        if wrap is not None:
            self.app = wrap(self.app)
        self.sock = open_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Served":
        import time
        import urllib.error
        import urllib.request

        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError):
                pass
            if self.engine.error:
                raise RuntimeError(self.engine.error)
            time.sleep(0.05)
        raise TimeoutError("the server did not become healthy")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def interrupt_pretraining_at(monkeypatch, step: int):
    """Make pretraining raise KeyboardInterrupt (Ctrl-C) when it fetches the batch of `step`;
    returns a function that undoes it, for the resumed run."""
    import babyllama.train.batches as batches

    fetch = batches.PretrainBatches.get

    def interrupted(self, at, micro, device):
        if at == step:
            raise KeyboardInterrupt
        return fetch(self, at, micro, device)

    monkeypatch.setattr(batches.PretrainBatches, "get", interrupted)
    return lambda: monkeypatch.setattr(batches.PretrainBatches, "get", fetch)
