"""The chat page (`GET /` of `babyllama serve`) in a real browser: headless Chromium driven by
Selenium against an in-process server on a tiny SFT model that has learnt one Chinese greeting.

The page must stream the answer token by token (UTF-8 put together across network chunks),
give exactly the server's own greedy answer, keep a multi-turn history, stop a stream, and
send the API key. Skipped where Chromium and its driver are not installed (Debian: `apt-get
install chromium chromium-driver`).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("selenium")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("the browser tests need chromium and chromedriver (Debian: apt-get install chromium "
                "chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from conftest import GREETING, TINY_MODEL, TINY_TRAIN, Served, greeting_sft  # noqa: E402

WAIT_S = 30


# -- servers on tiny chat models --------------------------------------------------------------
@pytest.fixture(scope="module")
def long_chat_run(tiny_data, tmp_path_factory) -> Path:
    """conftest's chat_run with a 256-token context, for the multi-turn test: chat_run's 64
    tokens hold no second turn (the tiny tokenizer spells most characters as bytes). A few
    seconds: 3 pretraining steps, 100 SFT steps."""
    from babyllama.config import load_config
    from babyllama.train.pretrain import run_pretrain

    root = tmp_path_factory.mktemp("page")
    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=3", "train.save_every=0",
                                                           "model.max_position_embeddings=256"])
    cfg.data, cfg.out_dir = str(tiny_data), str(root / "base")
    run_pretrain(cfg)
    return greeting_sft(root / "base", root)


class Recorder:
    """ASGI middleware that keeps the JSON body of every chat request the app is sent and, with
    `chop` set, sends each piece of a streamed answer in three parts a moment apart, cut inside
    its first multi-byte UTF-8 character and inside its line: the browser then reads them as
    separate network chunks, which a page must put together before decoding."""

    def __init__(self, app):
        self.app, self.bodies, self.chop = app, [], False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        chunks = []

        async def recording():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(chunks)))
            return message

        async def chopping(message):
            body = message.get("body", b"")
            wide = next((i for i, byte in enumerate(body) if byte >= 0x80), None)
            if message["type"] != "http.response.body" or wide is None:
                return await send(message)
            cuts = sorted({wide + 1, (wide + 1 + len(body)) // 2})
            parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
            for part in parts[:-1]:
                await send({"type": "http.response.body", "body": part, "more_body": True})
                await asyncio.sleep(0.02)
            await send({**message, "body": parts[-1]})

        return await self.app(scope, recording, chopping if self.chop else send)


class PageServer(Served):
    """conftest's in-process server with the Recorder in front of its app."""

    def __init__(self, run: Path, api_key: str | None = None):
        super().__init__(run, api_key=api_key, wrap=Recorder, max_batch=4)
        self.api_key = api_key

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=WAIT_S) as response:
            return json.loads(response.read())

    def chat(self, body: dict) -> dict:
        """A non-streamed POST /v1/chat/completions."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + "/v1/chat/completions", method="POST", headers=headers,
                                         data=json.dumps(body, ensure_ascii=False).encode())
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def server(chat_run):
    with PageServer(chat_run) as served:
        yield served


@pytest.fixture(scope="module")
def long_server(long_chat_run):
    with PageServer(long_chat_run) as served:
        yield served


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=900,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


# -- driving the page -----------------------------------------------------------------------
def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"), "the page never read /props")


def wait(driver, condition, message: str, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def open_settings(driver) -> None:
    if not driver.find_element(By.ID, "settings").get_attribute("open"):
        driver.find_element(By.CSS_SELECTOR, "#settings > summary").click()


def set_field(driver, element_id: str, value: str) -> None:
    open_settings(driver)
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def say(driver, text: str) -> None:
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def assistants(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#messages .assistant")


def answer_of(driver, n: int):
    """The n-th assistant message (1-based) once its stream has ended."""
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, '#messages .assistant[data-done="true"]')) >= n,
         f"assistant message {n} never finished")
    return assistants(driver)[n - 1]


def text_of(element) -> str:
    return element.get_attribute("textContent")


def greedy_reference(server: PageServer, page_body: dict) -> str:
    """The server's own non-streamed answer to the request the page sent."""
    body = {k: v for k, v in page_body.items() if k not in ("stream", "stream_options")}
    return server.chat(body)["choices"][0]["message"]["content"]


# -- tests ----------------------------------------------------------------------------------
def test_page_streams_the_servers_greedy_answer(server, browser, monkeypatch):
    monkeypatch.setattr(server.app, "chop", True)  # UTF-8 characters and lines split across chunks
    props = server.get("/props")
    open_page(browser, server.url)
    assert props["model"] in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "model").get_attribute("value") == props["model"]
    assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == str(
        props["default_generation_settings"]["max_new_tokens"])
    set_field(browser, "temperature", "0")
    say(browser, "你好")
    node = answer_of(browser, 1)
    body = server.app.bodies[-1]
    assert body["stream"] is True and body["temperature"] == 0 and body["model"] == props["model"]
    assert body["messages"] == [{"role": "user", "content": "你好"}]
    assert {"top_p", "top_k", "repetition_penalty", "max_tokens"} <= body.keys()
    text = text_of(node)
    assert "\ufffd" not in text
    assert text == greedy_reference(server, body) == GREETING
    assert node.get_attribute("data-finish") == "stop"
    assert [text_of(e) for e in browser.find_elements(By.CSS_SELECTOR, "#messages .user")] == ["你好"]
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages .error")
    wait(browser, lambda d: "tokens/s" in d.find_element(By.ID, "status").text, "no tokens/s in the status line")


def test_page_sends_the_whole_conversation_and_new_chat_clears_it(long_server, browser):
    server = long_server
    open_page(browser, server.url)
    set_field(browser, "temperature", "0")
    set_field(browser, "system", "你是一个乐于助人的助手。")
    say(browser, "你好")
    first = text_of(answer_of(browser, 1))
    say(browser, "你是谁")
    second = answer_of(browser, 2)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#messages .user, #messages .assistant")) == 4
    body = server.app.bodies[-1]
    assert body["messages"] == [{"role": "system", "content": "你是一个乐于助人的助手。"},
                                {"role": "user", "content": "你好"},
                                {"role": "assistant", "content": first},
                                {"role": "user", "content": "你是谁"}]
    assert text_of(second) == greedy_reference(server, body)

    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages > *")
    say(browser, "<b>您好</b>")
    answer_of(browser, 1)
    assert server.app.bodies[-1]["messages"] == [{"role": "system", "content": "你是一个乐于助人的助手。"},
                                                 {"role": "user", "content": "<b>您好</b>"}]
    user = browser.find_element(By.CSS_SELECTOR, "#messages .user")
    assert text_of(user) == "<b>您好</b>" and not user.find_elements(By.TAG_NAME, "b")  # text, not HTML


def test_stop_ends_the_stream(server, browser, monkeypatch):
    """With every engine step slowed down, Stop ends the answer part way; the server drops it."""
    engine = server.engine
    step = engine.scheduler.step

    def slow_step():
        time.sleep(0.25)
        return step()

    monkeypatch.setattr(engine.scheduler, "step", slow_step)
    open_page(browser, server.url)
    set_field(browser, "temperature", "0")
    say(browser, "你好")
    stop = browser.find_element(By.ID, "stop")
    wait(browser, lambda d: stop.is_displayed() and text_of(assistants(d)[0]), "no token arrived")
    assert not browser.find_element(By.ID, "send").is_displayed()
    stop.click()
    node = answer_of(browser, 1)
    assert node.get_attribute("data-finish") == "abort"
    text = text_of(node)
    assert text and GREETING.startswith(text) and text != GREETING
    assert browser.find_element(By.ID, "send").is_displayed() and not stop.is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages .error")
    # The dropped connection cancels the request: the engine goes idle long before the answer's end.
    deadline = time.monotonic() + 2
    while not (engine.scheduler.idle and not engine.handles):
        assert time.monotonic() < deadline, "the server kept generating after the page stopped"
        time.sleep(0.05)
    monkeypatch.undo()
    # The part of the answer that was shown stays in the conversation.
    say(browser, "你是谁")
    answer_of(browser, 2)
    assert server.app.bodies[-1]["messages"][-2:] == [{"role": "assistant", "content": text},
                                                      {"role": "user", "content": "你是谁"}]


def test_an_error_in_the_middle_of_a_stream_is_shown(server, browser, monkeypatch):
    """A fault after streaming started arrives as `data: {"error": ...}`: the page shows its message."""
    engine = server.engine
    step, calls = engine.scheduler.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the accelerator caught fire")
        return step()

    monkeypatch.setattr(engine.scheduler, "step", failing_step)
    open_page(browser, server.url)
    say(browser, "你好")
    node = answer_of(browser, 1)
    assert node.get_attribute("data-finish") == "error"
    errors = browser.find_elements(By.CSS_SELECTOR, "#messages .error")
    assert len(errors) == 1 and "the accelerator caught fire" in text_of(errors[0])
    assert browser.find_element(By.ID, "send").is_displayed()


def test_page_with_an_api_key(chat_run, browser):
    with PageServer(chat_run, api_key="k") as keyed:
        open_page(browser, keyed.url)
        # A server that wants a key opens the settings at the key field.
        assert browser.find_element(By.ID, "settings").get_attribute("open")
        say(browser, "你好")
        error = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .error"), "no error shown")
        assert "API key" in text_of(error[0])
        assert answer_of(browser, 1).get_attribute("data-finish") == "error"
        # The question that failed is back in the input box: fill in the key and send it again.
        assert browser.find_element(By.ID, "input").get_attribute("value") == "你好"
        set_field(browser, "api-key", "k")
        set_field(browser, "temperature", "0")
        browser.find_element(By.ID, "send").click()
        assert text_of(answer_of(browser, 2)) == GREETING
        assert browser.execute_script("return localStorage.getItem('babyllama.apiKey')") == "k"
        open_page(browser, keyed.url)  # the key is remembered
        assert browser.find_element(By.ID, "api-key").get_attribute("value") == "k"
        browser.execute_script("localStorage.clear()")
