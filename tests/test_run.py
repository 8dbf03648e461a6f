"""The run directory (`babyllama.run.Run`) and the one config resolution (`babyllama.config`)."""

import pytest
import torch

from babyllama.config import derive_schedule, load_config, resolve_config, resume_config
from babyllama.errors import UserError
from babyllama.model.llama import Llama
from babyllama.run import Run
from conftest import TINY_MODEL


def tiny_run(tmp_path, tokenizer, stage="pretrain"):
    cfg = load_config("demo-cpu", TINY_MODEL + [f"model.vocab_size={tokenizer.vocab_size}"])
    if stage == "sft":
        cfg = resolve_config("sft", base=cfg, base_dir=str(tmp_path / "base"))
    torch.manual_seed(0)
    model = Llama(cfg.model)
    run = Run(tmp_path / stage)
    run.write_plain_run(model, tokenizer, cfg)
    return run, model


def test_a_written_run_loads_back_the_same_model_tokenizer_and_config(tmp_path, tiny_tokenizer):
    run, model = tiny_run(tmp_path, tiny_tokenizer)
    assert run.is_run() and run.is_trained() and not run.is_lora() and not run.is_transformers()
    assert run.config().out_dir == str(run.path) and run.model_config() == model.config
    loaded = run.load_model()
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert run.load_tokenizer().encode("今天天气") == tiny_tokenizer.encode("今天天气")
    assert not run.chats() and run.base() is None


def test_an_sft_run_chats_and_names_its_base(tmp_path, tiny_tokenizer):
    run, _ = tiny_run(tmp_path, tiny_tokenizer, stage="sft")
    assert run.chats()
    assert run.base().path == tmp_path / "base"


def test_new_runs_refuse_to_overwrite_and_missing_runs_say_so(tmp_path, tiny_tokenizer):
    run, _ = tiny_run(tmp_path, tiny_tokenizer)
    with pytest.raises(UserError, match="exists and is not empty"):
        run.refuse_nonempty()
    (run.path / "resume").mkdir()
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        run.refuse_overwrite()
    with pytest.raises(UserError, match="no such run directory"):
        Run(tmp_path / "nowhere").model_config()
    with pytest.raises(UserError, match=r"not a run directory \(no config.yaml\)"):
        Run(tmp_path).config()


def test_resume_state_is_found_between_the_two_renames(tmp_path, tiny_tokenizer):
    """save_resume moves resume/ to resume.old/ before renaming the new state into place: a
    run killed in between must still find the complete old state."""
    run, model = tiny_run(tmp_path, tiny_tokenizer)
    assert run.resume_dir() is None
    run.save_resume(model, {"optimizer": {}}, {"step": 3, "tokens": 12})
    assert run.resume_dir() == run.path / "resume"
    (run.path / "resume").rename(run.path / "resume.old")
    assert run.resume_dir() == run.path / "resume.old"
    state, trainer_state = run.load_resume(Llama(model.config), run.resume_dir())
    assert trainer_state == {"step": 3, "tokens": 12} and state == {"optimizer": {}}


def test_resolution_records_user_keys_and_derived_defaults_keep_them():
    cfg = load_config("demo-cpu", ["train.eval_every=7", "train.lr=1e-3"])
    assert cfg.user_keys == {"train.eval_every", "train.lr"}
    before = cfg.to_dict()
    derived = derive_schedule(cfg, 100, evals=5, saves=5, samples=2, warmup_divisor=20)
    assert derived.train.eval_every == 7 and derived.train.save_every == 20
    assert derived.train.max_steps == 100 and derived.train.warmup_steps == 5
    assert cfg.to_dict() == before  # the config given is not changed
    assert "user_keys" not in cfg.to_dict()
    with pytest.raises(UserError, match="unknown config key 'user_keys'"):
        load_config("demo-cpu", ["user_keys=[]"])


def test_lora_fine_tuning_takes_the_base_peak_rate_unless_the_user_set_one():
    base = load_config("demo-cpu")
    lora = resolve_config("sft", base=base, base_dir="b", overrides={"lora": {"enabled": True}})
    full = resolve_config("sft", base=base, base_dir="b")
    given = resolve_config("sft", base=base, base_dir="b",
                           overrides={"lora": {"enabled": True}, "train": {"lr": 1e-5}})
    assert lora.train.lr == base.train.lr and full.train.lr == base.train.lr * 0.5
    assert given.train.lr == 1e-5


def test_resume_allows_only_length_and_intervals_to_change():
    saved = load_config("demo-cpu")
    cfg = resume_config(saved, ["train.max_steps=50"], "elsewhere")
    assert cfg.train.max_steps == 50 and cfg.out_dir == "elsewhere"
    assert saved.train.max_steps != 50 and saved.out_dir != "elsewhere"
    with pytest.raises(UserError, match="train.lr cannot change when resuming"):
        resume_config(saved, ["train.lr=1"], "x")
    # What is measured may change (a task whose data went missing must not block every resume).
    cfg = resume_config(saved, ["train.eval_tasks=[]", "train.sample_prompts=[你好]"], "x")
    assert cfg.train.eval_tasks == [] and cfg.train.sample_prompts == ["你好"]


def test_resume_accepts_restated_settings_and_refuses_changed_ones():
    """Re-running the original command with --resume restates its settings: that is allowed;
    only a value that differs from the run's is refused."""
    saved = load_config("demo-cpu", ["model.hidden_size=64"])
    cfg = resume_config(saved, ["model.hidden_size=64", "train.max_steps=9"], "x")
    assert cfg.model.hidden_size == 64 and cfg.train.max_steps == 9
    with pytest.raises(UserError, match="model.hidden_size cannot change when resuming"):
        resume_config(saved, ["model.hidden_size=128"], "x")


def test_resuming_behind_the_step_reached_is_refused(tmp_path, tiny_tokenizer):
    """A resumed run whose max_steps is below its step would train nothing and save a
    config.yaml whose length the weights have passed."""
    run, model = tiny_run(tmp_path, tiny_tokenizer)
    run.check_resume_length(1)  # no resume state: nothing to compare
    run.save_resume(model, {}, {"step": 200, "tokens": 0})
    assert run.resume_step() == 200
    run.check_resume_length(200)
    with pytest.raises(UserError, match="the run is at step 200; train.max_steps=60 is behind it"):
        run.check_resume_length(60)
