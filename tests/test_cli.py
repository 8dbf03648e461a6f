"""The command line: every subcommand's --help, and bad input ending in one clear line."""

from __future__ import annotations

import json
import subprocess

import pytest

from babyllama.cli import build_parser
from conftest import TINY_MODEL, TINY_TRAIN, babyllama_cmd, cli_env


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(babyllama_cmd() + [str(a) for a in args], env=cli_env(), capture_output=True,
                          text=True, timeout=300, **kw)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def command_lines(parser, path=()) -> list[list[str]]:
    """Every command and action the parser knows, e.g. ["clean"], ["tokenizer"], ["tokenizer", "train"]:
    taken from the parser so that a new command is checked without being listed here."""
    found = []
    for action in parser._actions:
        if isinstance(action.choices, dict):  # argparse's subcommands: name -> its parser
            for name, sub in action.choices.items():
                found.append([*path, name])
                found += command_lines(sub, (*path, name))
    return found


def test_command_lines_come_from_the_parser():
    lines = command_lines(build_parser())
    for expected in (["sft"], ["chat"], ["merge-lora"], ["tokenizer", "trim"], ["model", "info"]):
        assert expected in lines


@pytest.mark.parametrize("sub", command_lines(build_parser()), ids=" ".join)
def test_every_subcommand_has_help(sub):
    result = run(sub + ["--help"])
    assert result.returncode == 0 and "usage: babyllama" in result.stdout


def test_model_info_prints_the_seeds_parameter_counts():
    out = run(["model", "info", "92m"]).stdout
    assert "91,019,520" in out and "embedding" in out and "lm_head" in out
    out = run(["model", "info", "43m", "--vocab-size", "64789"]).stdout
    assert "(43.4M)" in out
    tied = run(["model", "info", "43m", "--vocab-size", "64789", "--tied"]).stdout
    assert "tied" in tied and "(26.8M)" in tied


def test_vocab_size_sweep_trains_each_size_and_prints_the_table(corpus_file, tmp_path):
    result = run(["tokenizer", "train", corpus_file, "--vocab-size", "300,400", "--preset", "demo-cpu",
                  "-o", tmp_path / "sweep"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| bpe-300 | 300 |" in result.stdout and "| bpe-400 | 400 |" in result.stdout
    assert (tmp_path / "sweep" / "vocab-400" / "tokenizer.json").exists()
    report = run(["tokenizer", "report", tmp_path / "sweep" / "vocab-400", corpus_file, "--preset", "demo-cpu"])
    assert report.returncode == 0 and "| characters / token |" in report.stdout, report.stderr[-2000:]
    assert_one_line_error(run(["tokenizer", "trim", tmp_path / "sweep" / "vocab-400", corpus_file, "-o",
                               tmp_path / "t"]), "SentencePiece")
    bad = run(["tokenizer", "train", corpus_file, "--vocab-size", "300,abc", "-o", tmp_path / "x"])
    assert bad.returncode == 2 and "300,abc" in bad.stderr


def test_missing_file_names_the_file(tmp_path, tiny_data):
    missing = tmp_path / "nope.txt"
    assert_one_line_error(run(["prepare", missing, "--tokenizer", tiny_data / "tokenizer", "-o", tmp_path / "o"]),
                          "nope.txt")
    assert_one_line_error(run(["tokenizer", "train", missing, "-o", tmp_path / "t"]), "nope.txt")


def test_empty_corpus_is_refused(tmp_path, tiny_data):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    assert_one_line_error(run(["prepare", empty, "--tokenizer", tiny_data / "tokenizer", "-o", tmp_path / "o"]),
                          "empty")
    assert not (tmp_path / "o").exists()


def test_non_utf8_file_names_file_and_line(tmp_path, tiny_data):
    bad = tmp_path / "gbk.txt"
    bad.write_bytes("第一行\n".encode() + "中文".encode("gbk") + b"\n")
    assert_one_line_error(run(["prepare", bad, "--tokenizer", tiny_data / "tokenizer", "-o", tmp_path / "o"]),
                          "gbk.txt:2")


def test_malformed_json_line_stops_before_training_unless_skipped(tmp_path, tiny_data):
    src = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"第{i}条新闻，今天天气很好。"}, ensure_ascii=False) for i in range(30)]
    lines[4] = '{"text": "broken'
    lines[9] = '{"title": "no text field"}'
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = tiny_data / "tokenizer"
    assert_one_line_error(run(["prepare", src, "--tokenizer", tok, "-o", tmp_path / "o"]), "docs.jsonl:5")
    assert not (tmp_path / "o").exists()
    skipped = run(["prepare", src, "--tokenizer", tok, "-o", tmp_path / "o", "--skip-bad-records"])
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert sum(s["n_documents"] for s in meta["splits"].values()) == 28
    assert meta["bad_records"]["count"] == 2
    assert "2 bad records skipped" in skipped.stdout and "docs.jsonl:5" in skipped.stdout


@pytest.mark.parametrize("override, needles", [
    ("train.lrr=1e-3", ["unknown config key 'train.lrr'", "did you mean train.lr"]),
    ("model.num_attention_heads=5", ["must divide model.hidden_size"]),
    ("train.batch_size=many", ["train.batch_size must be int"]),
    ("train.precision=fp8", ["train.precision must be one of"]),
])
def test_bad_config_values_are_one_line_errors(tiny_data, tmp_path, override, needles):
    result = run(["pretrain", "--preset", "demo-cpu", "--data", tiny_data, "-o", tmp_path / "r", override])
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "r").exists()


def test_config_file_with_unknown_key_names_the_file(tiny_data, tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("model:\n  hidden_size: 64\n  num_layers: 2\n", encoding="utf-8")
    assert_one_line_error(run(["pretrain", "-c", cfg, "--data", tiny_data, "-o", tmp_path / "r"]),
                          "my.yaml", "model.num_layers", "num_hidden_layers")


def test_vocab_smaller_than_the_special_tokens_is_refused(corpus_file, tmp_path):
    assert_one_line_error(run(["tokenizer", "train", corpus_file, "--vocab-size", "100", "-o", tmp_path / "t"]),
                          "100")


def test_unknown_preset_lists_the_presets(tiny_data, tmp_path):
    assert_one_line_error(run(["pretrain", "--preset", "huge", "--data", tiny_data, "-o", tmp_path / "r"]),
                          "huge", "demo-cpu", "92m")


def test_pipeline_through_the_cli_then_generate(corpus_file, tmp_path):
    """tokenizer train -> prepare -> pretrain -> generate, as a user types them."""
    tok, data, out = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    assert run(["tokenizer", "train", corpus_file, "--vocab-size", "350", "-o", tok]).returncode == 0
    prep = run(["prepare", corpus_file, "--tokenizer", tok, "-o", data, "--val-fraction", "0.1"])
    assert prep.returncode == 0, prep.stderr[-2000:]
    assert "train:" in prep.stdout and "val:" in prep.stdout
    train = run(["pretrain", "--preset", "demo-cpu", "--data", data, "-o", out] + TINY_MODEL + TINY_TRAIN
                + ["train.max_steps=40", "train.sample_every=40", "train.sample_prompts=[今天]",
                   f"train.eval_tasks=[{{task: lm, data: {corpus_file}, limit: 20}}]"])
    assert train.returncode == 0, train.stderr[-2000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("lm-corpus/ppl" in r and r["step"] == 40 for r in logged)  # train.eval_tasks ran
    assert (out / "eval" / "lm-corpus.md").exists()
    assert "resolved config" in train.stdout and "num_hidden_layers: 2" in train.stdout
    assert (out / "samples.txt").read_text(encoding="utf-8").startswith("## step 40\n今天|")
    gen = run(["generate", out, "--prompt", "今天", "--temperature", "0", "--max-new-tokens", "12"])
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("今天") and len(gen.stdout.strip()) > 2
    again = run(["generate", out, "--prompt", "今天", "--temperature", "0", "--max-new-tokens", "12"])
    assert again.stdout == gen.stdout  # greedy is deterministic
    left = run(["generate", out, "--prompt", "今天", "--temperature", "0", "--max-new-tokens", "12",
                "--truncate-left"])
    assert left.stdout == gen.stdout  # a prompt that fits is never cut
    both = run(["generate", out, "--prompt", "今天", "--prompt", "中国", "--temperature", "0",
                "--max-new-tokens", "12"])  # one batch, the same greedy text per prompt
    assert both.returncode == 0 and both.stdout.splitlines()[0] == gen.stdout.splitlines()[0]
    beams = run(["generate", out, "--prompt", "今天", "--num-beams", "3", "--num-return-sequences", "2",
                 "--no-repeat-ngram-size", "2", "--max-new-tokens", "8"])
    assert beams.returncode == 0 and beams.stdout.startswith("[1] 今天") and "\n[2] 今天" in beams.stdout
    assert_one_line_error(run(["generate", out, "--prompt", "今天" * 80]), "--truncate-left")
    assert_one_line_error(run(["generate", out, "--prompt", "x", "--top-p", "0"]), "top_p must be in")
    assert_one_line_error(run(["generate", tmp_path / "nothing", "--prompt", "x"]), "nothing")
    assert_one_line_error(run(["generate", out, "--prompt", "x", "--device", "gpu0"]), "not a device name")
    assert_one_line_error(run(["generate", out, "--prompt", "x", "--num-return-sequences", "0"]),
                          "num_return_sequences must be at least 1")
    ev = run(["eval", out, "--task", "lm", "--data", data, "--stride", "16"])
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "| documents | tokens | loss | perplexity |" in ev.stdout
    saved = json.loads((out / "eval" / "lm-data.json").read_text(encoding="utf-8"))
    assert saved["settings"] == {"stride": 16, "context": 64, "split": "val"} and saved["metrics"]["ppl"] > 1
    assert_one_line_error(run(["eval", out, "--task", "lm", "--data", tmp_path / "absent.txt"]), "absent.txt")
    gguf = run(["export", out, "--format", "gguf", "--dtype", "q8_0", "-o", tmp_path / "gguf"])
    assert gguf.returncode == 0 and (tmp_path / "gguf" / "run-q8_0.gguf").exists(), gguf.stderr[-2000:]
    assert "as gguf" in gguf.stdout and "MiB" in gguf.stdout
    onnx = run(["export", out, "--format", "onnx", "-o", tmp_path / "onnx"])
    assert onnx.returncode == 0, onnx.stderr[-2000:]
    assert {"model.onnx", "tokenizer.json", "config.json"} <= {p.name for p in (tmp_path / "onnx").iterdir()}
    assert_one_line_error(run(["export", out, "--format", "gguf", "--dtype", "q4_0", "-o", tmp_path / "x"]),
                          "--dtype q4_0", "f16, f32, q8_0")
    assert_one_line_error(run(["export", out, "--format", "tflite", "-o", tmp_path / "x"]), "hf, gguf, onnx")
    assert_one_line_error(run(["eval", out, "--task", "generation", "--data", corpus_file, "--top-k", "-1"]),
                          "top_k")


def test_decoding_flags_default_to_the_one_table(tmp_path):
    """`generate` and `chat` flags default to their rows of DECODING_DEFAULTS; `eval` leaves every
    flag unset, so each task's own row applies."""
    from dataclasses import asdict

    from babyllama.cli import build_parser
    from babyllama.cli.decoding import sampling_kwargs
    from babyllama.cli.eval import eval_options
    from babyllama.infer.config import decoding_defaults

    parser = build_parser()
    for argv, kind in ((["generate", "RUN", "--prompt", "x"], "plain"), (["chat", "RUN"], "chat")):
        settings = sampling_kwargs(parser.parse_args(argv))
        expected = asdict(decoding_defaults(kind))
        assert settings == {k: expected[k] for k in settings}, kind
        assert set(expected) - set(settings) <= {"early_stopping", "num_return_sequences", "seed"}
    assert decoding_defaults("plain").max_new_tokens == 100 and decoding_defaults("chat").top_k == 50
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "你好", "text": "正文", "summary": "摘要"}\n', encoding="utf-8")
    for task, kind in (("rouge", "eval-rouge"), ("generation", "eval-generation")):
        args = parser.parse_args(["eval", "RUN", "--task", task, "--data", str(prompts)])
        _, options = eval_options(args, chat=False)
        assert options.generation == decoding_defaults(kind), task
    args = parser.parse_args(["eval", "RUN", "--task", "rouge", "--data", str(prompts), "--max-new-tokens", "9"])
    assert eval_options(args, chat=False)[1].generation == decoding_defaults("eval-rouge", max_new_tokens=9)


def test_missing_data_and_empty_corpora_are_named(tmp_path, capsys):
    """`pretrain --data` naming no directory says so (not "no tokenizer/ next to the data"), and
    training a tokenizer on an empty corpus is an error, as prepare's is."""
    from babyllama.cli import main

    assert main(["pretrain", "--preset", "demo-cpu", "--data", str(tmp_path / "nodata"),
                 "-o", str(tmp_path / "run")]) == 2
    assert "nodata: no such directory (expected a dataset made by prepare)" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    assert main(["tokenizer", "train", str(empty), "--vocab-size", "300", "-o", str(tmp_path / "tok")]) == 2
    assert "empty corpus" in capsys.readouterr().err and not (tmp_path / "tok").exists()


def test_resume_says_a_restated_preset_or_config_file_is_not_read(tmp_path, capsys):
    """`pretrain --preset P ... --resume` (the original command restated) continues the run with
    its own config.yaml, and says so rather than ignoring the preset without a word."""
    from babyllama.cli import build_parser
    from babyllama.cli.pretrain import build_config
    from babyllama.config import load_config
    from babyllama.run import Run

    saved = load_config("demo-cpu", ["model.hidden_size=64", "train.max_steps=40"])
    Run(tmp_path / "run").write_config(saved)
    args = build_parser().parse_args(["pretrain", "--preset", "43m", "-o", str(tmp_path / "run"),
                                      "--resume", "train.max_steps=50"])
    cfg = build_config(args)
    assert cfg.model.hidden_size == 64 and cfg.train.max_steps == 50
    assert "note: --preset 43m is not read when resuming" in capsys.readouterr().err


def test_overrides_after_sft_data_files_are_overrides_not_files():
    """argparse hands `--data a.json train.max_steps=8` both words; the override must not be
    taken for a file (nor be dropped on --resume)."""
    from babyllama.cli.runs import split_overrides

    assert split_overrides(["a.json", "dir/b=c.jsonl", "train.max_steps=8", "sft.epochs=2"]) == (
        ["a.json", "dir/b=c.jsonl"], ["train.max_steps=8", "sft.epochs=2"])
    assert split_overrides(None) == ([], [])
