"""`babyllama serve` through the official openai client and raw HTTP: answers equal the engine's
own on the same weights, streams follow OpenAI's chunk rules, greedy answers do not change
under concurrency, a client that leaves frees its row, and every malformed request gets its
4xx (never a 5xx)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from babyllama.infer.config import GenerationConfig, decoding_defaults  # noqa: E402
from babyllama.infer.generate import complete, encode_prompt  # noqa: E402
from babyllama.infer.scheduler import Request, Scheduler  # noqa: E402
from babyllama.llm import load  # noqa: E402
from babyllama.tokenizer.chat_template import encode_chat, stop_token_ids  # noqa: E402

from conftest import GREETING, Served, babyllama_cmd, cli_env  # noqa: E402

HELLO = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def chat_server(chat_run):
    with Served(chat_run) as served:
        yield served


@pytest.fixture(scope="module")
def base_server(pretrained_run):
    with Served(pretrained_run, max_batch=16) as served:
        yield served


def client(served, **kw):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if r.headers.get_content_type() == "application/json" else text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def sse_events(text: str) -> list:
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]) for line in lines]


# -- answers equal the engine's --------------------------------------------------------------------

def test_chat_answer_equals_the_engine_greedy_answer_and_usage_is_exact(chat_server, chat_run):
    llm = load(chat_run, device="cpu")
    expected = llm.chat(HELLO, temperature=0)
    assert expected == GREETING
    r = client(chat_server).chat.completions.create(model="sft", messages=HELLO, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    prompt = encode_chat(llm.tokenizer, HELLO, add_generation_prompt=True).ids
    done = complete(llm.model, llm.tokenizer, [prompt], decoding_defaults("chat", temperature=0),
                    stop_token_ids(llm.tokenizer))[0]
    # The end-of-turn token was generated too: usage counts it, as vLLM does.
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(done.ids) + 1)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.model == "sft" and r.object == "chat.completion"


def test_streamed_chinese_equals_the_whole_answer_and_follows_the_chunk_rules(chat_server):
    stream = client(chat_server).chat.completions.create(
        messages=HELLO, model="sft", temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == GREETING and "\ufffd" not in text
    assert len([c for c in content if c.choices[0].delta.content]) > 1  # streamed in pieces
    assert [c.choices[0].finish_reason for c in content][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_ends_with_done_and_every_chunk_is_whole_characters(chat_server):
    status, text = post(chat_server.url + "/v1/chat/completions",
                        {"messages": HELLO, "temperature": 0, "stream": True})
    assert status == 200
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(pieces) == GREETING and not any("\ufffd" in p for p in pieces)


def test_completion_equals_llm_generate_streamed_or_not(base_server, pretrained_run):
    llm = load(pretrained_run, device="cpu")
    expected = llm.generate("今天天气", temperature=0, max_new_tokens=20)
    c = client(base_server)
    r = c.completions.create(model="base", prompt="今天天气", temperature=0, max_tokens=20)
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(encode_prompt(llm.tokenizer, "今天天气"))
    streamed = list(c.completions.create(model="base", prompt="今天天气", temperature=0, max_tokens=20,
                                         stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings_cut_the_text_in_streams_and_whole_answers(chat_server, base_server, pretrained_run):
    c = client(chat_server)
    r = c.chat.completions.create(model="sft", messages=HELLO, temperature=0, stop=["我是"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("你好，", "stop")
    streamed = c.chat.completions.create(model="sft", messages=HELLO, temperature=0, stop="小助", stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == "你好，我是"
    # A stop string whose start appears but never completes is held back, then shown.
    never = c.chat.completions.create(model="sft", messages=HELLO, temperature=0, stop=["你好，我们"],
                                      stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in never if ch.choices) == GREETING
    llm = load(pretrained_run, device="cpu")
    text = llm.generate("今天", temperature=0, max_new_tokens=30)
    stop = text[5:7]
    r = client(base_server).completions.create(model="base", prompt="今天", temperature=0, max_tokens=30,
                                               stop=stop)
    assert r.choices[0].text == llm.generate("今天", temperature=0, max_new_tokens=30, stop=[stop])
    assert r.choices[0].finish_reason == "stop"


def test_n_choices_share_the_prompt_and_a_seed_makes_them_reproducible(base_server, pretrained_run):
    c = client(base_server)
    kw = dict(model="base", prompt="中国", max_tokens=12, n=2, temperature=1.0, seed=7)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert a.choices[0].text != a.choices[1].text
    # The same samples as the engine draws for one prompt with this seed, whatever else the
    # server's batch held: each request samples with its own generator.
    llm = load(pretrained_run, device="cpu")
    cfg = decoding_defaults("plain", max_new_tokens=12, num_return_sequences=2, temperature=1.0, seed=7)
    done = complete(llm.model, llm.tokenizer, [encode_prompt(llm.tokenizer, "中国")], cfg)
    assert [ch.text for ch in a.choices] == [d.text for d in done]
    assert [ch.finish_reason for ch in a.choices] == [d.finish_reason for d in done]
    assert a.usage.completion_tokens == sum(len(d.ids) + (d.finish_reason == "stop") for d in done)
    streamed = list(c.completions.create(**kw, stream=True))
    for i in (0, 1):
        assert "".join(ch.choices[0].text for ch in streamed if ch.choices[0].index == i) == a.choices[i].text


def test_logprobs_tokens_join_to_the_content_and_equal_the_model_log_probs(base_server, pretrained_run):
    llm = load(pretrained_run, device="cpu")
    r = client(base_server).chat.completions.create(
        model="base", messages=HELLO, temperature=0, max_tokens=15, logprobs=True, top_logprobs=3)
    content = r.choices[0].message.content
    entries = r.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == content
    assert all(len(e.top_logprobs) == 3 for e in entries)
    # Greedy: the chosen token is the most likely one (no penalty row is in the way at temperature 0
    # only when the penalty is off, so compare with the model's own log-softmax instead).
    prompt = encode_chat(llm.tokenizer, HELLO, add_generation_prompt=True).ids
    ids = complete(llm.model, llm.tokenizer, [prompt], decoding_defaults("chat", temperature=0, max_new_tokens=15),
                   stop_token_ids(llm.tokenizer))[0].ids
    with torch.no_grad():
        logits, _ = llm.model(torch.tensor([prompt + ids]))
    reference = logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    got = [e.logprob for e in entries]
    want = reference.gather(1, torch.tensor(ids)[:, None])[:, 0].tolist()
    assert len(got) == len(ids) and got == pytest.approx(want, abs=1e-4)
    assert entries[0].top_logprobs[0].logprob == pytest.approx(reference[0].max().item(), abs=1e-4)


def test_legacy_completion_logprobs_have_tokens_offsets_and_alternatives(base_server):
    status, body = post(base_server.url + "/v1/completions",
                        {"prompt": "今天", "temperature": 0, "max_tokens": 8, "logprobs": 2})
    assert status == 200
    lp = body["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert all(len(alt) <= 2 for alt in lp["top_logprobs"]) and len(lp["token_logprobs"]) == 8


# -- continuous batching ------------------------------------------------------------------------------

PROMPTS = ["今天", "中国的经济", "机器学习", "房间很干净", "The quick", "人民日报", "手机的屏幕", "我们去公园",
           "第1", "天气很好", "服务也很周到", "新年献词", "自然语言", "电池", "希望的", "下次还会"]


def test_sixteen_concurrent_greedy_requests_each_equal_their_solo_answer(base_server):
    c = client(base_server)
    solo = [c.completions.create(model="base", prompt=p, temperature=0, max_tokens=10 + i).choices[0].text
            for i, p in enumerate(PROMPTS)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def greedy(i):
        try:
            stream = c.completions.create(model="base", prompt=PROMPTS[i], temperature=0, max_tokens=10 + i,
                                          stream=True)
            results[i] = "".join(ch.choices[0].text for ch in stream)
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    def noisy(i):  # other settings in the same batch: sampling, penalties, n=2, stops
        try:
            c.completions.create(model="base", prompt=PROMPTS[-i - 1], temperature=1.2, top_p=0.9,
                                 presence_penalty=0.5, n=2, seed=i, max_tokens=25, stop=["。"],
                                 extra_body={"top_k": 20, "repetition_penalty": 1.3, "min_p": 0.05})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=greedy, args=(i,)) for i in range(16)]
    threads += [threading.Thread(target=noisy, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert [results.get(i) for i in range(16)] == solo


def test_requests_that_join_a_running_batch_equal_their_solo_answers(pretrained_run):
    """The scheduler alone: requests arrive every few steps, with other settings among them."""
    llm = load(pretrained_run, device="cpu")
    model, tok = llm.model, llm.tokenizer
    prompts = [encode_prompt(tok, p) for p in PROMPTS[:10]]
    cfgs = [GenerationConfig(temperature=0, max_new_tokens=8 + 3 * i) for i in range(10)]
    solo = [complete(model, tok, [p], cfg, ())[0].text for p, cfg in zip(prompts, cfgs)]
    scheduler = Scheduler(model, tok, max_rows=6)
    texts = {}
    waiting = list(range(10))
    steps = 0
    while waiting or not scheduler.idle:
        if waiting and steps % 2 == 0:
            i = waiting.pop(0)
            request = scheduler.check(Request(prompts[i], cfgs[i]))
            request.number = i
            scheduler.submit(request)
            scheduler.submit(scheduler.check(Request(prompts[i][::-1], GenerationConfig(
                temperature=0.9, top_k=5, seed=i, num_return_sequences=2, max_new_tokens=5), logprobs=2)))
        for event in scheduler.step():
            if hasattr(event.request, "number"):
                texts[event.request.number] = texts.get(event.request.number, "") + event.text
        assert len(scheduler.rows) <= 6
        steps += 1
    assert [texts[i] for i in range(10)] == solo
    # The cache never holds more positions than the longest row needs, plus its free room.
    assert scheduler.batch is None


def test_a_client_that_disconnects_frees_its_row(pretrained_run):
    with Served(pretrained_run, max_batch=1) as served:
        body = json.dumps({"prompt": "今天", "max_tokens": 60, "temperature": 1.0, "seed": 1, "stream": True})
        req = urllib.request.Request(served.url + "/v1/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        response = urllib.request.urlopen(req, timeout=30)
        response.readline()  # the first chunk arrived: the request holds the only row
        assert len(served.engine.scheduler.rows) == 1
        response.close()
        deadline = time.monotonic() + 10
        while served.engine.scheduler.rows and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.engine.scheduler.rows == []
        # The row is free: the next request is served at once.
        status, answer = post(served.url + "/v1/completions", {"prompt": "中国", "max_tokens": 3})
        assert status == 200 and answer["usage"]["completion_tokens"] == 3


# -- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, words", [
    (b'{"messages": [', 400, "not valid JSON"),
    (b'[1, 2]', 400, "JSON object"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, 400, "last message"),
    ({"messages": HELLO, "temperature": "0.5"}, 400, "temperature"),
    ({"messages": HELLO, "temperature": 5}, 400, "temperature"),
    ({"messages": HELLO, "top_p": 0}, 400, "top_p"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": HELLO, "n": 0}, 400, "n"),
    ({"messages": HELLO, "stop": [""]}, 400, "stop"),
    ({"messages": HELLO, "stop": ""}, 400, "stop"),
    ({"messages": HELLO, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"messages": HELLO, "top_logprobs": 2}, 400, "logprobs"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": HELLO, "model": "gpt-4"}, 404, "gpt-4"),
    ({"messages": [{"role": "user", "content": "你好" * 200}]}, 400, "context is 64"),
    ({"messages": HELLO, "stream": True, "messages_extra": 1, "n": 17}, 400, "n"),
    ({"messages": HELLO, "seed": 2 ** 64}, 400, "seed"),
    (b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "\\ud800abc"}]}', 400, "lone UTF-16 surrogate (\\ud800)"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "document": "\\udfff"}', 400, "surrogate"),
])
def test_malformed_chat_requests_get_their_4xx_with_openai_errors(chat_server, body, status, words):
    got, answer = post(chat_server.url + "/v1/chat/completions", body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert words in answer["error"]["message"]


def test_a_too_long_prompt_names_both_lengths_before_any_stream(chat_server):
    got, answer = post(chat_server.url + "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "你好" * 200}], "stream": True})
    assert got == 400 and answer["error"]["code"] == "context_length_exceeded"
    message = answer["error"]["message"]
    assert "64" in message and "tokens" in message and message.split()[3].isdigit()


def read_reply(sock) -> str:
    """An HTTP response read whole: headers, then content-length bytes (they may come apart)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return (head + b"\r\n\r\n" + body).decode()


def raw_reply(url: str, request: bytes) -> str:
    """Send `request` bytes as they are to the server at `url`, and read its whole reply."""
    import socket

    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(request)
        return read_reply(sock)


def test_a_body_over_the_limit_gets_413_before_it_is_read(chat_server):
    import socket

    port = int(chat_server.url.rsplit(":", 1)[1])
    # Only the headers are sent: the announced size alone is refused.
    reply = raw_reply(chat_server.url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                       b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n")
    assert reply.startswith("HTTP/1.1 413") and "larger than 1048576 bytes" in reply
    # A body that announces no size (chunked) is counted as it arrives.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        # 17 chunks pass the limit by one; nothing more is sent, so the server has read all of
        # it when it answers (unread bytes at its close would reset the connection instead).
        for _ in range(17):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = read_reply(sock)
    assert reply.startswith("HTTP/1.1 413") and "larger than" in reply


def test_unknown_routes_and_methods_get_openai_errors(chat_server):
    got, answer = post(chat_server.url + "/v1/nothing", {})
    assert got == 404 and "error" in answer
    req = urllib.request.Request(chat_server.url + "/v1/chat/completions")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 405 and "error" in json.loads(e.value.read())


def test_the_api_key_is_required_when_set(chat_run):
    with Served(chat_run, api_key="sesame") as served:
        with pytest.raises(openai.AuthenticationError):
            client(served, api_key="wrong").chat.completions.create(model="sft", messages=HELLO)
        r = client(served, api_key="sesame").chat.completions.create(model="sft", messages=HELLO, temperature=0)
        assert r.choices[0].message.content == GREETING
        got, answer = post(served.url + "/v1/models", b"")
        assert got in (401, 405)
        with urllib.request.urlopen(served.url + "/health") as r:  # health stays open for monitors
            assert r.status == 200


def test_a_full_queue_gets_429_and_the_server_goes_on(pretrained_run):
    with Served(pretrained_run, max_batch=1, max_queue=1) as served:
        statuses = []

        def ask():
            statuses.append(post(served.url + "/v1/completions",
                                 {"prompt": "今天", "max_tokens": 40, "temperature": 1.0})[0])

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        assert post(served.url + "/v1/completions", {"prompt": "今天", "max_tokens": 2})[0] == 200


def test_health_is_503_while_the_model_loads(pretrained_run, monkeypatch):
    from babyllama.serve.worker import EngineThread

    release = threading.Event()
    real_load = EngineThread.load

    def slow_load(self):
        release.wait(30)
        real_load(self)

    monkeypatch.setattr(EngineThread, "load", slow_load)
    served = Served(pretrained_run)
    served.thread.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(served.url + "/health", timeout=5)
                raise AssertionError("healthy before the model loaded")
            except urllib.error.HTTPError as e:
                assert e.code == 503 and json.loads(e.read())["status"] == "loading"
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        got, answer = post(served.url + "/v1/completions", {"prompt": "今天"})
        assert got == 503 and "loading" in answer["error"]["message"]
        release.set()
        deadline = time.monotonic() + 30
        while served.engine.status != "ok":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with urllib.request.urlopen(served.url + "/health") as r:
            assert r.status == 200
    finally:
        release.set()
        served.__exit__()


def test_an_engine_fault_mid_stream_is_an_error_event_and_the_server_goes_on(pretrained_run, monkeypatch):
    with Served(pretrained_run) as served:
        real_step = Scheduler.step
        calls = []

        def failing_step(self):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("simulated device fault")
            return real_step(self)

        monkeypatch.setattr(Scheduler, "step", failing_step)
        got, text = post(served.url + "/v1/completions", {"prompt": "今天", "max_tokens": 10, "stream": True})
        assert got == 200
        events = sse_events(text)
        assert events[-1] == "[DONE]" and "simulated device fault" in events[-2]["error"]["message"]
        monkeypatch.setattr(Scheduler, "step", real_step)
        got, answer = post(served.url + "/v1/completions", {"prompt": "今天", "max_tokens": 3})
        assert got == 200 and answer["usage"]["completion_tokens"] == 3


# -- the command ---------------------------------------------------------------------------------------

def test_serve_listens_on_localhost_by_default_and_bad_input_is_one_line(tmp_path, pretrained_run):
    from babyllama.cli import build_parser

    args = build_parser().parse_args(["serve", "somewhere"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    r = subprocess.run(babyllama_cmd() + ["serve", str(tmp_path / "missing")], env=cli_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such run" in r.stderr
    r = subprocess.run(babyllama_cmd() + ["serve", str(pretrained_run), "--adapter", "oops"], env=cli_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "NAME=DIR" in r.stderr
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        r = subprocess.run(babyllama_cmd() + ["serve", str(pretrained_run), "--port", str(taken.getsockname()[1])],
                           env=cli_env(), capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr


def test_serve_command_prints_its_local_address_and_answers(pretrained_run):
    proc = subprocess.Popen(babyllama_cmd() + ["serve", str(pretrained_run), "--port", "0", "--log-level", "warning"],
                            env=cli_env(), stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "http://127.0.0.1:" in line
        url = line.split("at ")[1].split()[0].rstrip("/")
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline
                time.sleep(0.1)
        got, answer = post(url + "/v1/completions", {"prompt": "今天", "max_tokens": 2})
        assert got == 200 and answer["usage"]["completion_tokens"] == 2
        # SIGTERM (or Ctrl-C) lets an answer in flight finish before the server exits.
        body = json.dumps({"prompt": "今天", "max_tokens": 50, "temperature": 1.0, "seed": 3, "stream": True})
        stream = urllib.request.urlopen(urllib.request.Request(
            url + "/v1/completions", data=body.encode(), headers={"Content-Type": "application/json"}), timeout=60)
        first = stream.readline()
        proc.terminate()
        rest = stream.read().decode()
        assert first.startswith(b"data: ") and rest.rstrip().endswith("data: [DONE]")
        proc.wait(timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_adapters_are_served_by_name_and_each_answers_as_loaded_alone(pretrained_run, tmp_path):
    from babyllama.lora import LoraConfig, apply_lora, save_adapter
    from babyllama.model.llama import Llama
    from babyllama.model.weights import load_weights
    from babyllama.run import Run

    for k, name in enumerate(("greet", "math")):
        torch.manual_seed(k)
        model = Llama(Run(pretrained_run).config().model)
        load_weights(model, pretrained_run / "model.safetensors")
        wrapped = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.5)  # a nonzero adapter, so which one answered shows
        save_adapter(wrapped, tmp_path / name, pretrained_run)
    llm = load(pretrained_run, device="cpu")
    for name in ("greet", "math"):
        llm.add_adapter(tmp_path / name, name)
    expected = {}
    for name in (None, "greet", "math"):
        llm.use_adapter(name)
        expected[name or "base"] = llm.generate("今天", temperature=0, max_new_tokens=12)
    assert len(set(expected.values())) == 3

    adapters = {"greet": str(tmp_path / "greet"), "math": str(tmp_path / "math")}
    with Served(pretrained_run, adapters=adapters) as served:
        c = client(served)
        assert [m.id for m in c.models.list().data] == ["base", "greet", "math"]
        got: dict[int, tuple[str, str]] = {}

        def ask(i, model):
            got[i] = model, c.completions.create(model=model, prompt="今天", temperature=0,
                                                 max_tokens=12).choices[0].text

        threads = [threading.Thread(target=ask, args=(i, m)) for i, m in enumerate(["greet", "base", "math"] * 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(got) == 9 and all(text == expected[model] for model, text in got.values())


def test_chat_cli_talks_to_a_server_turn_by_turn(chat_server):
    r = subprocess.run(babyllama_cmd() + ["chat", "--server", chat_server.url, "--temperature", "0"],
                       input="你好\n/reset\n您好\n/quit\n", env=cli_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(GREETING) == 2
    r = subprocess.run(babyllama_cmd() + ["chat", "--server", chat_server.url, "--prompt", "你好", "--num-beams", "2"],
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "num-beams is not available through a server" in r.stderr
    r = subprocess.run(babyllama_cmd() + ["chat", "--server", chat_server.url, "--prompt", "你好", "--model", "nope"],
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'nope' does not exist" in r.stderr
    r = subprocess.run(babyllama_cmd() + ["chat", "--server", "http://127.0.0.1:9", "--prompt", "你好"],
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot reach http://127.0.0.1:9" in r.stderr


def test_remote_chat_drops_the_oldest_exchanges_when_the_context_is_full(chat_server):
    from babyllama.serve.client import RemoteChat

    session = RemoteChat(chat_server.url)
    for _ in range(4):  # each exchange is ~20 tokens of a 64-token context
        assert "".join(session.send("你好", temperature=0)) == GREETING
    assert len(session.history) == 8


def test_null_fields_mean_their_defaults_as_in_openais_api(chat_server):
    body = {"messages": HELLO, "temperature": 0, "stream": None, "n": None, "logprobs": None, "seed": None,
            "stop": None, "max_tokens": None, "stream_options": None, "top_p": None, "document": None}
    got, answer = post(chat_server.url + "/v1/chat/completions", body)
    assert got == 200 and answer["choices"][0]["message"]["content"] == GREETING


def test_a_single_model_is_listed_and_an_adapter_cannot_hide_the_run(chat_server, chat_run):
    from babyllama.errors import UserError
    from babyllama.serve.app import create_app
    from babyllama.serve.worker import EngineThread

    assert client(chat_server).models.retrieve("sft").id == "sft"
    with pytest.raises(openai.NotFoundError):
        client(chat_server).models.retrieve("nope")
    with pytest.raises(UserError, match="already model 'sft'"):
        create_app(EngineThread(chat_run, adapters={"sft": "elsewhere"}))


def test_the_key_scheme_is_case_insensitive_and_429_says_when_to_retry(chat_run):
    with Served(chat_run, api_key="Sesame", max_batch=1, max_queue=1) as served:
        got, _ = post(served.url + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2},
                      {"Authorization": "bearer Sesame"})
        assert got == 200
        assert post(served.url + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2},
                    {"Authorization": "Bearer sesame"})[0] == 401
        headers = []

        def ask():
            req = urllib.request.Request(served.url + "/v1/chat/completions", headers={
                "Content-Type": "application/json", "Authorization": "Bearer Sesame"},
                data=json.dumps({"messages": HELLO, "max_tokens": 30, "temperature": 1.0}).encode())
            try:
                urllib.request.urlopen(req, timeout=60).read()
            except urllib.error.HTTPError as e:
                headers.append((e.code, e.headers.get("Retry-After")))

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert headers and all(h == (429, "1") for h in headers)


def test_a_body_that_stops_arriving_gets_408(pretrained_run):
    with Served(pretrained_run, app_options={"body_timeout_s": 0.5}) as served:
        reply = raw_reply(served.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        assert reply.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in reply


def test_bad_ports_are_one_line_and_chat_server_urls_may_leave_out_the_scheme(chat_server, pretrained_run):
    r = subprocess.run(babyllama_cmd() + ["serve", str(pretrained_run), "--port", "99999"], env=cli_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "0 to 65535" in r.stderr
    r = subprocess.run(babyllama_cmd() + ["chat", "--server", chat_server.url.removeprefix("http://"),
                                          "--prompt", "你好", "--temperature", "0"],
                       env=cli_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == GREETING


def test_a_long_running_batch_grows_and_compacts_its_cache_and_stays_exact(pretrained_run):
    """Rows that run past the free room the join left (64 positions) make the cache grow; rows
    that leave let it drop the columns nobody uses. Answers stay those of each request alone."""
    import dataclasses

    from babyllama.model.llama import Llama
    from babyllama.run import Run

    run = Run(pretrained_run)
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(run.model_config(), max_position_embeddings=256)).eval()
    tok = run.load_tokenizer()
    prompts = [encode_prompt(tok, p) for p in ("今天天气很好", "中国", "机器学习和自然语言处理很有意思")]
    cfgs = [GenerationConfig(temperature=0, max_new_tokens=n) for n in (150, 40, 120)]
    solo = [complete(model, tok, [p], c, ())[0].ids for p, c in zip(prompts, cfgs)]
    scheduler = Scheduler(model, tok, max_rows=4)
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    longest = capacity = 0
    for step in range(400):
        if step in (0, 30, 60):
            request = scheduler.check(Request(prompts[step // 30], cfgs[step // 30]))
            request.number = step // 30
            scheduler.submit(request)
        for event in scheduler.step():
            got[event.request.number].append(event)
        if scheduler.batch is not None:
            longest = max(longest, scheduler.batch.cache.pos)
            capacity = max(capacity, scheduler.batch.cache.max_len)
            assert int(scheduler.batch.pad.min()) == 0  # no column that every row pads
        if scheduler.idle:
            break
    assert [[e.completion_tokens for e in got[i]][-1] for i in range(3)] == [len(s) for s in solo]
    texts = ["".join(e.text for e in got[i]) for i in range(3)]
    assert texts == [tok.decode(s) for s in solo]
    assert longest <= 256 and capacity > len(prompts[0]) + 64  # it grew
