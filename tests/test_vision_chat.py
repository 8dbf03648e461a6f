"""Chatting about pictures: `babyllama chat RUN --image FILE` and `/image FILE`, `LLM.chat(...,
images=[...])` and content parts, and the server's `image_url` parts. The tiny image-text run
answers poorly (the same bytes whatever the picture), so besides equal greedy answers the tests
check which pixels reached the encoder (`seen`) and, for the server, the answer's log-probs."""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import threading

import pytest
import torch
from PIL import Image, ImageDraw

from babyllama.cli import main
from babyllama.errors import UserError
from babyllama.infer.chat import chat_text
from babyllama.infer.config import decoding_defaults
from babyllama.infer.images import image_prompt, load_image_pixels
from babyllama.llm import load
from babyllama.model.vlm import VisionLanguageModel
from babyllama.tokenizer.chat_template import encode_chat

from conftest import GREETING, Served

QUESTION = "图中有什么？"
GREEDY = {"temperature": 0, "max_new_tokens": 12}


def picture(kind: str) -> Image.Image:
    """A 64x64 picture: a red disc or a blue square on white."""
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    if kind == "disc":
        draw.ellipse((12, 12, 52, 52), fill=(220, 30, 30))
    else:
        draw.rectangle((8, 20, 40, 52), fill=(30, 60, 220))
    return image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    paths = {}
    for kind in ("disc", "square"):
        paths[kind] = root / f"{kind}.png"
        picture(kind).save(paths[kind])
    paths["corrupt"] = root / "corrupt.png"
    paths["corrupt"].write_bytes(paths["disc"].read_bytes()[:60])
    paths["missing"] = root / "missing.png"
    return paths


@pytest.fixture(scope="module")
def vlm(vision_run):
    return load(vision_run, device="cpu")


@pytest.fixture
def seen(monkeypatch) -> list[torch.Tensor]:
    """The pixel values every image-text forward pass encodes, in call order."""
    calls = []
    original = VisionLanguageModel.image_features

    def spy(self, pixel_values):
        calls.append(pixel_values.detach().cpu().clone())
        return original(self, pixel_values)

    monkeypatch.setattr(VisionLanguageModel, "image_features", spy)
    return calls


def same(a: torch.Tensor, *images: torch.Tensor) -> bool:
    return torch.equal(a, torch.stack(images))


def ask() -> list[dict]:
    return [{"role": "user", "content": f"<|image|>\n{QUESTION}"}]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


# -- LLM.chat --------------------------------------------------------------------------------------

def test_llm_chat_with_images_equals_chat_text_and_every_form_of_image_agrees(vlm, images, seen):
    pixels = load_image_pixels(vlm.model, images["disc"])
    expected = chat_text(vlm.model, vlm.tokenizer, ask(), decoding_defaults("chat", **GREEDY), images=[pixels])
    assert len(seen) == 1 and same(seen[0], pixels)
    calls = [lambda: vlm.chat(ask(), images=[images["disc"]], **GREEDY),
             lambda: vlm.chat(ask(), images=[str(images["disc"])], **GREEDY),
             lambda: vlm.chat(ask(), images=[pixels], **GREEDY),
             lambda: vlm.chat(ask(), images=[images["disc"].read_bytes()], **GREEDY),
             lambda: "".join(vlm.stream_chat(ask(), images=[images["disc"]], **GREEDY)).strip()]
    # transformers' content parts: an image part (path, PIL image, data URL) then the text;
    # OpenAI's image_url part (after the text: a message's pictures go first all the same).
    for image in (images["disc"], Image.open(images["disc"]), data_url(images["disc"])):
        parts = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
        calls.append(lambda parts=parts: vlm.chat(parts, **GREEDY))
    openai_parts = [{"role": "user", "content": [
        {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url(images["disc"])}}]}]
    calls.append(lambda: vlm.chat(openai_parts, **GREEDY))
    for call in calls:
        del seen[:]
        assert call() == expected
        assert len(seen) == 1 and same(seen[0], pixels)
    vlm.chat(ask(), images=[images["square"]], **GREEDY)
    assert same(seen[-1], load_image_pixels(vlm.model, images["square"]))


def test_images_in_an_earlier_turn_pair_with_their_placeholders_in_order(vlm, images, seen):
    messages = [{"role": "user", "content": f"<|image|>\n{QUESTION}"}, {"role": "assistant", "content": "一个圆。"},
                {"role": "user", "content": [{"type": "image", "image": images["square"]},
                                             {"type": "text", "text": QUESTION}]}]
    pixels = [load_image_pixels(vlm.model, images[k]) for k in ("disc", "square")]
    placeholders = messages[:2] + [{"role": "user", "content": f"<|image|>\n{QUESTION}"}]
    expected = chat_text(vlm.model, vlm.tokenizer, placeholders, decoding_defaults("chat", **GREEDY), images=pixels)
    assert vlm.chat(messages, images=[images["disc"]], **GREEDY) == expected
    assert len(seen) == 2 and same(seen[0], *pixels) and same(seen[1], *pixels)


def test_llm_chat_image_mistakes_are_one_line_user_errors(vlm, images, chat_run):
    cases = [
        (lambda: vlm.chat(ask(), **GREEDY), "placeholders than the 0 image"),
        (lambda: vlm.chat(ask(), images=[images["disc"], images["square"]], **GREEDY), "2 image(s) given for 1"),
        (lambda: vlm.chat(ask(), images=[images["missing"]], **GREEDY), "missing.png: no such image file"),
        (lambda: vlm.chat(ask(), images=[images["corrupt"]], **GREEDY), "corrupt.png:"),
        (lambda: vlm.chat(ask(), images=[torch.zeros(3, 8, 8)], **GREEDY), "pixel values of shape (3, 8, 8)"),
        (lambda: vlm.chat([{"role": "user", "content": [{"type": "image", "image": "http://x.org/a.png"}]}]),
         "only data URLs"),
        (lambda: load(chat_run, device="cpu").chat([{"role": "user", "content": "你好"}], images=[images["disc"]]),
         "1 image(s) given for 0"),
        (lambda: load(chat_run, device="cpu").chat(
            [{"role": "user", "content": [{"type": "image", "image": images["disc"]}]}]), "reads no images"),
    ]
    for call, words in cases:
        with pytest.raises(UserError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


# -- the CLI ---------------------------------------------------------------------------------------

def cli(argv: list[str], capsys, monkeypatch, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


FLAGS = ["--device", "cpu", "--temperature", "0", "--max-new-tokens", "12"]


def test_cli_chat_answers_about_an_image_one_shot_and_in_the_repl(vision_run, vlm, images, capsys, monkeypatch,
                                                                  seen):
    disc, square = (load_image_pixels(vlm.model, images[k]) for k in ("disc", "square"))
    expected = vlm.chat(ask(), images=[images["disc"]], **GREEDY)
    for argv in (["--image", str(images["disc"]), QUESTION], ["--image", str(images["disc"]), "--prompt", QUESTION],
                 [QUESTION, "--image", str(images["disc"])]):
        del seen[:]
        code, out, err = cli(["chat", str(vision_run), *argv, *FLAGS], capsys, monkeypatch)
        assert code == 0 and out.strip() == expected, err
        assert "disc.png, 64x64 → 32x32, 16 positions" in err
        assert len(seen) == 1 and same(seen[0], disc)

    # The REPL: /image attaches to the next message; errors leave the session going; /reset
    # forgets the pictures too.
    square_answer = vlm.chat(ask(), images=[images["square"]], **GREEDY)
    later = [{"role": "user", "content": f"<|image|>\n{QUESTION}"}, {"role": "assistant", "content": expected},
             {"role": "user", "content": "再说一遍"}]
    second = vlm.chat(later, images=[images["disc"]], **GREEDY)
    script = "\n".join([f"/image {images['missing']}", f"/image {images['corrupt']}", f"/image {images['disc']}",
                        QUESTION, "再说一遍", "/reset", f"/image {images['square']}", QUESTION, "/quit"])
    del seen[:]
    code, out, _ = cli(["chat", str(vision_run), *FLAGS], capsys, monkeypatch, script)
    assert code == 0
    assert "/image FILE" in out  # the help
    assert f"error: {images['missing']}: no such image file" in out
    assert f"error: {images['corrupt']}: " in out
    assert "(image: " + str(images["disc"]) + ", 64x64 → 32x32, 16 positions" in out
    answers = re.findall(r"助手> (.*)", out)
    assert answers == [expected, second, square_answer]
    # Each message's prefill saw the conversation's pictures: disc, disc again, then (after
    # /reset) the square alone.
    assert len(seen) == 3 and same(seen[0], disc) and same(seen[1], disc) and same(seen[2], square)

    # --image opens the REPL with the picture waiting for the first message.
    code, out, _ = cli(["chat", str(vision_run), "--image", str(images["disc"]), *FLAGS], capsys, monkeypatch,
                       QUESTION + "\n")
    assert code == 0 and f"助手> {expected}\n" in out


def test_cli_chat_image_errors_are_one_line(vision_run, chat_run, images, capsys, monkeypatch):
    for run, image, words in ((vision_run, images["missing"], "missing.png: no such image file"),
                              (vision_run, images["corrupt"], "corrupt.png: "),
                              (chat_run, images["disc"], "is a text model: it reads no images")):
        code, out, err = cli(["chat", str(run), "--image", str(image), QUESTION, *FLAGS], capsys, monkeypatch)
        assert code == 2 and out == "" and err.startswith("error: ") and words in err and err.count("\n") == 1, err
    # A text run's REPL says so and keeps chatting.
    code, out, _ = cli(["chat", str(chat_run), "--device", "cpu", "--temperature", "0"], capsys, monkeypatch,
                       f"/image {images['disc']}\n你好\n")
    assert code == 0 and "error: " in out and "reads no images" in out and f"助手> {GREETING}" in out


# -- the server ------------------------------------------------------------------------------------

def post(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def first_logprob(llm, path) -> float:
    """The log-prob of the greedy first answer token to ask() about the picture at `path`,
    computed by one plain forward pass."""
    ids = encode_chat(llm.tokenizer, ask(), add_generation_prompt=True).ids
    ids, pixel_values = image_prompt(llm.model, ids, [load_image_pixels(llm.model, path)])
    with torch.no_grad():
        logits, _ = llm.model(torch.tensor([ids]), pixel_values=pixel_values)
    return float(logits[0, -1].float().log_softmax(-1).max())


def test_server_answers_about_data_url_images_as_llm_chat_does(vision_run, vlm, images):
    openai = pytest.importorskip("openai")
    expected = {k: vlm.chat(ask(), images=[images[k]], **GREEDY) for k in ("disc", "square")}
    logprob = {k: first_logprob(vlm, images[k]) for k in ("disc", "square")}
    assert abs(logprob["disc"] - logprob["square"]) > 1e-4  # the picture changes the answer's odds
    with Served(vision_run) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="instruct", messages=image_message(data_url(images["disc"])),
                                           temperature=0, max_tokens=12, logprobs=True)
        assert r.choices[0].message.content == expected["disc"]
        assert r.choices[0].logprobs.content[0].logprob == pytest.approx(logprob["disc"], abs=1e-4)
        assert r.usage.prompt_tokens > 16  # the image's positions count
        # Requests prefilled together keep their own pictures (continuous batching).
        got = {}

        def one(i, kind):
            status, body = post(served.url, {"messages": image_message(data_url(images[kind])), "temperature": 0,
                                             "max_tokens": 12, "logprobs": True})
            got[i] = (kind, body["choices"][0]["message"]["content"], body["choices"][0]["logprobs"]["content"][0]
                      ["logprob"]) if status == 200 else body

        threads = [threading.Thread(target=one, args=(i, k)) for i, k in enumerate(["disc", "square"] * 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for kind, text, value in got.values():
            assert text == expected[kind] and value == pytest.approx(logprob[kind], abs=1e-4), (kind, value)

        for message, words in (
                (image_message("https://example.com/a.png"), "never downloads"),
                (image_message("data:image/png;base64,@@@@"), "base64 is invalid"),
                (image_message(data_url(images["corrupt"])), "messages[0] image 1: "),
                (image_message("data:image/png;base64," + "A" * (14 << 20)), "larger than"),
                ([{"role": "user", "content": f"<|image|>\n{QUESTION}"}], "1 <|image|> placeholder(s) for 0")):
            status, body = post(served.url, {"messages": message, "max_tokens": 4})
            assert status == 400 and words in body["error"]["message"], body


def test_the_scheduler_prefills_requests_together_each_with_its_own_pictures(vlm, images, seen):
    from babyllama.infer.scheduler import Request, Scheduler
    from babyllama.tokenizer.chat_template import stop_token_ids

    scheduler = Scheduler(vlm.model, vlm.tokenizer, max_rows=8)
    cfg = decoding_defaults("chat", temperature=0, max_new_tokens=12)
    requests = {}
    for kind in ("disc", "text", "square"):
        ids = encode_chat(vlm.tokenizer, ask() if kind != "text" else [{"role": "user", "content": QUESTION}],
                          add_generation_prompt=True).ids
        ids, pixel_values = image_prompt(vlm.model, ids, [] if kind == "text" else
                                         [load_image_pixels(vlm.model, images[kind])])
        requests[kind] = scheduler.check(Request(ids, cfg, stop_token_ids(vlm.tokenizer), 0, pixel_values=pixel_values))
        scheduler.submit(requests[kind])
    firsts, texts = {}, {k: "" for k in requests}
    while not scheduler.idle:
        for event in scheduler.step():
            kind = next(k for k, r in requests.items() if r is event.request)
            texts[kind] += event.text
            if event.logprobs and kind not in firsts:
                firsts[kind] = event.logprobs[0].logprob
    # One prefill held both pictures, in row order.
    disc, square = (load_image_pixels(vlm.model, images[k]) for k in ("disc", "square"))
    assert len(seen) == 1 and same(seen[0], disc, square)
    for kind in ("disc", "square"):
        assert texts[kind].strip() == vlm.chat(ask(), images=[images[kind]], **GREEDY)
        assert firsts[kind] == pytest.approx(first_logprob(vlm, images[kind]), abs=1e-4)
    assert texts["text"].strip() == vlm.chat([{"role": "user", "content": QUESTION}], **GREEDY)
    # A request whose images do not match its prompt is refused before it is queued.
    with pytest.raises(UserError, match="image positions"):
        scheduler.check(Request(requests["text"].prompt, cfg, (), pixel_values=disc[None]))


def test_a_text_model_server_refuses_images(chat_run, images):
    with Served(chat_run) as served:
        status, body = post(served.url, {"messages": image_message(data_url(images["disc"])), "max_tokens": 4})
        assert status == 400 and "reads no images" in body["error"]["message"], body
        status, body = post(served.url, {"messages": image_message("http://example.com/a.png")})
        assert status == 400 and "never downloads" in body["error"]["message"]
        status, body = post(served.url, {"messages": [{"role": "user", "content": "你好"}], "temperature": 0})
        assert status == 200 and body["choices"][0]["message"]["content"] == GREETING
