"""SFT end to end: `babyllama sft` on a pretrained run, exact resume, chat (CLI, REPL, API)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import TINY_MODEL, TINY_TRAIN, babyllama_cmd, cli_env

ANSWER = "你好，我是小助手。"


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def greeting_conversations(n: int = 40) -> list[dict]:
    """Every conversation greets the same way; the questions vary, the answer is fixed."""
    questions = ["你好", "你好啊", "您好", "嗨，你好", "你是谁", "请介绍一下你自己"]
    return [{"messages": [{"role": "user", "content": questions[i % len(questions)]},
                          {"role": "assistant", "content": ANSWER}]} for i in range(n)]


@pytest.fixture(scope="module")
def base_run(tiny_data, tmp_path_factory):
    """A tiny pretrained run (a few steps: SFT only needs weights and a tokenizer)."""
    from babyllama.config import load_config
    from babyllama.train.pretrain import run_pretrain

    out = tmp_path_factory.mktemp("base") / "run"
    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=3", "train.save_every=0"])
    cfg.data, cfg.out_dir = str(tiny_data), str(out)
    run_pretrain(cfg)
    return out


def sft_cfg(base_run, data, out, extra=()):
    from babyllama.config import parse_overrides
    from babyllama.train.sft import sft_config

    values = parse_overrides(["train.lr=1e-2", "train.batch_size=8", "train.log_every=1",
                              "train.sample_prompts=[]", "sft.val_fraction=0.1", *extra])
    values["sft"]["sources"] = [data]
    values["out_dir"] = str(out)
    return sft_config(base_run, values)


def test_sft_learns_the_answer_and_chat_gives_it(base_run, tmp_path):
    """The whole path (template, assistant-only targets, packing, stop token, chat prompt) must
    line up for a fine-tuned model to reproduce the trained answer greedily."""
    from babyllama.llm import load
    from babyllama.train.sft import run_sft

    data = write_jsonl(tmp_path / "greet.jsonl", greeting_conversations())
    cfg = sft_cfg(base_run, data, tmp_path / "sft", ["train.max_steps=100"])
    run = run_sft(cfg)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_acc"] > 0.9
    llm = load(run, device="cpu")
    assert llm.tokenizer.chat_template and "im_start" in llm.tokenizer.chat_template
    answer = llm.chat([{"role": "user", "content": "你好"}], temperature=0, max_new_tokens=40)
    assert answer == ANSWER


def test_sft_trains_only_on_assistant_tokens(base_run, tmp_path):
    """`tokens` in the metrics counts trained targets: the answers plus each turn's end token."""
    from babyllama.train.sft import run_sft

    data = write_jsonl(tmp_path / "greet.jsonl", greeting_conversations(20))
    cfg = sft_cfg(base_run, data, tmp_path / "sft", ["train.max_steps=1", "sft.val_fraction=0",
                                                            "train.batch_size=64"])
    run = run_sft(cfg)
    from babyllama.tokenizer import Tokenizer

    tok = Tokenizer.load(run / "tokenizer")
    per_answer = len(tok.encode(ANSWER)) + 1  # + <|im_end|>
    tokens = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()][-1]["tokens"]
    assert tokens == 20 * per_answer


LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8"]


@pytest.mark.parametrize("variant", [[], LORA, LORA + ["lora.qlora=true"]], ids=["full", "lora", "qlora"])
def test_sft_resume_is_exact(base_run, tmp_path, monkeypatch, variant):
    from babyllama.run import Run
    from babyllama.train import checkpoint, trainer
    from babyllama.train.sft import run_sft
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "greet.jsonl", greeting_conversations(24))
    if "lora.qlora=true" in variant:
        pytest.importorskip("bitsandbytes")
    extra = ["train.max_steps=6", "train.save_every=3", "train.batch_size=4", *variant]
    straight = sft_cfg(base_run, data, tmp_path / "straight", extra)
    run_sft(straight)

    real_save = checkpoint.save_resume

    def save_then_die(run_dir, model, optimizer, scaler, state):
        real_save(run_dir, model, optimizer, scaler, state)
        if state["step"] == 3:
            raise KeyboardInterrupt  # killed right after the step-3 checkpoint

    monkeypatch.setattr(trainer, "save_resume", save_then_die)
    cut = sft_cfg(base_run, data, tmp_path / "cut", extra)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cut)
    monkeypatch.setattr(trainer, "save_resume", real_save)
    cfg = Run(tmp_path / "cut").config()
    cfg.out_dir = str(tmp_path / "cut")
    run_sft(cfg, resume=True)
    weights = "adapter_model.safetensors" if variant else "model.safetensors"
    a = load_file(str(tmp_path / "straight" / weights))
    b = load_file(str(tmp_path / "cut" / weights))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_sft_with_replay_and_padding_runs(base_run, tiny_data, tmp_path):
    from babyllama.train.sft import run_sft

    data = write_jsonl(tmp_path / "greet.jsonl", greeting_conversations(16))
    cfg = sft_cfg(base_run, data, tmp_path / "sft",
                         ["train.max_steps=2", "sft.mode=pad", "sft.replay_ratio=0.5", "train.seq_len=60"])
    run = run_sft(cfg)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)


def short_and_long_answers() -> list[dict]:
    """Two conversations whose answers differ 7x in trained tokens (3 and 21 with the tiny
    tokenizer): their mean losses differ, so a step that averages per-micro-batch means instead
    of tokens gets another loss."""
    return [{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]},
            {"messages": [{"role": "user", "content": "你好"},
                          {"role": "assistant", "content": "今天天气很好，我们去公园散步。" * 5}]}]


class GradRecorder(torch.optim.SGD):
    """An optimizer that keeps a copy of the gradients it is given and leaves the weights alone."""
    made: list = []

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        GradRecorder.made.append(self)

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                      if p.grad is not None]


def test_step_loss_and_gradients_are_token_weighted_whatever_the_micro_batch_split(
        base_run, tmp_path, monkeypatch):
    """batch 2 x accumulation 1 and batch 1 x accumulation 2 over the same two conversations
    give the same loss and gradients (fp32): the mean over the step's trained tokens (the shared
    case sft-grad-accum-weighting: 8.955 vs 11.816 when micro-batches were averaged)."""
    from babyllama.train import trainer
    from babyllama.train.sft import run_sft

    data = write_jsonl(tmp_path / "two.jsonl", short_and_long_answers())
    monkeypatch.setattr(trainer, "build_optimizer", lambda model, cfg, lr_scale=None: GradRecorder(
        [p for p in model.parameters() if p.requires_grad]))
    runs = {}
    for batch, accum in ((2, 1), (1, 2)):
        GradRecorder.made.clear()
        common = ["train.max_steps=1", "sft.val_fraction=0", "train.grad_clip=0", "sft.mode=pad",
                  "train.precision=fp32", "train.device=cpu", "model.dropout=0"]
        cfg = sft_cfg(base_run, data, tmp_path / f"{batch}x{accum}",
                             common + [f"train.batch_size={batch}", f"train.grad_accum={accum}"])
        run = run_sft(cfg)
        record = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()][0]
        runs[batch, accum] = record, GradRecorder.made[-1].grads
    (one, g_one), (split, g_split) = runs[2, 1], runs[1, 2]
    assert one["tokens"] == split["tokens"] == 24
    assert split["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert split["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    for a, b in zip(g_one, g_split, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("strategy, lora", [("ddp", []), ("fsdp", []), ("fsdp", ["--lora", "lora.dropout=0"])],
                         ids=["ddp", "fsdp", "fsdp-lora"])
def test_two_processes_weight_tokens_like_one_process(base_run, tmp_path, strategy, lora):
    """Across ranks too: rank 0 gets the 1-token answer, rank 1 the long one; the step's loss
    and gradient norm are those of one process holding both, with whole (DDP) or sharded
    (FSDP) weights, and with LoRA adapters beside a sharded frozen base."""
    import sys

    data = write_jsonl(tmp_path / "two.jsonl", short_and_long_answers())
    common = ["--base", str(base_run), "--data", data, "--mode", "pad", "train.max_steps=1",
              "sft.val_fraction=0", "train.grad_clip=0", "train.device=cpu", "train.precision=fp32",
              "train.log_every=1", "train.sample_prompts=[]", "model.dropout=0", *lora]
    one = run_cli("sft", *common, "-o", str(tmp_path / "one"), "train.batch_size=2")
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "babyllama.cli", "sft", *common, "-o", str(tmp_path / "two"), "train.batch_size=1",
         f"train.strategy={strategy}"],
        env=cli_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = ([json.loads(l) for l in (tmp_path / r / "metrics.jsonl").read_text().splitlines()][0]
            for r in ("one", "two"))
    assert a["tokens"] == b["tokens"] == 24
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    if lora:  # the adapter the sharded run wrote is the one process's
        from safetensors.torch import load_file

        x, y = (load_file(str(tmp_path / r / "adapter_model.safetensors")) for r in ("one", "two"))
        assert x.keys() == y.keys() and len(x) > 0
        for k in x:
            torch.testing.assert_close(y[k], x[k], rtol=1e-4, atol=1e-6, msg=k)


def run_cli(*args, input=None):
    return subprocess.run(babyllama_cmd() + list(args), env=cli_env(), capture_output=True, text=True,
                          input=input, timeout=300)


def test_sft_and_chat_cli(base_run, tmp_path):
    data = write_jsonl(tmp_path / "greet.jsonl", greeting_conversations(12))
    out = tmp_path / "sft"
    r = run_cli("sft", "--base", str(base_run), "--data", data, "-o", str(out), "--template", "babyllama",
                "train.max_steps=2", "train.sample_prompts=[你好]")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "examples:" in r.stdout and "val:" in r.stdout
    assert "资料" in (out / "tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8") or \
        "人类" in (out / "tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8")
    assert (out / "samples.txt").read_text(encoding="utf-8").count("你好|") >= 1

    once = run_cli("chat", str(out), "--prompt", "你好", "--max-new-tokens", "8", "--seed", "0")
    assert once.returncode == 0, once.stderr[-2000:]

    doc = tmp_path / "doc.txt"
    doc.write_text("《恋恋笔记本》是2004年的一部爱情片。", encoding="utf-8")
    long = "很长的问题" * 40
    script = (f"/system 助手\n你好\n/doc {doc}\n哪年？\n/doc /no/such/file\n/foo\n/reset\n{long}\n你好\n/quit\n")
    repl = run_cli("chat", str(out), "--max-new-tokens", "6", input=script)
    assert repl.returncode == 0, repl.stderr[-2000:]
    assert "system prompt set" in repl.stdout and "document loaded" in repl.stdout
    assert "conversation cleared" in repl.stdout and "no such file" in repl.stdout
    assert "(unknown command /foo)" in repl.stdout and "not a chat model" not in repl.stderr
    assert "(error: chat: the last message (with the system prompt and template) is" in repl.stdout  # reported, and the REPL goes on
    assert repl.stdout.count("助手> ") == 4
    assert "Traceback" not in repl.stderr

    again = run_cli("sft", "-o", str(out), "--resume", "train.max_steps=3")
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["sft", "-o", "X", "--data", "a.jsonl"], "pass --base"),
    (["sft", "--base", "/no/such/run", "--data", "a.jsonl", "-o", "X"], "not a run directory"),
    (["sft", "--base", "BASE", "--data", "DATA@x", "-o", "X"], "weight after @"),
    (["sft", "--base", "BASE", "--data", "BAD", "-o", "X"], "BAD:2:"),
    (["sft", "--base", "BASE", "--data", "DATA", "-o", "X", "--template", "nope"], "nope"),
    (["sft", "--base", "BASE", "--data", "DATA", "-o", "X", "sft.loss_on=first"], "sft.loss_on"),
])
def test_sft_bad_input_is_one_line(base_run, tmp_path, args, message):
    data = write_jsonl(tmp_path / "ok.jsonl", greeting_conversations(4))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(greeting_conversations(1)[0], ensure_ascii=False) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "只有问题"}]}, ensure_ascii=False)
                   + "\n", encoding="utf-8")
    subst = {"BASE": str(base_run), "DATA": data, "DATA@x": data + "@x", "BAD": str(bad),
             "X": str(tmp_path / "out")}
    r = run_cli(*[subst.get(a, a) for a in args])
    assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
    assert message.replace("BAD", str(bad)) in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_chat_prompt_drops_oldest_turns_first(tiny_tokenizer):
    from babyllama.infer.chat import prompt_ids

    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"第{i}个问题：今天天气很好吗？"},
                    {"role": "assistant", "content": f"第{i}个回答：今天天气很好。"}]
    messages = [{"role": "system", "content": "你是助手。"}] + history + [{"role": "user", "content": "最后的问题"}]
    ids, dropped = prompt_ids(tiny_tokenizer, messages, budget=120)
    text = tiny_tokenizer.decode(ids, skip_special_tokens=False)
    assert len(ids) <= 120 and dropped > 0 and dropped % 2 == 0
    assert text.startswith("<|im_start|>system\n你是助手。") and "最后的问题" in text
    assert "第0个问题" not in text and "第11个回答" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_answers_a_message_that_fits_the_context_with_less_room_for_the_answer(tiny_tokenizer):
    """A message longer than the history budget (half the context) but within the context is
    kept alone, never refused; one longer than the context is refused in one line."""
    from babyllama.errors import UserError
    from babyllama.infer.chat import prompt_ids

    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    long = [{"role": "user", "content": "今天天气很好，我们去公园散步。" * 4}]
    ids, dropped = prompt_ids(tiny_tokenizer, history + long, budget=32, limit=127)
    assert 32 < len(ids) <= 127 and dropped == 2
    assert ids == prompt_ids(tiny_tokenizer, long, budget=127)[0]
    with pytest.raises(UserError, match=r"the last message \(with the system prompt and template\) is \d+ "
                                        r"tokens; the prompt can take at most 20"):
        prompt_ids(tiny_tokenizer, long, budget=10, limit=20)


def test_lora_run_keeps_only_the_adapter_and_loads_merged(base_run, tmp_path):
    """A LoRA run stores the adapter (peft layout) and a pointer to its base; loading it, or
    merging it with `babyllama merge-lora`, gives the logits of base + adapter."""
    from babyllama.run import Run
    from babyllama.llm import load
    from babyllama.lora import load_adapter
    from babyllama.model.llama import Llama
    from babyllama.model.weights import load_weights
    from babyllama.train.sft import run_sft

    base_bytes = (base_run / "model.safetensors").read_bytes()
    data = write_jsonl(tmp_path / "greet.jsonl", greeting_conversations(16))
    cfg = sft_cfg(base_run, data, tmp_path / "lora", ["train.max_steps=4", *LORA])
    run = run_sft(cfg)
    assert (run / "adapter_config.json").exists() and (run / "adapter_model.safetensors").exists()
    assert not (run / "model.safetensors").exists()
    assert (base_run / "model.safetensors").read_bytes() == base_bytes
    adapter_cfg = json.loads((run / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["base_model_name_or_path"] == str(base_run.resolve())

    mcfg = Run(run).config().model
    x = torch.tensor([[4, 100, 98, 376, 214, 176, 137]])
    base = Llama(mcfg)
    load_weights(base, base_run / "model.safetensors")
    with torch.no_grad():
        base_logits = base(x)[0]
        adapted = load_adapter(base, run).eval()
        expected = adapted(x)[0]
        assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapter learned something
        torch.testing.assert_close(load(run, device="cpu").model(x)[0], expected, atol=1e-5, rtol=1e-5)

    merged = tmp_path / "merged"
    r = run_cli("merge-lora", str(run), "-o", str(merged))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_model.safetensors").exists()
    assert "\nlora:" not in (merged / "config.yaml").read_text()
    with torch.no_grad():
        torch.testing.assert_close(load(merged, device="cpu").model(x)[0], expected, atol=1e-5, rtol=1e-5)
    assert run_cli("chat", str(run), "--prompt", "你好", "--max-new-tokens", "4").returncode == 0

    # Export needs the merged weights: refused with the way out, then done with --merge.
    refused = run_cli("export", str(run), "--format", "hf", "-o", str(tmp_path / "hf"))
    assert refused.returncode == 2 and "--merge" in refused.stderr and "merge-lora" in refused.stderr
    assert "Traceback" not in refused.stderr
    exported = run_cli("export", str(run), "--format", "hf", "-o", str(tmp_path / "hf"), "--merge")
    assert exported.returncode == 0, exported.stderr[-2000:]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_lora_bad_input_is_one_line(base_run, tmp_path):
    data = write_jsonl(tmp_path / "ok.jsonl", greeting_conversations(4))
    for extra, message in ((["--lora", "lora.r=0"], "lora.r must be a positive integer"),
                           (["--lora", "lora.target_modules=[qkv]"], "matches no layer"),
                           (["lora.qlora=true"], "lora.qlora needs lora.enabled")):
        r = run_cli("sft", "--base", str(base_run), "--data", data, "-o", str(tmp_path / "o"),
                    "train.max_steps=1", *extra)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr[-1500:])
        assert "Traceback" not in r.stderr
    r = run_cli("merge-lora", str(base_run), "-o", str(tmp_path / "m"))
    assert r.returncode == 2 and "not a LoRA run" in r.stderr


def test_several_adapters_on_one_base_switch_by_name(base_run, tmp_path):
    from babyllama.run import Run
    from babyllama.llm import load
    from babyllama.lora import LoraConfig, apply_lora, save_adapter
    from babyllama.model.llama import Llama
    from babyllama.model.weights import load_weights

    mcfg = Run(base_run).config().model
    x = torch.tensor([[4, 100, 98, 376, 214]])
    expected = {}
    for k, name in enumerate(("greet", "math")):
        torch.manual_seed(k)
        model = Llama(mcfg)
        load_weights(model, base_run / "model.safetensors")
        wrapped = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0)).eval()
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.5)  # a nonzero adapter, so switching must show
        with torch.no_grad():
            expected[name] = wrapped(x)[0]
        save_adapter(wrapped, tmp_path / name, base_run)

    llm = load(base_run, device="cpu")
    with torch.no_grad():
        base_logits = llm.model(x)[0]
        assert llm.add_adapter(tmp_path / "greet") == "greet"
        llm.add_adapter(tmp_path / "math")
        assert llm.adapters == ["greet", "math"] and llm.adapter == "math"
        torch.testing.assert_close(llm.model(x)[0], expected["math"], atol=1e-5, rtol=1e-5)
        llm.use_adapter("greet")
        torch.testing.assert_close(llm.model(x)[0], expected["greet"], atol=1e-5, rtol=1e-5)
        llm.use_adapter(None)
        torch.testing.assert_close(llm.model(x)[0], base_logits, atol=1e-6, rtol=1e-6)
    assert isinstance(llm.chat([{"role": "user", "content": "你好"}], max_new_tokens=3), str)
    with pytest.raises(Exception, match="no adapter named 'nope'"):
        llm.use_adapter("nope")

    repl = run_cli("chat", str(base_run), "--adapter", f"g={tmp_path / 'greet'}", "--adapter",
                   str(tmp_path / "math"), "--max-new-tokens", "3",
                   input="/adapter g\n你好\n/adapter base\n/adapter nope\n/quit\n")
    assert repl.returncode == 0, repl.stderr[-2000:]
    assert "(now using g)" in repl.stdout and "(now using the base model)" in repl.stdout
    assert "no adapter named 'nope'" in repl.stdout


def test_chat_with_a_pretrained_run_says_it_is_not_a_chat_model(base_run):
    """A base run only continues text: chat still runs, but says why answers will not come."""
    once = run_cli("chat", str(base_run), "--prompt", "你好", "--max-new-tokens", "4", "--seed", "0")
    assert once.returncode == 0, once.stderr[-2000:]
    assert "is not a chat model" in once.stderr


def test_packed_attention_uses_flex_on_cuda_without_dropout_and_refuses_flex_elsewhere(base_run):
    from babyllama.errors import UserError
    from babyllama.train.sft import sft_config, use_block_mask

    cfg = sft_config(base_run, {"sft": {"sources": ["x.jsonl"]}, "model": {"dropout": 0.0}})
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_block_mask(cfg, cuda) and not use_block_mask(cfg, cpu)
    cfg.model.dropout = 0.1
    assert not use_block_mask(cfg, cuda)  # FlexAttention has no attention dropout
    cfg.model.dropout, cfg.sft.mode = 0.0, "pad"
    assert not use_block_mask(cfg, cuda)  # padded rows need no mask
    cfg.sft.mode, cfg.sft.packed_attention = "pack", "flex"
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        use_block_mask(cfg, cpu)


def test_fsdp_lora_run_resumes_to_the_uninterrupted_adapter(base_run, tmp_path):
    """A sharded LoRA run checkpoints only the adapters and their optimizer state (the frozen
    base is the base run's); stopping after 2 steps and resuming to 4 gives the adapter of 4
    steps straight (a constant rate, so the schedule does not depend on where the run stopped)."""
    import sys

    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "greet.jsonl", greeting_conversations(16))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "babyllama.cli", "sft"]
    common = ["--base", str(base_run), "--data", data, "--lora", "train.strategy=fsdp", "train.device=cpu",
              "train.precision=fp32", "train.schedule=constant", "train.warmup_steps=0", "train.batch_size=2",
              "train.save_every=2", "sft.val_fraction=0", "train.sample_prompts=[]", "lora.dropout=0"]

    def run(*args):
        r = subprocess.run(torchrun + list(args), env=cli_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    run(*common, "-o", str(tmp_path / "straight"), "train.max_steps=4")
    run(*common, "-o", str(tmp_path / "stopped"), "train.max_steps=2")
    run("--resume", "-o", str(tmp_path / "stopped"), "train.max_steps=4")
    a, b = (load_file(str(tmp_path / r / "adapter_model.safetensors")) for r in ("straight", "stopped"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(tmp_path / "stopped" / "resume" / "dcp")).read_metadata().state_dict_metadata
    assert any("lora_A" in k for k in saved) and not any("base_layer" in k for k in saved)
