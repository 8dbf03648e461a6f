"""Learning-rate schedules: linear warmup (Goyal et al. 2017), then cosine decay (Loshchilov &
Hutter 2017, SGDR without restarts) or linear decay to a floor, or warmup-stable-decay (WSD,
Hu et al. 2024, MiniCPM: constant lr, then a short decay at the end).

A pure function of the step, so a resumed run needs no scheduler state; under a time budget
(`train.max_minutes`), of the step and the share of the budget spent.
"""

from __future__ import annotations

import math

from babyllama.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, fraction: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): rises linearly to `cfg.lr` over
    `warmup_steps`, then follows `cfg.schedule` down to `cfg.lr * min_lr_ratio` at the last
    step (wsd: decays over the last `decay_fraction` of the steps; constant: stays at the peak).

    `fraction` (the share of `train.max_minutes` already spent) is a second measure of
    progress: cosine and linear decay over the whole budget, wsd over its last
    `decay_fraction`. Whichever of the two limits is further along sets the rate, since
    whichever comes first ends training: the rate is at its floor at the end either way.
    Warmup counts steps (it guards the first updates, which happen at the same steps on any
    machine), scaled by the decay already due, so a budget that ends inside the warmup still
    ends at the floor."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "constant":
        return peak * warm
    last = cfg.max_steps - 1  # the final step runs at the floor
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.max_steps * cfg.decay_fraction))
        decay_start = max(cfg.warmup_steps, cfg.max_steps - decay_steps)
        progress = (step - decay_start) / max(1, last - decay_start)
        if fraction is not None:
            progress = max(progress, (fraction - (1 - cfg.decay_fraction)) / cfg.decay_fraction)
    else:
        progress = (step - cfg.warmup_steps) / max(1, last - cfg.warmup_steps)
        if fraction is not None:
            progress = max(progress, fraction)
    progress = min(1.0, max(0.0, progress))
    if cfg.schedule in ("linear", "wsd"):
        return warm * (peak - (peak - floor) * progress)
    return warm * (floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress)))
