"""Supervised fine-tuning: a pretrained run + conversations in, a chat run directory out.

The same trainer loop as pretraining (SFT is pretraining with the prompt masked out of the
loss); only the data differs: conversations rendered with a chat template, targets on
the assistant tokens, packed or padded batches, and optional replay of pretraining text.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import yaml

from babyllama.config import VLM_STAGES, RunConfig, check, copy_config, derive_schedule, resolve_config
from babyllama.data.conversations import iter_conversations
from babyllama.data.readers import BadRecords
from babyllama.data.sft import SFTBatches, build_examples, eval_batches, mix, split_validation
from babyllama.data.sft_augment import augment_constraints
from babyllama.data.shards import TokenShards
from babyllama.errors import UserError
from babyllama.infer.chat import chat_sample
from babyllama.lora import apply_lora, quantize_base, trainable_counts
from babyllama.model.llama import Llama
from babyllama.model.weights import load_weights
from babyllama.run import Run
from babyllama.tokenizer import Tokenizer
from babyllama.tokenizer.chat_template import resolve_template
from babyllama.tokenizer.tokenizer import SPECIAL_TOKENS
from babyllama.train.distributed import cleanup, init_distributed
from babyllama.train.trainer import EvalSet, train


def parse_source(spec: str) -> tuple[str, float]:
    """`PATH` or `PATH@WEIGHT` -> (path, weight)."""
    path, sep, weight = spec.rpartition("@")
    if not sep:
        return spec, 1.0
    try:
        w = float(weight)
    except ValueError:
        raise UserError(f"data source '{spec}': the weight after @ must be a number") from None
    if w <= 0:
        raise UserError(f"data source '{spec}': the weight must be positive")
    return path, w


def absolute_source(spec: str) -> str:
    path, weight = parse_source(spec)
    if path.startswith("builtin:"):
        return spec
    return str(Path(path).resolve()) + (f"@{weight:g}" if "@" in spec else "")


def sft_config(base: str | Path, overrides: list[str] | dict | None = None, stage: str = "sft") -> RunConfig:
    """The config of fine-tuning the run at `base` (`stage`: sft, dpo, reward or grpo): its
    config -> the stage's defaults -> `overrides` (see `config.resolve_config`); data sources
    are made absolute so `--resume` works from any working directory."""
    base = Path(base)
    cfg = resolve_config(stage, base=Run(base).config(), base_dir=str(base.resolve()),
                         overrides=overrides)
    cfg.sft.sources = [absolute_source(s) for s in cfg.sft.sources]
    return cfg


def read_conversations(cfg: RunConfig, bad: BadRecords) -> tuple[list, list, list[str]]:
    """(train conversations mixed by weight, validation conversations, one report line per source)."""
    s = cfg.sft
    if not s.sources:
        raise UserError("no SFT data: pass --data FILE (conversations; see `babyllama sft --help`)")
    trains, weights, vals, lines = [], [], [], []
    for k, spec in enumerate(s.sources):
        path, weight = parse_source(spec)
        convs = list(iter_conversations(path, s.format or None, skip_bad=s.skip_bad_records, bad=bad,
                                        seed=cfg.train.seed + k, system=s.system_prompt or None))
        if not convs:
            raise UserError(f"{path}: no usable conversations")
        train_part, val_part = split_validation(convs, s.val_fraction, cfg.train.seed + k)
        trains.append(train_part)
        weights.append(weight)
        vals += val_part
        lines.append(f"{path}: {len(convs):,} conversations ({len(train_part):,} train, "
                     f"{len(val_part):,} val), weight {weight:g}")
    train_convs = mix(trains, weights, cfg.train.seed)
    if s.shuffle_constraints > 0:
        train_convs = augment_constraints(train_convs, s.shuffle_constraints, cfg.train.seed)
    return train_convs, vals, lines


def steps_for(cfg: RunConfig, batches, n_tokens: int) -> int:
    """Optimizer steps for `sft.epochs` (or `sft.max_tokens` tokens) over the packed/padded data."""
    epochs = cfg.sft.epochs
    if cfg.sft.max_tokens > 0:
        epochs = cfg.sft.max_tokens / max(1, n_tokens)
    return batches.steps_for_epochs(epochs)


def replay_source(cfg: RunConfig, tokenizer: Tokenizer):
    s = cfg.sft
    if s.replay_ratio <= 0:
        return None
    data = s.replay_data
    if data in ("", "base"):
        data = Run(s.base).config().data
        if not data:
            raise UserError(f"{s.base}: the base run names no data to replay; set sft.replay_data=DIR")
    shards = TokenShards(data, "train")
    if shards.vocab_size != tokenizer.vocab_size:
        raise UserError(f"{data}: prepared with a tokenizer of {shards.vocab_size} tokens, the model "
                        f"has {tokenizer.vocab_size}: replay data must use the base run's tokenizer")
    return shards


def eval_set_for(examples, batch_size: int, tokenizer) -> EvalSet | None:
    if not examples:
        return None
    batches = eval_batches(examples, batch_size, tokenizer.pad_id)
    # Characters/bytes of the scored text (the assistant tokens) for bits per character.
    texts = [tokenizer.decode([int(t) for t in y[y != -100]]) for _, yb in batches for y in yb]
    return EvalSet(batches, sum(map(len, texts)), sum(len(t.encode("utf-8")) for t in texts))


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def with_lora(model: Llama, cfg: RunConfig, device, verbose: bool):
    """The base frozen (in 4-bit NF4 for QLoRA) under fresh LoRA adapters."""
    if cfg.lora.qlora:
        model.to(device)  # bitsandbytes quantizes on the device the weights are on
        quantize_base(model, TORCH_DTYPES[cfg.lora.compute_dtype])
    model = apply_lora(model, cfg.lora)
    if verbose:
        trainable, total = trainable_counts(model)
        kind = "QLoRA (NF4 base)" if cfg.lora.qlora else "LoRA"
        print(f"{kind} r={cfg.lora.r} alpha={cfg.lora.alpha:g} on {', '.join(cfg.lora.targets())}: "
              f"{trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    return model


# -- what every stage that starts from a base run shares (SFT, DPO, reward model, GRPO) ---------

def start_finetune(cfg: RunConfig, resume: bool) -> tuple[Run, Run]:
    """(the run being written, its base) after the checks every fine-tuning stage makes before
    any work: a new run must not overwrite one, the config validates, the base is a trained run
    with plain weights, and train.seq_len fits the context. Raises UserError."""
    run = Run(cfg.out_dir)
    run.check_training_start(resume, cfg.train.max_steps)
    check(cfg)
    base = Run(cfg.sft.base)
    if base.is_lora():
        raise UserError(f"{base.path}: is a LoRA run; merge it first (babyllama merge-lora "
                        f"{base.path} -o MERGED) and start from the merged run")
    base.require_trained()
    if base.is_vision() and cfg.stage not in VLM_STAGES:
        raise UserError(f"{base.path}: is an image-text run; fine-tune it further with `babyllama instruct` "
                        f"({cfg.stage} trains a text model)")
    if base.is_reward_model():
        raise UserError(f"{base.path}: is a reward model (a scalar head, no language-model head); "
                        f"{cfg.stage} starts from a chat (SFT) run")
    if cfg.train.seq_len > cfg.model.max_position_embeddings:
        raise UserError(f"config: train.seq_len ({cfg.train.seq_len}) is longer than "
                        f"model.max_position_embeddings ({cfg.model.max_position_embeddings})")
    return run, base


def finetune_tokenizer(cfg: RunConfig, base: Run) -> Tokenizer:
    """The base's tokenizer with the run's chat template. sft.template when given; else the
    base's own template for the stages after SFT (what its answers were trained in) and for a
    released model's run (`babyllama import` kept the template it was tuned with, whose
    answers `encode_chat` finds even without generation markers); else, for SFT, the default
    sft.template -- `babyllama` instead of `chatml` when a released model's vocabulary has no
    <|im_start|> (no embedding could be added for it). The template used is recorded in
    cfg.sft.template ("base" for the base's own). Raises UserError when a later stage's base
    has no chat template."""
    tokenizer = base.load_tokenizer()
    # An image-text stage may start from a pretrained (template-less) language model: it then
    # renders its data with sft.template, as SFT would.
    starts_chat = cfg.stage in VLM_STAGES and not tokenizer.chat_template
    if "sft.template" in cfg.user_keys:
        tokenizer.chat_template = resolve_template(cfg.sft.template)
        if tokenizer.fixed_vocab:
            # Such a token would be spelled out in bytes: no single id could end an answer.
            missing = sorted({t for t in re.findall(r"<\|[^|<>\s]+\|>", tokenizer.chat_template)
                              if tokenizer.token_to_id(t) is None})
            if missing:
                raise UserError(f"sft.template={cfg.sft.template}: writes {', '.join(missing)}, which "
                                f"{base.path}'s vocabulary has no token for (a released model's cannot "
                                "grow); use its own template (leave sft.template out) or sft.template=babyllama")
    elif tokenizer.chat_template and (cfg.stage != "sft" or tokenizer.fixed_vocab):
        if cfg.stage == "sft":
            cfg.sft.template = "base"
    elif cfg.stage == "sft" or starts_chat:
        if (tokenizer.fixed_vocab and cfg.sft.template == "chatml"
                and tokenizer.token_to_id(SPECIAL_TOKENS["im_start"]) is None):
            cfg.sft.template = "babyllama"
        tokenizer.chat_template = resolve_template(cfg.sft.template)
    else:
        raise UserError(f"{base.path}: has no chat template: {cfg.stage} starts from a chat (SFT) run, "
                        f"or pass sft.template=chatml to render the data with one")
    return tokenizer


def report_start(cfg: RunConfig, lines: list[str], bad: BadRecords) -> None:
    """Print the resolved config, one line per data source and the skipped records (main
    process, before the stage's own summary lines)."""
    print("resolved config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    for line in lines:
        print(line)
    if bad.count:
        print(bad.summary())


def finetune_schedule(cfg: RunConfig, max_steps: int) -> RunConfig:
    """Steps, evaluations, checkpoints, samples and warmup of a fine-tuning run of `max_steps`."""
    return derive_schedule(cfg, max_steps, evals=5, saves=5, samples=2, warmup_divisor=20,
                           warmup_cap=100, logs=50)


def finetune_model(cfg: RunConfig, base: Run, device, info):
    """The base's weights in `cfg.model`, under fresh LoRA (QLoRA) adapters when lora.enabled.
    Seeded: LoRA's A matrices (and dropout) draw from the global RNG, so a run repeats exactly."""
    torch.manual_seed(cfg.train.seed)
    model = Llama(cfg.model)
    load_weights(model, base.weights_file)
    if info.is_main:
        shown = os.path.relpath(base.path) if base.path.is_relative_to(Path.cwd()) else base.path
        print(f"model: {model.parameter_counts()['total'] / 1e6:.2f}M parameters from {shown} "
              f"on {device}, {info.world_size} process(es)")
    if cfg.lora.enabled:
        model = with_lora(model, cfg, device, info.is_main)
    return model


def use_block_mask(cfg: RunConfig, device: torch.device) -> bool:
    """Whether packed rows attend through FlexAttention block masks (sft.packed_attention):
    "auto" on CUDA when the model has no dropout. Raises UserError for "flex" off CUDA (its
    backward is CUDA-only)."""
    choice = cfg.sft.packed_attention
    if choice == "flex" and device.type != "cuda":
        raise UserError(f"sft.packed_attention=flex needs a CUDA GPU (FlexAttention's backward); this run is on "
                        f"{device.type}: use sft.packed_attention=mask or auto")
    return cfg.sft.mode == "pack" and (choice == "flex" or (choice == "auto" and device.type == "cuda"
                                                             and cfg.model.dropout == 0))


def run_sft(cfg: RunConfig, resume: bool = False) -> Path:
    """Fine-tune `cfg.sft.base` on `cfg.sft.sources` into `cfg.out_dir`. Steps and intervals
    follow from the data unless the user set them (`cfg.user_keys`); `cfg` is not changed."""
    cfg = copy_config(cfg)  # finetune_tokenizer records the template it chose in cfg.sft
    run, base = start_finetune(cfg, resume)
    t = cfg.train
    info, device = init_distributed(t.device, t.strategy)
    try:
        tokenizer = finetune_tokenizer(cfg, base)

        bad = BadRecords()
        train_convs, val_convs, lines = read_conversations(cfg, bad)
        train_ex, stats = build_examples(train_convs, tokenizer, t.seq_len + 1, loss_on=cfg.sft.loss_on)
        val_ex, _ = build_examples(val_convs, tokenizer, t.seq_len + 1, loss_on=cfg.sft.loss_on)
        if not train_ex:
            raise UserError(f"no training examples left: {stats.summary()}")
        replay = replay_source(cfg, tokenizer)
        batches = SFTBatches(train_ex, seq_len=t.seq_len, batch_size=t.batch_size,
                             grad_accum=t.grad_accum, seed=t.seed, pad_id=tokenizer.pad_id,
                             mode=cfg.sft.mode, rank=info.rank, world_size=info.world_size,
                             replay=replay, replay_ratio=cfg.sft.replay_ratio,
                             block_mask=use_block_mask(cfg, device))
        n_tokens = sum(len(e.ids) for e in train_ex)
        if not resume:
            cfg = finetune_schedule(cfg, steps_for(cfg, batches, n_tokens))
        t = cfg.train
        if info.is_main:
            report_start(cfg, lines, bad)
            targets = sum(int(e.mask.sum()) for e in train_ex)
            print(f"examples: {stats.summary()}")
            print(f"train: {len(train_ex):,} examples, {n_tokens:,} tokens ({targets:,} trained), "
                  f"{batches.batches_per_epoch:,} {'packed' if cfg.sft.mode == 'pack' else 'padded'} batches per epoch; "
                  f"val: {len(val_ex):,} examples -> {t.max_steps} steps")
            run.write_config(cfg)
            run.write_tokenizer(tokenizer)

        model = finetune_model(cfg, base, device, info)
        eval_set = eval_set_for(val_ex, t.batch_size, tokenizer)
        train(cfg, model, tokenizer, batches, eval_set, run.path, device, info, resume=resume,
              sample_fn=chat_sample)
    finally:
        cleanup(info)
    return run.path
