"""`babyllama serve` under load: continuous batching against one request at a time, side by
side with llama.cpp's OpenAI server on our GGUF export of the same weights, and a mixed load of
valid and malformed requests.

What is measured, per model (`--configs`, random weights, or trained runs given with `--run`):

    ours, batch N   `babyllama serve RUN` (default --max-batch 16)
    ours, batch 1   `babyllama serve RUN --max-batch 1`: one request at a time
    llama.cpp       `python -m llama_cpp.server` on `babyllama export RUN --format gguf --dtype f32`
                    (same fp32 weights), --interrupt_requests False: it runs one request at a
                    time (an asyncio lock around the one llama_cpp.Llama), the others wait
    llama.cpp       the same server with its default --interrupt_requests True: a request that
      default       arrives while another streams ends that stream early (`data: [DONE]` with
                    no finish_reason); measured briefly to show what a client gets

The load: `--clients` concurrent clients (asyncio, a small HTTP/1.1 client written here, no
dependency), each sending streaming requests back to back for `--seconds`: a Chinese prompt
(one of PROMPTS, drawn per request), `max_tokens` fixed, temperature 0.8,
`stream_options.include_usage` (our server then reports exact completion_tokens; llama.cpp's
ignores it, and there a request that ends with finish_reason "length" made exactly max_tokens
tokens, and otherwise its content chunks are counted, one per token). At the deadline the
requests in flight are cut (their connections closed); the content chunks they had received
count as tokens.

    tok/s            generated tokens / window: completed requests' completion tokens plus the
                     chunks of the requests cut at the deadline
    TTFT             from sending a request to its first content chunk (queueing included: with
                     one request at a time, a client waits for the others' answers). A request
                     cut before its first token counts as longer than any: a percentile that
                     falls on such requests is shown as ">Xs"
    inter-chunk      time between consecutive content chunks of one request (the per-token
                     latency a reader sees; a chunk may carry more than one token)
    errors           a non-200 answer, an error event in the stream, a stream that ended without
                     `data: [DONE]`, a connection failure
    truncated        a stream that ended with [DONE] but no finish_reason on its choice

The mixed load: a server on the first model with --api-key, 200 requests at once (`--mixed`),
50 of them malformed (`--malformed`: invalid JSON, wrong types, out-of-range values, an unknown
model, a prompt longer than the context, a body over 1 MiB, a missing or wrong API key, ...),
shuffled in. Valid requests may get 429 (the server's --max-queue, default 64, is smaller than
the burst). Counted by status; no 5xx is the requirement; then /health and a normal request must
still answer. Then edge cases one at a time (huge seed, NaN, lone surrogates, prompts at the
context limit, n = --max-batch, ...), each a 200 or a 4xx, never a 5xx, while a few background
clients stream ordinary requests: a request that breaks the engine step breaks theirs too.

The random-weight runs keep each preset's vocabulary size, since at this scale the LM head is
much of a decoding step: demo-cpu (8,000) gets a byte-level BPE of 8,000 trained on the built-in
corpus, as `babyllama demo` trains; 43m (64,789) the ChatGLM2 tokenizer from
../shared/data/tokenizers it was sized for (64,802 pieces with its appended specials), or the
trained one when that is absent. `--tokenizer train` or a tokenizer path applies to every preset.

Both servers use the machine's cores (torch's default threads; llama.cpp --n_threads and
--n_threads_batch set to the same number, `--threads`). The clients run in this process on the
same machine. Timing on a shared machine is noisy: compare ratios within one run. When other
processes keep the cores busy, torch's OpenMP threads spin-wait against them and our steps can
slow down many times over (llama.cpp much less so); `--server-env OMP_WAIT_POLICY=PASSIVE`
shows whether that is what happened.

    python benchmarks/serve_load.py                            # demo-cpu and 43m, 16 clients, 30 s
    python benchmarks/serve_load.py --quick                    # a smoke check (~2 minutes)
    python benchmarks/serve_load.py --run runs/demo/pretrain --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import available_cores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_TOKENIZERS = [REPO.parent / "shared" / "data" / "tokenizers" / name / "tokenizer.model"
                     for name in ("chatglm2", "chinese-llama2")]
HOST = "127.0.0.1"
API_KEY = "serve-load-key"
TEMPERATURE = 0.8
PROMPTS = [
    "请介绍一下北京的历史和文化。",
    "写一首关于春天的短诗。",
    "为什么天空是蓝色的？请用简单的话解释。",
    "人民日报发表新年献词，迈向充满希望的新世纪。请续写这段话。",
    "如何学习一门新的编程语言？给我三条建议。",
    "今天天气很好，我们去公园散步，然后",
    "请把下面这句话翻译成英文：我喜欢在周末读书。",
    "长江是中国最长的河流，它发源于",
]
READY_TIMEOUT_S = 180


# ----------------------------------------------------------------------------------------
# A minimal asyncio HTTP/1.1 client (one connection per request) and an SSE parser


EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SSE:
    """Splits a byte stream into server-sent events and hands each `data:` payload on."""

    def __init__(self, on_data):
        self.buf = b""
        self.on_data = on_data

    def feed(self, data: bytes) -> None:
        self.buf += data
        while (m := EVENT_END.search(self.buf)) is not None:
            event, self.buf = self.buf[:m.start()], self.buf[m.end():]
            payload = [line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")]
            if payload:   # not a comment (": ping") or another field alone
                self.on_data(b"\n".join(payload).decode("utf-8", "replace"))


async def http(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
               on_status=None, on_data=None, chunked_upload: bool = False) -> tuple[int, bytes]:
    """(status, body). `on_status(status)` is called once the status line is read; with
    `on_data`, body parts go there as they arrive (the returned body is then empty)."""
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 22)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        payload = body
        if method == "POST" and chunked_upload:
            head.append("Transfer-Encoding: chunked")
            step = 1 << 16
            payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step])
                               for i in range(0, len(body), step)) + b"0\r\n\r\n"
        elif method == "POST":
            head.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        try:
            await writer.drain()
        except ConnectionError:
            pass   # the server may answer (413) and close before reading the whole body
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("connection closed before a response")
        status = int(status_line.split()[1])
        if on_status is not None:
            on_status(status)
        hdrs = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            hdrs[k.strip().lower()] = v.strip()
        parts: list[bytes] = []
        sink = on_data or parts.append
        if "chunked" in hdrs.get("transfer-encoding", ""):
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                sink(await reader.readexactly(size))
                await reader.readexactly(2)
        elif "content-length" in hdrs:
            sink(await reader.readexactly(int(hdrs["content-length"])))
        else:
            sink(await reader.read())
        return status, b"".join(parts)
    finally:
        writer.close()


def json_headers(api_key: str | None) -> dict:
    h = {"Content-Type": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


@dataclass
class Result:
    """One request as the client saw it."""
    start: float
    kind: str = "valid"
    status: int | None = None
    first: float | None = None          # first content chunk
    times: list[float] = field(default_factory=list)   # every content chunk's arrival
    usage: int | None = None            # completion_tokens of the usage chunk / answer
    finish: str | None = None
    done: bool = False                  # saw data: [DONE] (or a whole JSON answer)
    error: str | None = None
    cut: bool = False                   # cut at the deadline
    end: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None


def request_body(endpoint: str, prompt: str, max_tokens: int, stream: bool = True, **extra) -> dict:
    body = {"max_tokens": max_tokens, "temperature": TEMPERATURE, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body | extra


def path_of(endpoint: str) -> str:
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


def on_event(r: Result, data: str) -> None:
    """One SSE `data:` payload of a streamed answer."""
    if data == "[DONE]":
        r.done = True
        return
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        r.error = f"bad SSE data: {data[:80]}"
        return
    if "error" in obj:
        r.error = f"error event: {json.dumps(obj['error'], ensure_ascii=False)[:200]}"
        return
    for choice in obj.get("choices") or []:
        text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
        if text:
            now = time.perf_counter()
            r.first = r.first or now
            r.times.append(now)
        if choice.get("finish_reason"):
            r.finish = choice["finish_reason"]
    if obj.get("usage"):
        r.usage = obj["usage"].get("completion_tokens")


async def send(port: int, path: str, body: bytes, r: Result, headers: dict, stream: bool,
               chunked_upload: bool = False) -> None:
    """Send one request and fill `r` as its answer arrives (a cut request keeps what it got)."""
    raw: list[bytes] = []
    sse = SSE(lambda data: on_event(r, data))

    def on_status(status: int) -> None:
        r.status = status

    def on_data(part: bytes) -> None:
        (sse.feed if stream and r.status == 200 else raw.append)(part)

    try:
        await http(port, "POST", path, body, headers, on_status, on_data, chunked_upload)
    finally:
        r.end = time.perf_counter()
    if stream and r.status == 200:
        if not r.done and r.error is None:
            r.error = "the stream ended without data: [DONE]"
        return
    text = b"".join(raw)
    if r.status != 200:
        r.error = text.decode("utf-8", "replace")[:300]
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        r.error = f"not JSON: {text[:80]!r}"
        return
    if "error" in obj or not obj.get("choices"):
        r.error = f"no choices: {text[:200]!r}"
        return
    r.done = True
    r.usage = (obj.get("usage") or {}).get("completion_tokens")
    r.finish = obj["choices"][0].get("finish_reason")


# ----------------------------------------------------------------------------------------
# The servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def babyllama_cli() -> list[str]:
    exe = Path(sys.executable).parent / "babyllama"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("babyllama")
    if found:
        return [found]
    raise SystemExit("the babyllama command is not installed next to this Python (pip install -e .)")


class Server:
    """A server subprocess (its output in `log`), ready once GET `ready_path` answers 200."""

    def __init__(self, label: str, cmd: list[str], port: int, log: Path, ready_path: str,
                 api_key: str | None = None):
        self.label, self.cmd, self.port, self.log_path = label, cmd, port, log
        self.ready_path, self.api_key = ready_path, api_key
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=os.environ | self.env)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{HOST}:{self.port}{self.ready_path}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                req = urllib.request.Request(url, headers=json_headers(self.api_key))
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.label} not ready after {timeout:.0f} s:\n{self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                print(f"  ({self.label} did not stop 20 s after SIGTERM: killed)")
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    def tail(self, n: int = 15) -> str:
        if not self.log.closed:
            self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in lines[-n:])

    def problems(self) -> list[str]:
        """Log lines that look like a fault (a traceback, an ERROR line, a 5xx access line)."""
        if not self.log.closed:
            self.log.flush()
        pattern = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|Exception|\" 5\d\d\b|internal error")
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if pattern.search(line)]


def ours_server(run: Path, label: str, max_batch: int, logs: Path, env: dict[str, str],
                api_key: str | None = None) -> Server:
    port = free_port()
    cmd = babyllama_cli() + ["serve", str(run), "--host", HOST, "--port", str(port),
                             "--max-batch", str(max_batch), "--log-level", "warning"]
    if api_key:
        cmd += ["--api-key", api_key]
    server = Server(label, cmd, port, logs / f"{label.replace(' ', '_')}.log", "/health", api_key)
    server.env = dict(env)
    return server


def llama_cpp_server(gguf: Path, label: str, context: int, threads: int, logs: Path,
                     interrupt: bool) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", HOST,
           "--port", str(port), "--n_ctx", str(context), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--chat_format", "chatml",
           "--interrupt_requests", str(interrupt), "--verbose", "False"]
    return Server(label, cmd, port, logs / f"{label.replace(' ', '_').replace('=', '-')}.log",
                  "/v1/models")


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python's server cannot run here, or None."""
    for module, pip_name in (("llama_cpp", "llama-cpp-python"), ("sse_starlette", "sse-starlette"),
                             ("starlette_context", "starlette-context"),
                             ("pydantic_settings", "pydantic-settings")):
        if importlib.util.find_spec(module) is None:
            return f"{module} does not import: pip install {pip_name} (or 'llama-cpp-python[server]')"
    return None


def versions() -> str:
    out = [f"python {sys.version.split()[0]}"]
    for dist in ("torch", "babyllama", "fastapi", "uvicorn", "llama_cpp_python", "sse-starlette",
                 "starlette-context", "pydantic-settings"):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


# ----------------------------------------------------------------------------------------
# The models


def pick_tokenizer(spec: str, vocab_size: int):
    """(tokenizer, description): a tokenizer.model / directory, or 'auto' (for a preset's
    `vocab_size` up to 16,000 a trained one, above it the first shared SentencePiece tokenizer
    there is), or 'train' (a byte-level BPE of 8,000 on the built-in People's Daily corpus, as
    `babyllama demo` trains)."""
    from babyllama.tokenizer import Tokenizer

    if spec == "auto":
        spec = "train" if vocab_size <= 16000 else next((str(p) for p in SHARED_TOKENIZERS if p.is_file()), "train")
    if spec != "train":
        return Tokenizer.load(spec), spec
    import itertools

    from babyllama.data.readers import iter_documents
    from babyllama.tokenizer import train_tokenizer

    docs = itertools.islice(iter_documents("builtin:peoples-daily"), 3000)
    return train_tokenizer(docs, 8000, show_progress=False), "byte-level BPE 8000 (People's Daily)"


def build_run(preset: str, tokenizer, out: Path) -> Path:
    """A plain run of `preset` with random weights and `tokenizer` (vocab set to its size)."""
    import torch

    from babyllama.config import load_config
    from babyllama.model.llama import Llama
    from babyllama.run import Run

    cfg = load_config(preset)
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = Llama(cfg.model).eval()
    Run(out).write_plain_run(model, tokenizer, cfg)
    return out


def run_info(run: Path) -> tuple[int, int, int]:
    """(parameters, vocab, context) of a run."""
    from babyllama.run import Run

    c = Run(run).model_config()
    d, f, v, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    kv = c.num_key_value_heads or c.num_attention_heads
    attn = d * d * 2 + 2 * d * (d // c.num_attention_heads) * kv
    params = v * d * (1 if c.tie_word_embeddings else 2) + L * (attn + 3 * d * f + 2 * d) + d
    return params, v, c.max_position_embeddings


def export_gguf(run: Path, path: Path) -> str | None:
    """`babyllama export RUN --format gguf --dtype f32 -o path`; the error, or None."""
    proc = subprocess.run(babyllama_cli() + ["export", str(run), "--format", "gguf", "--dtype", "f32",
                                             "-o", str(path)], capture_output=True, text=True)
    if proc.returncode != 0 or not path.exists():
        return (proc.stderr or proc.stdout).strip()[-500:] or f"exit {proc.returncode}"
    return None


# ----------------------------------------------------------------------------------------
# The load


async def drain(port: int, endpoint: str, api_key: str | None = None, timeout: float = 180) -> str | None:
    """A 1-token request, waited for: the server is idle afterwards (both serve first come,
    first served). Returns a problem, or None."""
    body = json.dumps(request_body(endpoint, PROMPTS[0], 1, stream=False)).encode()
    r = Result(time.perf_counter())
    try:
        await asyncio.wait_for(send(port, path_of(endpoint), body, r, json_headers(api_key), False), timeout)
    except asyncio.TimeoutError:
        return f"no answer to a 1-token request within {timeout:.0f} s (hang?)"
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None if r.ok else f"status {r.status}: {r.error}"


async def load(port: int, endpoint: str, clients: int, seconds: float, max_tokens: int, seed: int,
               api_key: str | None = None) -> list[Result]:
    """`clients` clients sending streamed requests back to back for `seconds`; the requests in
    flight at the deadline are cut."""
    deadline = time.perf_counter() + seconds
    results: list[Result] = []
    headers = json_headers(api_key)

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while (left := deadline - time.perf_counter()) > 0:
            body = json.dumps(request_body(endpoint, rng.choice(PROMPTS), max_tokens)).encode()
            r = Result(time.perf_counter())
            results.append(r)
            try:
                await asyncio.wait_for(send(port, path_of(endpoint), body, r, headers, True), left)
            except asyncio.TimeoutError:
                r.cut = not r.done
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                r.error = f"{type(e).__name__}: {e}"
            if not r.ok and not r.cut:
                await asyncio.sleep(0.2)   # an error: do not spin

    await asyncio.gather(*(client(i) for i in range(clients)))
    return results


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)]


@dataclass
class Stats:
    requests: int
    done: int
    cut: int
    errors: int
    truncated: int
    tokens: int
    seconds: float
    ttft: list[float]
    gaps: list[float]
    usage_mismatch: int
    error_examples: list[str]

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def summarize(results: list[Result], seconds: float, max_tokens: int) -> Stats:
    done = [r for r in results if r.ok]
    cut = [r for r in results if r.cut and r.error is None]
    errors = [r for r in results if not r.ok and not (r.cut and r.error is None)]
    tokens = 0
    mismatch = 0
    for r in done:
        if r.usage is not None:
            tokens += r.usage
            mismatch += r.finish == "length" and r.usage != max_tokens
        elif r.finish == "length":
            tokens += max_tokens
        else:
            tokens += len(r.times)
    tokens += sum(len(r.times) for r in cut)
    ttft = [(r.first - r.start) if r.first else math.inf for r in done + cut if r.first or r.cut]
    gaps = [b - a for r in done + cut for a, b in zip(r.times, r.times[1:])]
    examples = [f"status {r.status}: {r.error}" for r in errors[:3]]
    return Stats(len(results), len(done), len(cut), len(errors),
                 sum(1 for r in done if r.finish is None), tokens, seconds, ttft, gaps, mismatch, examples)


def fmt_s(v: float | None, window: float) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return f">{window:.0f}s"
    return f"{v:.2f}s"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


HEADER = (f"{'model':<10} {'server':<26} {'reqs':>5} {'done':>5} {'cut':>4} {'err':>4} {'trunc':>5} "
          f"{'tok/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} {'chunk p50':>10} {'chunk p95':>10}")


def row(model: str, server: str, s: Stats) -> str:
    return (f"{model:<10} {server:<26} {s.requests:>5} {s.done:>5} {s.cut:>4} {s.errors:>4} "
            f"{s.truncated:>5} {s.rate:>7.1f} {fmt_s(pct(s.ttft, .5), s.seconds):>9} "
            f"{fmt_s(pct(s.ttft, .95), s.seconds):>9} {fmt_ms(pct(s.gaps, .5)):>8}ms "
            f"{fmt_ms(pct(s.gaps, .95)):>8}ms")


# ----------------------------------------------------------------------------------------
# One model: ours batch N, ours batch 1, llama.cpp (serial, then default)


def measure_model(label: str, run: Path, args, work: Path, notes: list[str]) -> dict:
    params, vocab, context = run_info(run)
    threads = args.threads
    print(f"\n== {label}: {params / 1e6:.1f}M params, vocab {vocab:,}, context {context}; "
          f"{args.clients} clients, {args.endpoint}, max_tokens {args.max_tokens}, "
          f"{args.seconds:g} s per server; llama.cpp {threads} threads, ours torch's default; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers = [ours_server(run, f"{label} ours batch {args.max_batch}", args.max_batch, logs, args.env),
               ours_server(run, f"{label} ours batch 1", 1, logs, args.env)]
    names = [f"ours, --max-batch {args.max_batch}", "ours, --max-batch 1"]
    default_lc = None
    lc_why = "--skip-llamacpp" if args.skip_llamacpp else llama_cpp_missing()
    if lc_why is None:
        gguf = work / f"{label}.gguf"
        start = time.perf_counter()
        lc_why = export_gguf(run, gguf)
        if lc_why is None:
            print(f"  exported {gguf.name} ({gguf.stat().st_size / 2**20:.1f} MiB, f32) in "
                  f"{time.perf_counter() - start:.1f} s")
            servers.append(llama_cpp_server(gguf, f"{label} llama.cpp serial", context, threads, logs, False))
            names.append("llama.cpp, serial")
            default_lc = llama_cpp_server(gguf, f"{label} llama.cpp default", context, threads, logs, True)
        else:
            lc_why = f"GGUF export failed: {lc_why}"
    if lc_why is not None:
        print(f"  llama.cpp: skipped ({lc_why})")
        notes.append(f"{label}: llama.cpp skipped ({lc_why})")
    everything = servers + ([default_lc] if default_lc else [])
    results: dict[str, list[Result]] = {n: [] for n in names}
    out: dict = {"label": label}
    try:
        start = time.perf_counter()
        for s in everything:
            s.start()
        for s in list(everything):
            try:
                s.wait_ready()
            except RuntimeError as e:
                if "llama.cpp" not in s.label:
                    raise
                print(f"  llama.cpp: did not start, measured without it: {e}")
                notes.append(f"{s.label}: did not start: {e}")
                s.stop()
                everything.remove(s)
                if s is default_lc:
                    default_lc = None
                else:
                    del names[servers.index(s)]
                    servers.remove(s)
                    del results["llama.cpp, serial"]
        print(f"  {len(everything)} servers ready in {time.perf_counter() - start:.1f} s", flush=True)
        for s in everything:   # warm-up: first-call costs out of the measurement
            for _ in range(2):
                problem = asyncio.run(drain(s.port, args.endpoint))
                if problem:
                    notes.append(f"{s.label}: warm-up request failed: {problem}")
        slice_s = args.seconds / args.rounds
        for rnd in range(args.rounds):
            for s, name in zip(servers, names):
                time.sleep(1)   # the previous server's threads go idle
                results[name] += asyncio.run(load(s.port, args.endpoint, args.clients, slice_s,
                                                  args.max_tokens, seed=rnd))
                problem = asyncio.run(drain(s.port, args.endpoint))
                if problem:
                    notes.append(f"{s.label}: after the load: {problem}")
                if not s.alive():
                    notes.append(f"{s.label}: the server died:\n{s.tail()}")
        stats = {n: summarize(results[n], args.seconds, args.max_tokens) for n in names}
        if default_lc is not None:
            time.sleep(1)
            short = max(3.0, args.seconds / 3)
            res = asyncio.run(load(default_lc.port, args.endpoint, args.clients, short, args.max_tokens, 0))
            stats["llama.cpp, default (interrupts)"] = summarize(res, short, args.max_tokens)
            asyncio.run(drain(default_lc.port, args.endpoint))
        print(HEADER)
        for name, st in stats.items():
            print(row(label, name, st), flush=True)
            for ex in st.error_examples:
                print(f"    error: {ex}")
            if st.usage_mismatch:
                notes.append(f"{label} {name}: {st.usage_mismatch} answers ended with finish_reason "
                             f"'length' but usage.completion_tokens != max_tokens")
            if st.errors:
                notes.append(f"{label} {name}: {st.errors} errors, e.g. {st.error_examples[:1]}")
        batched, single = stats[names[0]], stats[names[1]]
        out["batch_ratio"] = batched.rate / single.rate if single.rate else math.inf
        print(f"  ours --max-batch {args.max_batch} / --max-batch 1: {out['batch_ratio']:.2f}x tokens/s "
              f"(the goal: >= 5x with 16 clients on demo-cpu)")
        if "llama.cpp, serial" in stats:
            lc = stats["llama.cpp, serial"]
            out["lc_ratio"] = batched.rate / lc.rate if lc.rate else math.inf
            out["single_vs_lc"] = single.rate / lc.rate if lc.rate else math.inf
            print(f"  ours --max-batch {args.max_batch} / llama.cpp: {out['lc_ratio']:.2f}x; "
                  f"ours --max-batch 1 / llama.cpp: {out['single_vs_lc']:.2f}x")
        if "llama.cpp, default (interrupts)" in stats:
            d = stats["llama.cpp, default (interrupts)"]
            print(f"  llama.cpp with its default --interrupt_requests True: {d.truncated} of {d.done} "
                  f"finished streams ended early ([DONE] without a finish_reason) because another "
                  f"request was waiting")
    finally:
        for s in everything:
            s.stop()
        for s in everything:
            problems = s.problems()
            if problems:
                notes.append(f"{s.label}: {len(problems)} problem lines in {s.log_path}, e.g. "
                             + " | ".join(problems[:3]))
    return out


# ----------------------------------------------------------------------------------------
# Mixed load: valid and malformed requests at once, then edge cases one by one


@dataclass
class Case:
    kind: str
    path: str
    body: bytes
    expect: tuple[int, ...]
    stream: bool = False
    headers: dict | None = None          # None: JSON with the API key
    chunked_upload: bool = False


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def chat(content="你好，请介绍一下你自己。", max_tokens=16, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": TEMPERATURE} | extra


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def long_text(chars: int) -> str:
    text = "".join(PROMPTS)
    return (text * (chars // len(text) + 1))[:chars]


def malformed_cases(context: int) -> list[Case]:
    """One of each kind of malformed request (the mixed load cycles through them)."""
    nested = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    huge = dumps(chat(content="好" * 400_000))                    # 1.2 MB
    no_key = {"Content-Type": "application/json"}
    return [
        Case("invalid JSON", CHAT, b'{"messages": [{"role": "user", "content": "\xe4\xbd\xa0"}', (400,)),
        Case("not UTF-8", CHAT, b'\xff\xfe{"messages": []}', (400,)),
        Case("body not an object", CHAT, b"[1, 2, 3]", (400,)),
        Case("empty body", CHAT, b"", (400,)),
        Case("wrong type: max_tokens \"16\"", CHAT, dumps(chat(max_tokens="16")), (400,)),
        Case("wrong type: messages a string", CHAT, dumps({"messages": "你好", "max_tokens": 8}), (400,)),
        Case("wrong type: stream \"yes\"", CHAT, dumps(chat(stream="yes")), (400,)),
        Case("wrong type: prompt a number", COMPLETIONS, dumps({"prompt": 42, "max_tokens": 8}), (400,)),
        Case("out of range: temperature 5", CHAT, dumps(chat(temperature=5)), (400,)),
        Case("out of range: max_tokens 0", CHAT, dumps(chat(max_tokens=0)), (400,)),
        Case("out of range: n 0", COMPLETIONS, dumps({"prompt": "你好", "n": 0}), (400,)),
        Case("out of range: top_p 0", CHAT, dumps(chat(top_p=0)), (400,)),
        Case("unknown model", CHAT, dumps(chat(model="gpt-4o")), (404,)),
        Case("missing messages", CHAT, dumps({"max_tokens": 8}), (400,)),
        Case("unknown role", CHAT, dumps({"messages": [{"role": "robot", "content": "hi"}]}), (400,)),
        Case(f"prompt longer than the context ({context})", CHAT,
             dumps(chat(content=long_text(context * 6))), (400,)),
        Case("body > 1 MiB", CHAT, huge, (413,)),
        Case("body > 1 MiB, chunked upload", CHAT, huge, (413,), chunked_upload=True),
        Case("missing API key", CHAT, dumps(chat()), (401,), headers=no_key),
        Case("wrong API key", CHAT, dumps(chat()), (401,), headers=no_key | {"Authorization": "Bearer nope"}),
        Case("JSON nested 100,000 deep", CHAT, nested, (400,)),
    ]


def valid_case(i: int) -> Case:
    endpoint = "chat" if i % 2 == 0 else "completions"
    stream = i % 4 < 2
    body = request_body(endpoint, PROMPTS[i % len(PROMPTS)], 16, stream=stream)
    return Case("valid", path_of(endpoint), dumps(body), (200, 429), stream=stream)


def prompt_of_length(tokenizer, n: int) -> str:
    """A completions prompt that encodes (BOS included, as the server does) to n tokens, or
    as close below as the tokenizer allows."""
    from babyllama.infer.generate import encode_prompt

    text = long_text(n * 4)
    lo, hi = 0, len(text)
    while lo < hi:   # the longest prefix with at most n tokens
        mid = (lo + hi + 1) // 2
        if len(encode_prompt(tokenizer, text[:mid])) <= n:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def edge_cases(context: int, tokenizer) -> list[Case]:
    """Unusual but well-formed requests (and a few near the limits): a 200 or a 4xx each."""
    at_limit = prompt_of_length(tokenizer, context - 1)
    over = prompt_of_length(tokenizer, context)
    ok4 = (200, 400)
    return [
        Case("seed 2**64", CHAT, dumps(chat(seed=2**64)), ok4),
        Case("seed -1", CHAT, dumps(chat(seed=-1)), ok4),
        Case("seed 1.5", CHAT, dumps(chat(seed=1.5)), (400,)),
        Case("top_k 10**9", CHAT, dumps(chat(top_k=10**9)), ok4),
        Case("top_k -1", CHAT, dumps(chat(top_k=-1)), (200,)),
        Case("min_p 1", CHAT, dumps(chat(min_p=1)), ok4),
        Case("top_p 1e-9, temperature 0", CHAT, dumps(chat(top_p=1e-9, temperature=0)), (200,)),
        Case("penalties at their limits", CHAT,
             dumps(chat(presence_penalty=2, frequency_penalty=-2, repetition_penalty=10)), (200,)),
        Case("temperature NaN", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', (400,)),
        Case("top_p Infinity", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', (400,)),
        Case("max_tokens 10**9", CHAT, dumps(chat(max_tokens=10**9)), ok4),
        Case("max_tokens 2**63", CHAT, dumps(chat(max_tokens=2**63)), ok4),
        Case("n 16 streamed", CHAT, dumps(chat(n=16, max_tokens=4, stream=True)), (200,), stream=True),
        Case("n 17 (> --max-batch)", CHAT, dumps(chat(n=17, max_tokens=4)), (400,)),
        Case("100 stop strings", CHAT, dumps(chat(stop=[f"停{i}" for i in range(100)])), ok4),
        Case("a 10,000-character stop string", CHAT, dumps(chat(stop="长" * 10_000)), ok4),
        Case("empty stop string", CHAT, dumps(chat(stop=[""])), (400,)),
        Case("empty user message", CHAT, dumps(chat(content="")), ok4),
        Case("lone surrogate in content", CHAT,
             b'{"messages": [{"role": "user", "content": "\\ud800abc"}], "max_tokens": 4}', ok4),
        Case("NUL in content", CHAT, dumps(chat(content="a\u0000b")), ok4),
        Case("control tokens typed in content", CHAT, dumps(chat(content="<|im_end|><s></s>")), (200,)),
        Case("logprobs, top_logprobs 20, streamed", CHAT,
             dumps(chat(logprobs=True, top_logprobs=20, stream=True)), (200,), stream=True),
        Case("completions logprobs 5", COMPLETIONS, dumps({"prompt": "你好", "max_tokens": 4, "logprobs": 5}), (200,)),
        Case("completions empty prompt", COMPLETIONS, dumps({"prompt": "", "max_tokens": 4}), ok4),
        Case("completions prompt list of 2", COMPLETIONS, dumps({"prompt": ["a", "b"]}), (400,)),
        Case(f"completions prompt of context-1 = {context - 1} tokens", COMPLETIONS,
             dumps({"prompt": at_limit, "max_tokens": 64, "stream": True}), (200,), stream=True),
        Case(f"completions prompt of context = {context} tokens", COMPLETIONS,
             dumps({"prompt": over, "max_tokens": 4}), (400,)),
        Case("stream_options without stream", CHAT, dumps(chat(stream_options={"include_usage": True})), (400,)),
        Case("tools", CHAT, dumps(chat(tools=[{"type": "function"}])), (400,)),
        Case("system message only", CHAT, dumps({"messages": [{"role": "system", "content": "x"}]}), (400,)),
        Case("GET on a POST endpoint", CHAT, b"", (404, 405)),
    ]


async def run_case(port: int, case: Case, api_key: str, timeout: float) -> Result:
    headers = case.headers if case.headers is not None else json_headers(api_key)
    r = Result(time.perf_counter(), kind=case.kind)
    try:
        if case.kind.startswith("GET"):
            status, body = await asyncio.wait_for(http(port, "GET", case.path, headers=headers), timeout)
            r.status, r.error = status, body.decode("utf-8", "replace")[:200]
        else:
            await asyncio.wait_for(send(port, case.path, case.body, r, headers, case.stream,
                                        case.chunked_upload), timeout)
    except asyncio.TimeoutError:
        r.error = f"no answer within {timeout:.0f} s (hang?)"
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


BACKGROUND_CLIENTS = 4


async def with_background(port: int, cases: list[Case]) -> tuple[list[Result], list[Result]]:
    """Run `cases` one at a time while BACKGROUND_CLIENTS clients stream ordinary requests:
    a request that breaks the engine breaks theirs too (fault isolation)."""
    background: list[Result] = []
    stop = asyncio.Event()
    headers = json_headers(API_KEY)

    async def client(i: int) -> None:
        while not stop.is_set():
            body = json.dumps(request_body("chat", PROMPTS[i % len(PROMPTS)], 32)).encode()
            r = Result(time.perf_counter())
            background.append(r)
            try:
                await send(port, CHAT, body, r, headers, True)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                r.error = f"{type(e).__name__}: {e}"

    tasks = [asyncio.create_task(client(i)) for i in range(BACKGROUND_CLIENTS)]
    await asyncio.sleep(0.5)
    results = [await run_case(port, case, API_KEY, 120) for case in cases]
    stop.set()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    except asyncio.TimeoutError:
        for r in background:
            r.cut = r.cut or not r.done
    return results, background


def status_class(r: Result) -> str:
    if r.status is None:
        return "no response"
    if r.status == 429:
        return "429"
    return f"{r.status // 100}xx"


def mixed_load(run: Path, args, work: Path, notes: list[str]) -> dict:
    from babyllama.run import Run

    _, _, context = run_info(run)
    tokenizer = Run(run).load_tokenizer()
    server = ours_server(run, "mixed ours", args.max_batch, work / "logs", args.env, api_key=API_KEY)
    rng = random.Random(0)
    kinds = malformed_cases(context)
    cases = [kinds[i % len(kinds)] for i in range(args.malformed)]
    cases += [valid_case(i) for i in range(args.mixed - args.malformed)]
    rng.shuffle(cases)
    print(f"\n== mixed load on {run.name} (--api-key, --max-batch {args.max_batch}, default --max-queue): "
          f"{len(cases)} requests at once, {args.malformed} malformed ({len(kinds)} kinds), "
          f"valid ones max_tokens 16, chat/completions, streamed or not", flush=True)
    out: dict = {}
    try:
        server.start().wait_ready()
        start = time.perf_counter()

        async def burst():
            return await asyncio.gather(*(run_case(server.port, c, API_KEY, 300) for c in cases))

        results = asyncio.run(burst())
        wall = time.perf_counter() - start
        by_class = Counter(status_class(r) for r in results)
        print(f"  all answered in {wall:.1f} s; by status class: "
              + ", ".join(f"{k}: {v}" for k, v in sorted(by_class.items())))
        print(f"  {'kind':<42} {'n':>3}  {'statuses':<22} {'expected':<12} ok")
        bad = 0
        for kind in dict.fromkeys(c.kind for c in cases):
            mine = [(c, r) for c, r in zip(cases, results) if c.kind == kind]
            got = Counter(r.status if r.status is not None else "none" for _, r in mine)
            expect = mine[0][0].expect
            wrong = [(c, r) for c, r in mine if r.status not in expect
                     or (r.status == 200 and not r.ok)]
            bad += len(wrong)
            statuses = ", ".join(f"{s}x{n}" for s, n in sorted(got.items(), key=str))
            print(f"  {kind:<42} {len(mine):>3}  {statuses:<22} {'/'.join(map(str, expect)):<12} "
                  f"{'yes' if not wrong else 'NO'}")
            for c, r in wrong[:2]:
                print(f"      -> status {r.status}: {(r.error or '')[:200]}")
                notes.append(f"mixed load, {kind}: got {r.status}, expected {c.expect}: {(r.error or '')[:200]}")
        valid = [r for c, r in zip(cases, results) if c.kind == "valid"]
        print(f"  valid requests: {sum(r.ok for r in valid)} answered, "
              f"{sum(r.status == 429 for r in valid)} got 429 (queue full)")
        out["5xx"] = by_class.get("5xx", 0)
        out["no_response"] = by_class.get("no response", 0)
        out["unexpected"] = bad

        # Afterwards: still healthy, still answering.
        status, _ = asyncio.run(http(server.port, "GET", "/health"))
        r = asyncio.run(run_case(server.port, Case("normal", CHAT, dumps(chat(stream=True,
                        stream_options={"include_usage": True})), (200,), stream=True), API_KEY, 120))
        out["health"] = status
        out["normal_ok"] = r.ok
        print(f"  afterwards: /health {status}; a normal streamed chat request: "
              f"{'ok, ' + str(r.usage) + ' tokens' if r.ok else f'FAILED status {r.status}: {r.error}'}")

        print(f"\n== edge cases on {run.name}, one at a time (each: a 200 or a 4xx, never a 5xx), "
              f"while {BACKGROUND_CLIENTS} background clients stream ordinary requests")
        print(f"  {'case':<46} {'status':>6} {'expected':<9} note")
        edge_bad = 0
        cases = edge_cases(context, tokenizer)
        edge_results, background = asyncio.run(with_background(server.port, cases))
        for case, r in zip(cases, edge_results):
            good = r.status in case.expect and (r.status != 200 or r.ok or case.kind.startswith("GET"))
            edge_bad += not good
            cls = status_class(r)
            out["edge_5xx"] = out.get("edge_5xx", 0) + (cls == "5xx")
            if r.status == 200:
                tokens = f"{r.usage} tokens" if r.usage is not None else f"{len(r.times)} chunks"
                note = f"{tokens}, finish {r.finish}" if r.ok else f"BROKEN: {r.error}"
            else:
                note = (r.error or "")[:110].replace("\n", " ")
            print(f"  {case.kind:<46} {str(r.status):>6} {'/'.join(map(str, case.expect)):<9} "
                  f"{'' if good else 'UNEXPECTED '}{note}", flush=True)
            if not good:
                notes.append(f"edge case {case.kind!r}: status {r.status}, expected {case.expect}: "
                             f"{(r.error or '')[:300]}")
        out["edge_unexpected"] = edge_bad
        broken = [r for r in background if not r.ok and not r.cut]
        out["background_broken"] = len(broken)
        print(f"  background streams meanwhile: {sum(r.ok for r in background)} answered, "
              f"{len(broken)} broken" + (f", e.g. {broken[0].error}" if broken else ""))
        if broken:
            notes.append(f"edge cases: {len(broken)} innocent background streams broken, e.g. "
                         f"{broken[0].error}")
        status, _ = asyncio.run(http(server.port, "GET", "/health"))
        out["health_after_edge"] = status
        print(f"  afterwards: /health {status}")
    finally:
        server.stop()
        problems = server.problems()
        if problems:
            notes.append(f"mixed-load server: {len(problems)} problem lines in its log, e.g. "
                         + " | ".join(problems[:3]))
    return out


# ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=None, help="presets with random weights (default: demo-cpu,43m)")
    ap.add_argument("--run", action="append", type=Path, default=[],
                    help="a trained run directory instead of --configs (repeatable)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=None, help="per server (default 30; --quick 6)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16, help="ours, batched (default: %(default)s)")
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--rounds", type=int, default=1,
                    help="split each server's time into this many slices, servers alternating")
    ap.add_argument("--mixed", type=int, default=None, help="mixed-load requests (default 200; --quick 60)")
    ap.add_argument("--malformed", type=int, default=None, help="of them malformed (default 50; --quick 21)")
    ap.add_argument("--tokenizer", default="auto",
                    help="for --configs: a tokenizer file/dir, 'train', or 'auto' (shared ChatGLM2 if present)")
    ap.add_argument("--threads", type=int, default=available_cores(),
                    help="llama.cpp's --n_threads and --n_threads_batch (default: the cores, %(default)s)")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for our servers, e.g. OMP_WAIT_POLICY=PASSIVE (repeatable)")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-mixed", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--out", type=Path, default=None, help="keep runs, GGUF files and server logs here")
    args = ap.parse_args()
    args.seconds = args.seconds or (6.0 if args.quick else 30.0)
    args.mixed = args.mixed or (60 if args.quick else 200)
    args.malformed = args.malformed if args.malformed is not None else (21 if args.quick else 50)
    if not 0 <= args.malformed <= args.mixed:
        ap.error("--malformed must be between 0 and --mixed")
    args.env = dict(kv.split("=", 1) for kv in args.server_env if "=" in kv)
    configs = [c for c in (args.configs or "demo-cpu,43m").split(",") if c]

    print(f"serve_load: {available_cores()} cores, load average {os.getloadavg()[0]:.1f}")
    print(versions(), flush=True)
    if args.env:
        print(f"our servers' environment adds: {args.env}")
    notes: list[str] = []
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
        work = Path(tmp.name)
    else:
        work = args.out
        work.mkdir(parents=True, exist_ok=True)
    try:
        models: list[tuple[str, Path]] = []
        if args.run:
            models = [(r.resolve().name, r) for r in args.run]
        else:
            start = time.perf_counter()
            from babyllama.config import load_config

            for preset in configs:
                tokenizer, described = pick_tokenizer(args.tokenizer, load_config(preset).model.vocab_size)
                models.append((preset, build_run(preset, tokenizer, work / "runs" / preset)))
                print(f"random-weight run of {preset} with the tokenizer {described} "
                      f"(vocab {tokenizer.vocab_size:,})")
            print(f"runs built in {time.perf_counter() - start:.1f} s")
        outcomes = [measure_model(label, run, args, work, notes) for label, run in models]
        mixed = None if args.skip_mixed else mixed_load(models[0][1], args, work, notes)
    finally:
        if tmp is not None:
            tmp.cleanup()   # the logs go with it: --out keeps them

    print()
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    parts = []
    for o in outcomes:
        p = f"{o['label']}: batch {args.max_batch}/batch 1 {o['batch_ratio']:.2f}x"
        if "lc_ratio" in o:
            p += f", ours/llama.cpp {o['lc_ratio']:.2f}x (batch 1/llama.cpp {o['single_vs_lc']:.2f}x)"
        parts.append(p)
    if mixed is not None:
        parts.append(f"mixed load: 5xx {mixed['5xx']}, no response {mixed['no_response']}, unexpected "
                     f"{mixed['unexpected']}; edge cases: 5xx {mixed.get('edge_5xx', 0)}, unexpected "
                     f"{mixed['edge_unexpected']}, background streams broken "
                     f"{mixed['background_broken']}, /health {mixed['health']}, "
                     f"normal request {'ok' if mixed['normal_ok'] else 'FAILED'}")
    print(f"SUMMARY ({args.clients} clients, {args.seconds:g} s, max_tokens {args.max_tokens}) "
          + "; ".join(parts))


if __name__ == "__main__":
    main()
