"""Pretraining batches drawn from token shards as a pure function of (seed, step).

The windows for optimizer step `s` come from `np.random.default_rng([seed, s])`: no loader
state to save, so a resumed run sees exactly the batches it would have seen, and a run on W
processes sees the same global batch as one process (each rank takes its slice).
"""

from __future__ import annotations

import numpy as np
import torch

from babyllama.data.shards import TokenShards


class PretrainBatches:
    """Random windows of `seq_len + 1` tokens from `shards`: `grad_accum` micro-batches of
    `batch_size` rows per process and optimizer step (the trainer's `TrainData`)."""

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, grad_accum: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.shards = shards
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._step_starts: tuple[int, np.ndarray] | None = None

    def get(self, step: int, micro: int, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Inputs and targets (batch_size, seq_len), int64 on `device`, for this rank's share
        of micro-batch `micro` of step `step`; no extra model arguments."""
        # One draw per step for all its micro-batches and ranks, kept for the step's other
        # calls: each takes its slice, so W ranks see the global batch one process would.
        if self._step_starts is None or self._step_starts[0] != step:
            rng = np.random.default_rng([self.seed, step])
            n = self.grad_accum * self.world_size * self.batch_size
            starts = self.shards.random_starts(rng, n, self.seq_len + 1)
            self._step_starts = (step, starts.reshape(self.grad_accum, self.world_size * self.batch_size))
        starts = self._step_starts[1][micro]
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return (*windows_to_batch(self.shards.windows(starts, self.seq_len + 1), device), {})


def windows_to_batch(windows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows (N, T + 1) -> inputs (N, T) and next-token targets (N, T), int64 on
    `device`."""
    # Pinned host memory lets the copy to a GPU run asynchronously (non_blocking).
    w = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    if device is not None and torch.device(device).type == "cuda":
        w = w.pin_memory().to(device, non_blocking=True)
    else:
        w = w.to(device)
    return w[:, :-1], w[:, 1:]


def validation_windows(shards: TokenShards, seq_len: int, n: int) -> np.ndarray:
    """A fixed set of at most `n` validation windows (n, seq_len + 1): evenly spaced, so
    every eval scores the same text (fewer when the split is too short for `n` distinct ones)."""
    if n <= 0:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    last = shards.n_tokens - (seq_len + 1)
    starts = np.linspace(0, last, num=n).astype(np.int64)
    return shards.windows(np.unique(starts), seq_len + 1)
