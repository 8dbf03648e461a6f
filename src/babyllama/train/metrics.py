"""`metrics.jsonl` (one JSON object per logged event) and the loss-versus-tokens plot."""

from __future__ import annotations

import json
from pathlib import Path

from babyllama.atomic import atomic_path, atomic_write_text
from babyllama.textfile import read_text


class MetricsLog:
    """The training log at `path`: one JSON object per line (a step's loss, an evaluation, a
    skipped step). A new run starts it empty; a resumed one (`resume_step`) keeps what was
    logged up to that step."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            # Drop what was logged after the resume point, so a resumed run's log reads as if
            # it had never stopped.
            kept = [line for line in self.read() if line.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        """Append one record (appended and closed at once, so a kill loses at most that line)."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def read(self) -> list[dict]:
        """Every record, in order; [] when the file does not exist."""
        if not self.path.exists():
            return []
        out = []
        for line in read_text(self.path).splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                pass
        return out


def plot_loss(records: list[dict], path: Path, title: str = "") -> None:
    """Draw training loss (raw and smoothed) and validation loss (nats/token) against tokens
    seen, from `MetricsLog.read()` records, into the PNG `path` (replaced atomically)."""
    # Imported here: matplotlib takes ~0.3 s to load and only this function draws, and the
    # Agg backend (no display needed) must be chosen before pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    # Reinforcement learning logs its reward per step (and held-out accuracy): a second panel,
    # since the loss of a policy-gradient step says little about progress.
    rewards = [(r["step"], r["reward"]) for r in records if "reward" in r]
    accuracy = [(r["step"], r["val_accuracy"]) for r in records if "val_accuracy" in r]
    if rewards:
        fig, (ax, rx) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
        plot_rewards(rx, rewards, accuracy)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        x, y = zip(*train)
        ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8)
        # Bias-corrected EMA (as Adam corrects its moments): without the correction the curve
        # starts at the initial loss and lags far behind the raw points.
        smooth, s, beta = [], 0.0, 0.8
        for t, v in enumerate(y, start=1):
            s = beta * s + (1 - beta) * v
            smooth.append(s / (1 - beta ** t))
        ax.plot(x, smooth, color="tab:blue", label="train (smoothed)")
    if val:
        x, y = zip(*val)
        ax.plot(x, y, "o-", color="tab:orange", label="validation")
    # Pair objectives (DPO, reward model) log per-pair losses; GRPO per answer token.
    pairs = any("rewards/margins" in r or "margin" in r for r in records)
    ax.set_xlabel("pairs seen" if pairs else "answer tokens trained" if rewards else "tokens seen")
    ax.set_ylabel("loss (per pair)" if pairs else "policy loss" if rewards else "cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_rewards(ax, rewards: list[tuple[int, float]], accuracy: list[tuple[int, float]]) -> None:
    """Mean reward per step (raw and a 10-step moving average) and held-out accuracy."""
    x, y = zip(*rewards)
    ax.plot(x, y, color="tab:green", alpha=0.3, linewidth=0.8)
    window = [sum(y[max(0, i - 9):i + 1]) / len(y[max(0, i - 9):i + 1]) for i in range(len(y))]
    ax.plot(x, window, color="tab:green", label="mean reward (10-step average)")
    if accuracy:
        ax.plot(*zip(*accuracy), "o-", color="tab:red", label="held-out accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.set_title("reward")
    ax.grid(alpha=0.3)
    ax.legend()
