"""Pretraining: prepared token shards in, a run directory out.

Wires the pieces together: resolved config -> tokenizer -> model -> batches -> the trainer loop.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from babyllama.config import RunConfig, check, copy_config
from babyllama.data.shards import TOKENIZER_DIR, TokenShards
from babyllama.errors import UserError
from babyllama.model.llama import Llama
from babyllama.run import Run
from babyllama.tokenizer import Tokenizer
from babyllama.train.batches import PretrainBatches, validation_windows
from babyllama.train.distributed import cleanup, init_distributed
from babyllama.train.trainer import EvalSet, train


def find_tokenizer(cfg: RunConfig) -> str:
    """--tokenizer, else the tokenizer `babyllama prepare` saved next to the data."""
    if cfg.tokenizer:
        return cfg.tokenizer
    candidate = Path(cfg.data) / TOKENIZER_DIR  # `babyllama prepare` saves the tokenizer it used
    if candidate.exists():
        return str(candidate)
    raise UserError(f"{cfg.data}: no tokenizer/ next to the prepared data; pass --tokenizer PATH")


def check_against_data(cfg: RunConfig, tokenizer: Tokenizer, shards: TokenShards) -> None:
    """The data must have been made with the tokenizer, and the context must hold a row."""
    if shards.vocab_size != tokenizer.vocab_size:
        raise UserError(f"{cfg.data}: prepared with a tokenizer of {shards.vocab_size} tokens, but "
                        f"the tokenizer has {tokenizer.vocab_size}; run `babyllama prepare` again")
    if cfg.train.seq_len > cfg.model.max_position_embeddings:
        raise UserError(f"config: train.seq_len ({cfg.train.seq_len}) is longer than "
                        f"model.max_position_embeddings ({cfg.model.max_position_embeddings})")


def run_pretrain(cfg: RunConfig, resume: bool = False) -> Path:
    """Pretrain `cfg.model` on the shards in `cfg.data` into the run directory `cfg.out_dir`;
    returns it. `cfg` is not changed: the saved config has absolute paths and the model's
    vocabulary taken from the tokenizer."""
    if not cfg.data:
        raise UserError("no data: pass --data DIR (a directory made by `babyllama prepare`)")
    run = Run(cfg.out_dir)
    run.check_training_start(resume, cfg.train.max_steps)
    check(cfg)
    # Saved absolute, so `--resume` works from any working directory.
    cfg = copy_config(cfg, data=str(Path(cfg.data).resolve()),
                      tokenizer=str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else "")
    info, device = init_distributed(cfg.train.device, cfg.train.strategy)
    try:
        shards = TokenShards(cfg.data, "train")  # first: a missing dataset is the likelier mistake
        tokenizer = Tokenizer.load(find_tokenizer(cfg))
        cfg.model.vocab_size = tokenizer.vocab_size  # the model's vocabulary is the tokenizer's
        check_against_data(cfg, tokenizer, shards)
        if info.is_main:
            print("resolved config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
            run.write_config(cfg)
            run.write_tokenizer(tokenizer)

        torch.manual_seed(cfg.train.seed)
        model = Llama(cfg.model)
        counts = model.parameter_counts()
        if info.is_main:
            print(f"model: {counts['total'] / 1e6:.2f}M parameters "
                  f"({counts['embedding'] / counts['total']:.0%} embedding) on {device}, "
                  f"{info.world_size} process(es)")
        t = cfg.train
        train_data = PretrainBatches(shards, t.seq_len, t.batch_size, t.grad_accum, t.seed,
                                     info.rank, info.world_size)
        eval_set = None
        # Only a missing or too small validation split turns evaluation off; a damaged one
        # (missing shard, wrong size) raises like the train split does.
        if shards.meta["splits"].get("val", {}).get("n_tokens", 0) > t.seq_len + 1:
            val = TokenShards(cfg.data, "val")
            # Global batches: the same windows however the batch is split into processes.
            windows = validation_windows(val, t.seq_len, t.eval_batches * t.batch_size * info.world_size)
            eval_set = EvalSet.from_windows(windows, t.batch_size, tokenizer)
        if eval_set is None and info.is_main:
            print("note: no usable validation split; periodic evaluation is off")
        train(cfg, model, tokenizer, train_data, eval_set, run.path, device, info, resume=resume)
    finally:
        cleanup(info)
    return run.path
