"""Batches of preference pairs for the stages that learn from them (DPO, the reward model).

A micro-batch of B pairs is one (2B, T) tensor: the B chosen answers, then the B rejected
ones, right-padded to the longest row (right padding needs no attention mask: a causal model
never looks at the pads after a token). Rows are drawn by a pure function of (seed, step,
micro, rank), so a resumed or a distributed run needs no loader state, like `SFTBatches`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from babyllama.config import RunConfig
from babyllama.data.preference import build_pairs, iter_pairs
from babyllama.data.readers import BadRecords
from babyllama.data.sft import split_validation
from babyllama.errors import UserError
from babyllama.train.distributed import DistInfo, all_reduce_sum
from babyllama.train.sft import parse_source, report_start
from babyllama.train.trainer import Loss, autocast_context

IGNORE = -100


@dataclass
class PairBatch:
    """B pairs as 2B rows: chosen rows 0..B-1, rejected rows B..2B-1."""
    input_ids: torch.Tensor            # (2B, T) int64, right-padded with the tokenizer's pad id
    targets: torch.Tensor              # (2B, T) int64, the answer tokens; -100 elsewhere
    last: torch.Tensor                 # (2B,) index of each row's last real token (a reward head reads it)
    reference: torch.Tensor | None     # (2B,) the reference model's summed answer log-probs, or None
    index: torch.Tensor                # (B,) the pairs' positions in the example list

    @property
    def pairs(self) -> int:
        return self.input_ids.size(0) // 2


def collate(examples: list, index: list[int], pad_id: int, reference: torch.Tensor | None,
            device, full: bool = False) -> PairBatch:
    """The pairs `examples[i] for i in index` as one PairBatch on `device`; `reference` is the
    (N, 2) table of reference log-probs (chosen, rejected) of all examples, or None.
    `full`: the inputs are the whole sequences (a reward model reads the last token's hidden
    state, as transformers' sequence classification does), not ids[:-1] with shifted targets."""
    rows = [examples[i].chosen for i in index] + [examples[i].rejected for i in index]
    T = max(len(r.ids) for r in rows) - (0 if full else 1)
    x = np.full((len(rows), T), pad_id, dtype=np.int64)
    y = np.full((len(rows), T), IGNORE, dtype=np.int64)
    for r, row in enumerate(rows):
        inputs, targets = (row.ids, None) if full else row.inputs_targets()
        x[r, :len(inputs)] = inputs
        if targets is not None:
            y[r, :len(targets)] = targets
    last = torch.tensor([len(row.ids) - (1 if full else 2) for row in rows])
    ref = None
    if reference is not None:
        picked = reference[torch.tensor(index)]
        ref = torch.cat([picked[:, 0], picked[:, 1]]).to(device)
    return PairBatch(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), last.to(device), ref,
                     torch.tensor(index))


class PairBatches:
    """The trainer's data for a pair objective (`TrainData` with `loss`): B pairs per micro-step,
    epochs of a seeded permutation, each rank its own slice of every step.

    `objective(model, batch: PairBatch) -> Loss` is the stage's loss (DPO, Bradley–Terry), its
    units pairs; `reference` the (N, 2) reference log-probs of the examples (DPO) or None."""

    def __init__(self, examples: list, *, batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 objective: Callable, reference: torch.Tensor | None = None, rank: int = 0,
                 world_size: int = 1, full: bool = False):
        if not examples:
            raise ValueError("no pairs to train on")
        self.full = full  # whole sequences as inputs (reward model); see `collate`
        self.examples, self.batch_size, self.grad_accum = examples, batch_size, grad_accum
        self.seed, self.pad_id, self.objective, self.reference = seed, pad_id, objective, reference
        self.rank, self.world_size = rank, world_size
        self.units_per_micro = batch_size  # loss sums are per pair
        self._orders: dict[int, np.ndarray] = {}

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * len(self.examples) / self.pairs_per_step))

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))}
        return self._orders[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        """The pairs of (step, micro) on this rank: consecutive positions of an endless stream
        of epochs, each a fresh permutation."""
        start = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        n = len(self.examples)
        return [int(self.order(p // n)[p % n]) for p in range(start, start + self.batch_size)]

    def get(self, step: int, micro: int, device) -> PairBatch:
        return collate(self.examples, self.indices(step, micro), self.pad_id, self.reference, device, self.full)

    def loss(self, model, batch: PairBatch) -> Loss:
        return self.objective(model, batch)


class HeldOutPairs:
    """Held-out pairs scored with the training objective: `evaluate` returns `val_loss` and
    `val_` + each of the objective's stats (means over pairs), split across ranks like the
    language-model eval set."""

    def __init__(self, examples: list, batch_size: int, pad_id: int, objective: Callable,
                 reference: torch.Tensor | None = None, full: bool = False):
        self.examples, self.batch_size, self.pad_id, self.full = examples, batch_size, pad_id, full
        self.objective, self.reference = objective, reference

    @torch.no_grad()
    def evaluate(self, model, device, precision: str, info: DistInfo) -> dict:
        was_training = model.training
        model.eval()
        starts = list(range(0, len(self.examples), self.batch_size))
        mine = starts[info.rank::info.world_size]
        # A rank without a batch of its own (fewer batches than ranks) scores the first one with
        # weight 0, so every rank reduces a tensor of the same size.
        weight = 1.0 if mine else 0.0
        sums = None
        for start in mine or starts[:1]:
            index = list(range(start, min(start + self.batch_size, len(self.examples))))
            batch = collate(self.examples, index, self.pad_id, self.reference, device, self.full)
            with autocast_context(precision, device):
                loss = self.objective(model, batch)
            names = sorted(loss.stats)
            row = torch.stack([loss.total.float(), loss.units.float()] + [loss.stats[n].float() for n in names])
            sums = weight * row if sums is None else sums + row
        model.train(was_training)
        sums = all_reduce_sum(sums, info).tolist()
        if not sums[1]:
            return {}
        return {"val_loss": sums[0] / sums[1], **{f"val_{n}": v / sums[1] for n, v in zip(names, sums[2:])}}


@torch.no_grad()
def pair_scores(score: Callable, examples: list, batch_size: int, pad_id: int, device,
                precision: str = "fp32", progress: bool = False, full: bool = False) -> torch.Tensor:
    """`score(batch) -> (2B,)` over all pairs in order, as an (N, 2) fp32 CPU tensor of
    (chosen, rejected): the reference log-probs DPO stores, the rewards `score` prints."""
    from tqdm.auto import tqdm

    out = torch.zeros(len(examples), 2)
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="scoring pairs", unit="batch", disable=not progress):
        index = list(range(start, min(start + batch_size, len(examples))))
        batch = collate(examples, index, pad_id, None, device, full)
        with autocast_context(precision, device):
            values = score(batch).float().cpu()
        B = len(index)
        out[start:start + B, 0], out[start:start + B, 1] = values[:B], values[B:]
    return out


@dataclass
class PairData:
    """A run's pairs, encoded: training and held-out examples, and what reading them found."""
    train: list
    val: list
    lines: list[str]      # one report line per source
    summary: str          # what fitting the pairs into the context did (PairStats.summary)
    bad: BadRecords

    def report(self, cfg: RunConfig, per_step: str) -> None:
        """Print the resolved config and the data report (main process)."""
        report_start(cfg, self.lines, self.bad)
        print(f"pairs: {self.summary}")
        print(f"train: {len(self.train):,} pairs, val: {len(self.val):,} pair{'' if len(self.val) == 1 else 's'}; {per_step} "
              f"-> {cfg.train.max_steps} steps")


def load_pair_data(cfg: RunConfig, tokenizer, max_len: int) -> PairData:
    """Read every source of `cfg.sft.sources` (pairs), hold out `sft.val_fraction` of each, and
    encode both parts with the tokenizer's chat template into examples of at most `max_len`
    tokens. Raises UserError when there is no source, a source has no pair, or no training
    pair fits."""
    s = cfg.sft
    if not s.sources:
        raise UserError(f"no preference data: pass --data FILE (pairs; see `babyllama {cfg.stage} --help`)")
    bad = BadRecords()
    trains, vals, lines = [], [], []
    for k, spec in enumerate(s.sources):
        path, weight = parse_source(spec)
        if weight != 1:
            raise UserError(f"data source '{spec}': weights (@) mix conversation files; pairs are used as they are")
        pairs = list(iter_pairs(path, s.format or None, skip_bad=s.skip_bad_records, bad=bad,
                                system=s.system_prompt or None))
        if not pairs:
            raise UserError(f"{path}: no usable preference pairs")
        train_part, val_part = split_validation(pairs, s.val_fraction, cfg.train.seed + k)
        trains += train_part
        vals += val_part
        lines.append(f"{path}: {len(pairs):,} pairs ({len(train_part):,} train, {len(val_part):,} val)")
    train_ex, stats = build_pairs(trains, tokenizer, max_len)
    val_ex, val_stats = build_pairs(vals, tokenizer, max_len)
    if not train_ex:
        raise UserError(f"no training pairs left: {stats.summary()}")
    summary = stats.summary() + (f"; held out: {val_stats.summary()}" if vals else "")
    return PairData(train_ex, val_ex, lines, summary, bad)
