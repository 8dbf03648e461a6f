"""Greedy decoding speed of one model in every runtime `babyllama export` feeds: our engine,
transformers, onnxruntime and llama.cpp, side by side on the same weights, in one process.

What is measured: batch 1, a `--prompt-tokens` prompt (a Chinese sentence after BOS, cut to
length) and `--new-tokens` greedy tokens with no stop token, so every runtime produces exactly
that many. tok/s = new tokens / wall time of the whole call (prefill included, loading
excluded), median of `--rounds` rounds after one warm-up call per runtime. Rounds alternate the
runtimes (with a short pause before each call, so one runtime's idle spinning threads are
asleep before the next starts), so a shared machine's drifting load hits all of them. Every
runtime gets the same `--threads`: torch.set_num_threads (ours, transformers), onnxruntime's
intra_op_num_threads, llama.cpp's n_threads and n_threads_batch.

    ours          babyllama.load(run) (a random model: the hf export, which it also opens) --
                  weights laid out by `prepare_for_decoding` -- then
                  `complete(..., GenerationConfig(temperature=0), stop_ids=())`
    transformers  AutoModelForCausalLM.from_pretrained(hf export), generate(do_sample=False),
                  its default dynamic KV cache and SDPA attention, eos switched off
    onnxruntime   OnnxLlama(onnx export).greedy(prompt, n, eos_id=None): the numpy loop a
                  user would write around the exported graph (past key/values fed back)
    llama.cpp     llama_cpp.Llama(gguf export).generate(temp=0, repeat_penalty=1): llama.cpp's
                  greedy sampler; f32 KV cache (type_k/type_v=0) for all three weight types,
                  so only the weights differ; reset before each call (no prompt-cache reuse)

The model is a run directory (`--run`, default runs/demo/pretrain when it exists) exported
once per format into a temporary directory, or, with `--preset` (or no run), that preset with
random weights and a byte-level tokenizer trained on the built-in People's Daily corpus
(speed does not depend on training). A random model's logits are nearly flat, so greedy
choices are near-ties that any rounding difference can flip.

How to read the table: "vs ours" > 1 means faster than our engine. "same tokens" is how many
leading tokens equal ours, of N: f32 runtimes should match all (a mismatch means a near-tie
broke differently, or a bug); f16 and q8_0 weights move the logits and may diverge after a
while (reported, not an error). MiB is the weights file as exported (the .gguf files include
the tokenizer). "load s" is the runtime's own loading of that file, once.

    python benchmarks/export_runtimes.py                                # runs/demo/pretrain
    python benchmarks/export_runtimes.py --preset 43m                   # random, vocab 8000
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import available_cores  # noqa: E402

import babyllama  # noqa: E402
from babyllama.infer.config import GenerationConfig  # noqa: E402
from babyllama.infer.generate import complete  # noqa: E402

DEFAULT_RUN = Path("runs/demo/pretrain")
PROMPT_TEXT = "人民日报发表新年献词，迈向充满希望的新世纪。今天天气很好，我们去公园散步。"
GGUF_TYPES = ("f32", "f16", "q8_0")
PAUSE_S = 0.2  # before each timed call: lets the previous runtime's worker threads go idle


@dataclass
class Source:
    model: torch.nn.Module      # our Llama, fp32, plain layout (what the exporters read)
    tokenizer: object
    label: str                  # "demo-cpu (runs/demo/pretrain)" / "43m (random weights)"
    run: Path | None            # the run directory, None for a random model


@dataclass
class Export:
    file: str                   # "hf f32", "onnx", "gguf q8_0"
    path: Path                  # what the runtime opens
    size: int                   # bytes of the weights file(s)
    notes: list[str]            # the exporter's warnings


@dataclass
class Runtime:
    name: str
    export: Export | None       # None: ours from the run directory
    load_s: float
    generate: Callable[[list[int], int], list[int]]   # (prompt ids, n) -> n new ids


# ----------------------------------------------------------------------------------------
# The model and its exports


def demo_tokenizer(vocab_size: int):
    """A byte-level BPE on the first People's Daily documents (seconds; as `babyllama demo`)."""
    from babyllama.data.readers import iter_documents
    from babyllama.tokenizer import train_tokenizer

    docs = itertools.islice(iter_documents("builtin:peoples-daily"), 3000)
    return train_tokenizer(docs, vocab_size, show_progress=False)


def random_source(preset: str, vocab_size: int) -> Source:
    from babyllama.config import load_config
    from babyllama.model.llama import Llama

    cfg = load_config(preset).model
    cfg.vocab_size = vocab_size
    torch.manual_seed(0)
    return Source(Llama(cfg).eval(), demo_tokenizer(vocab_size), f"{preset} (random weights)", None)


def run_source(run: Path) -> Source:
    from babyllama.config import read_run_config
    from babyllama.export.source import load_export_source

    src = load_export_source(run)
    preset = read_run_config(run).preset or "run"
    return Source(src.model, src.tokenizer, f"{preset} ({run})", run)


def export_all(src: Source, out: Path, gguf: bool) -> dict[str, Export]:
    """hf f32, onnx and (when llama.cpp can run them) gguf f32/f16/q8_0, as the CLI writes them."""
    from babyllama.export.gguf import write_gguf
    from babyllama.export.hf import write_hf
    from babyllama.export.onnx import write_onnx

    notes = write_hf(src.model, src.tokenizer, out / "hf", dtype="f32")
    st = out / "hf" / "model.safetensors"
    exports = {"hf": Export("hf f32", out / "hf", st.stat().st_size, notes)}
    onnx = write_onnx(src.model, out / "onnx" / "model.onnx")
    size = sum(p.stat().st_size for p in onnx.parent.glob("model.onnx*"))
    exports["onnx"] = Export("onnx f32", onnx, size, [])
    for dtype in GGUF_TYPES if gguf else ():
        g = write_gguf(src.model, src.tokenizer, out / f"model-{dtype}.gguf", dtype=dtype)
        exports[dtype] = Export(f"gguf {dtype}", g.path, g.size_bytes, list(g.warnings))
    return exports


# ----------------------------------------------------------------------------------------
# The runtimes: each loads its file and returns a greedy (prompt ids, n) -> n new ids


def load_ours(path: Path) -> Callable:
    llm = babyllama.load(path, device="cpu")  # prepare_for_decoding included

    def generate(prompt: list[int], n: int) -> list[int]:
        cfg = GenerationConfig(temperature=0, max_new_tokens=n)
        return complete(llm.model, llm.tokenizer, [prompt], cfg, stop_ids=())[0].ids
    return generate


def load_transformers(path: Path) -> Callable:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" bar
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    hf.generation_config.eos_token_id = None   # no stop token, as for the other runtimes
    hf.generation_config.use_cache = True

    def generate(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        return out[0, len(prompt):].tolist()
    return generate


def load_onnx(path: Path, threads: int) -> Callable:
    from babyllama.export.onnx import OnnxLlama

    session = OnnxLlama(path, threads=threads)
    return lambda prompt, n: session.greedy(prompt, n, eos_id=None)


def load_llama_cpp(path: Path, threads: int, n_ctx: int) -> Callable:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                          n_threads_batch=threads, type_k=0, type_v=0, verbose=False)

    def generate(prompt: list[int], n: int) -> list[int]:
        llm.reset()  # else generate() reuses the cached prompt and skips its prefill
        tokens = llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)
        return list(itertools.islice(tokens, n))
    return generate


def loaded(name: str, export: Export | None, load: Callable[[], Callable]) -> Runtime:
    start = time.perf_counter()
    fn = load()
    return Runtime(name, export, time.perf_counter() - start, fn)


def build_runtimes(src: Source, exports: dict[str, Export], threads: int) -> list[Runtime]:
    ours_path = src.run if src.run is not None else exports["hf"].path
    out = [loaded("ours (torch)", None if src.run else exports["hf"], lambda: load_ours(ours_path))]
    out.append(loaded("transformers", exports["hf"], lambda: load_transformers(exports["hf"].path)))
    out.append(loaded("onnxruntime", exports["onnx"], lambda: load_onnx(exports["onnx"].path, threads)))
    n_ctx = src.model.config.max_position_embeddings
    for dtype in GGUF_TYPES:
        if dtype in exports:
            e = exports[dtype]
            out.append(loaded("llama.cpp", e, lambda e=e: load_llama_cpp(e.path, threads, n_ctx)))
    return out


# ----------------------------------------------------------------------------------------
# Measuring and printing


def make_prompt(tokenizer, length: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_TEXT)
    while len(ids) < length - 1:
        ids += tokenizer.encode(PROMPT_TEXT)
    return [tokenizer.bos_id] + ids[:length - 1]


def measure(runtimes: list[Runtime], prompt: list[int], n: int, rounds: int
            ) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Each runtime's greedy tokens (from its warm-up call) and its median seconds per call."""
    key = lambda rt: f"{rt.name} {rt.export.file if rt.export else ''}"  # noqa: E731
    tokens = {key(rt): rt.generate(prompt, n) for rt in runtimes}
    times = {key(rt): [] for rt in runtimes}
    for _ in range(rounds):
        for rt in runtimes:
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            rt.generate(prompt, n)
            times[key(rt)].append(time.perf_counter() - start)
    return tokens, {k: statistics.median(v) for k, v in times.items()}


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def print_table(runtimes: list[Runtime], tokens: dict, seconds: dict, n: int) -> None:
    keys = [f"{rt.name} {rt.export.file if rt.export else ''}" for rt in runtimes]
    ours_rate = n / seconds[keys[0]]
    print(f"{'runtime':<14} {'file':<10} {'MiB':>6} {'load s':>7} {'tok/s':>7} {'vs ours':>8} "
          f"{'same tokens':>12}")
    for rt, k in zip(runtimes, keys):
        file, mib = (rt.export.file, f"{rt.export.size / 2**20:.1f}") if rt.export else ("run", "-")
        rate = n / seconds[k]
        got = tokens[k]
        same = f"{same_prefix(got, tokens[keys[0]])}/{n}" + ("" if len(got) == n else f" (got {len(got)})")
        print(f"{rt.name:<14} {file:<10} {mib:>6} {rt.load_s:>7.2f} {rate:>7,.0f} "
              f"{rate / ours_rate:>7.2f}x {same:>12}", flush=True)


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    for module in ("transformers", "onnxruntime", "llama_cpp"):
        try:
            out.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    return ", ".join(out)


def have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None,
                    help=f"run directory to export (default: {DEFAULT_RUN} if it exists)")
    ap.add_argument("--preset", default=None, help="a preset with random weights instead of a run")
    ap.add_argument("--vocab-size", type=int, default=8000, help="for --preset")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    run = args.run or (DEFAULT_RUN if args.preset is None and DEFAULT_RUN.exists() else None)
    src = run_source(run) if run else random_source(args.preset or "demo-cpu", args.vocab_size)
    context = src.model.config.max_position_embeddings
    if args.prompt_tokens + args.new_tokens > context:
        ap.error(f"prompt {args.prompt_tokens} + {args.new_tokens} new tokens exceed the "
                 f"model's context of {context}")
    prompt = make_prompt(src.tokenizer, args.prompt_tokens)
    gguf = have_llama_cpp()
    with tempfile.TemporaryDirectory(prefix="export-runtimes-") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # exporter chatter; real problems are in `notes`
            exports = export_all(src, Path(tmp), gguf)
        runtimes = build_runtimes(src, exports, args.threads)
        params = sum(p.numel() for p in src.model.parameters())
        print(f"{src.label}: {params / 1e6:.2f}M params, vocab {src.model.config.vocab_size:,}; "
              f"batch 1, prompt {len(prompt)} + {args.new_tokens} new tokens, {args.threads} threads "
              f"on {available_cores()} cores, median of {args.rounds} rounds, "
              f"load {os.getloadavg()[0]:.1f}")
        print(versions())
        tokens, seconds = measure(runtimes, prompt, args.new_tokens, args.rounds)
        print_table(runtimes, tokens, seconds, args.new_tokens)
    if not gguf:
        print("llama.cpp: skipped (llama_cpp does not import): pip install llama-cpp-python")
    for e in exports.values():
        for note in e.notes:
            print(f"note ({e.file}): {note}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
