"""`train.max_minutes`: training ends when the wall-time budget is spent, the learning rate
reaches its floor at that moment, and a resumed run keeps the time already spent.

The trainer's clock is replaced by a fake one that advances a fixed number of seconds per
training micro-batch, so the tests are exact and take no real time."""

from __future__ import annotations

import json

import pytest

from babyllama.config import TrainConfig, load_config
from babyllama.errors import UserError
from babyllama.train.schedule import lr_at
from babyllama.train.trainer import expected_total

from conftest import TINY_MODEL, TINY_TRAIN, interrupt_pretraining_at

SECONDS_PER_STEP = 6.0  # with max_minutes=1: ten steps


@pytest.fixture
def fake_clock(monkeypatch):
    """perf_counter of the trainer module = seconds of fake time; each training batch fetched
    advances it by SECONDS_PER_STEP."""
    import babyllama.train.batches as batches
    import babyllama.train.trainer as trainer

    now = [1000.0]

    class FakeTime:
        @staticmethod
        def perf_counter():
            return now[0]

    monkeypatch.setattr(trainer, "time", FakeTime)
    original = batches.PretrainBatches.get

    def get(self, step, micro, device):
        now[0] += SECONDS_PER_STEP
        return original(self, step, micro, device)

    monkeypatch.setattr(batches.PretrainBatches, "get", get)
    return now


def budget_config(tiny_data, out, *extra):
    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=1000", "train.max_minutes=1",
                                                             "train.warmup_steps=2", "train.save_every=3",
                                                             *extra])
    cfg.data, cfg.out_dir = str(tiny_data), str(out)
    return cfg


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_a_time_budget_schedule_ends_at_its_floor_when_the_time_ends(schedule):
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=10**6, schedule=schedule,
                      decay_fraction=0.25)
    assert lr_at(0, cfg, 0.0) == pytest.approx(1e-4)  # warmup stays in steps
    assert lr_at(50, cfg, 1.0) == pytest.approx(1e-4)
    assert lr_at(50, cfg, 1.7) == pytest.approx(1e-4)  # the last step may end past the budget
    lrs = [lr_at(50, cfg, f / 100) for f in range(101)]
    assert all(a >= b - 1e-12 for a, b in zip(lrs, lrs[1:]))
    if schedule == "wsd":
        assert lrs[75] == pytest.approx(1e-3)  # stable until the last quarter of the time
        assert lrs[76] < 1e-3
    else:
        assert lrs[50] == pytest.approx(5.5e-4)  # halfway down at half the time


def test_the_progress_bar_expects_the_steps_the_time_allows():
    assert expected_total(10, None, 500) == 500
    assert expected_total(10, 0.25, 500) == 40
    assert expected_total(10, 0.001, 500) == 500  # never beyond the max_steps cap
    assert expected_total(10, 1.2, 500) == 10


def test_training_stops_when_the_time_budget_is_spent(tiny_data, tmp_path, fake_clock):
    from babyllama.train.pretrain import run_pretrain

    cfg = budget_config(tiny_data, tmp_path / "run")
    run_pretrain(cfg)
    steps = [r for r in records(tmp_path / "run") if "loss" in r]
    assert steps[-1]["step"] == 10  # 10 x 6 s = the 1-minute budget, far before max_steps
    # Each step's rate follows the time spent when it starts: the last started at 54 s of 60.
    assert [r["lr"] for r in steps[2:]] == pytest.approx([lr_at(i, cfg.train, i / 10) for i in range(2, 10)])
    assert steps[-1]["lr"] < 3e-3 * 0.125
    state = json.loads((tmp_path / "run" / "resume" / "trainer.json").read_text())
    assert state["step"] == 10 and state["elapsed_s"] == pytest.approx(60.0)


def test_a_resumed_run_keeps_the_time_already_spent(tiny_data, tmp_path, fake_clock, monkeypatch, capsys):
    from babyllama.train.pretrain import run_pretrain

    restore = interrupt_pretraining_at(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(budget_config(tiny_data, tmp_path / "run"))
    state = json.loads((tmp_path / "run" / "resume" / "trainer.json").read_text())
    assert state["step"] == 7 and state["elapsed_s"] == pytest.approx(42.0)  # saved at each tenth of the time

    restore()
    fake_clock[0] += 3600  # time away from the run does not count
    run_pretrain(budget_config(tiny_data, tmp_path / "run"), resume=True)
    steps = [r for r in records(tmp_path / "run") if "loss" in r]
    assert steps[-1]["step"] == 10 and steps[-1]["lr"] == pytest.approx(lr_at(9, TrainConfig(
        lr=3e-3, warmup_steps=2, max_steps=1000), 0.9))

    # Resuming a run whose time is spent trains nothing more.
    capsys.readouterr()
    run_pretrain(budget_config(tiny_data, tmp_path / "run"), resume=True)
    assert [r for r in records(tmp_path / "run") if "loss" in r][-1]["step"] == 10
    assert "time budget (train.max_minutes=1) is spent" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_bad_time_budget_is_refused_before_training(value):
    from babyllama.config import check

    with pytest.raises(UserError, match="train.max_minutes"):
        check(load_config("demo-cpu", [f"train.max_minutes={value}"]))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_a_step_cap_reached_before_the_time_still_ends_at_the_floor(schedule):
    # SFT's epochs cap the steps of a time-budgeted run: whichever limit comes first sets the rate.
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=5, max_steps=30, schedule=schedule)
    assert lr_at(29, cfg, 0.4) == pytest.approx(1e-4)
    assert lr_at(15, cfg, 0.95) <= lr_at(15, cfg, 0.0)


def test_a_budget_that_ends_inside_the_warmup_ends_at_the_floor():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, max_steps=10**6)
    assert lr_at(49, cfg, 1.0) <= 1e-4
    assert lr_at(49, cfg, 0.0) == pytest.approx(5e-4)  # the warmup itself is unchanged


def test_a_new_run_takes_a_step_however_small_its_budget(tiny_data, tmp_path, fake_clock):
    from babyllama.train.pretrain import run_pretrain

    cfg = budget_config(tiny_data, tmp_path / "run")
    cfg.train.max_minutes = 1e-9
    run_pretrain(cfg)
    assert [r["step"] for r in records(tmp_path / "run") if "loss" in r] == [1]
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_a_time_budget_checkpoints_at_each_tenth_of_it(tiny_data, tmp_path, fake_clock, monkeypatch):
    # save_every far beyond the steps the time allows: Ctrl-C still loses at most a tenth.
    from babyllama.train.pretrain import run_pretrain

    interrupt_pretraining_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(budget_config(tiny_data, tmp_path / "run", "train.save_every=500"))
    state = json.loads((tmp_path / "run" / "resume" / "trainer.json").read_text())
    assert state["step"] == 5  # 6 s a step of a 60 s budget: every step ends a tenth
