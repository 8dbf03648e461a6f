"""Image data: SigLIP-identical preprocessing, LLaVA-style instruction files (good and bad), and the
built-in synthetic set builtin:shapes-zh."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from babyllama.data.images import ImageProcessing, load_pixels, open_image, pixel_values
from babyllama.data.llava import (IMAGE_PLACEHOLDER, ImageConversation, image_conversations,
                                  read_image_conversations)
from babyllama.data.records import BadRecords
from babyllama.data.shapes import (COLOURS, KINDS, SPLITS, shape_scenes, shapes_conversations,
                                   write_shapes_folder)
from babyllama.errors import UserError

# ---------------------------------------------------------------------------------------------
# Preprocessing


def _siglip_processor(size: int, mean, std):
    transformers = pytest.importorskip("transformers")
    # transformers 5 names the PIL implementation SiglipImageProcessorPil (SiglipImageProcessor
    # is the torchvision one there); before 5, SiglipImageProcessor was the PIL one.
    cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    return cls(size={"height": size, "width": size}, image_mean=list(mean), image_std=list(std))


def _random_image(rng: np.random.Generator, mode: str, width: int, height: int) -> Image.Image:
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        image = image.convert("P")
        image.info["transparency"] = 5  # a transparent palette colour: composited onto white
    return image.convert(mode) if mode != "P" else image


@pytest.mark.parametrize("mode,width,height,size", [("RGB", 37, 50, 64), ("RGBA", 100, 80, 32),
                                                    ("L", 64, 64, 64), ("P", 13, 200, 48)])
def test_pixel_values_equal_transformers_siglip_processor(mode, width, height, size):
    rng = np.random.default_rng(width * height)
    image = _random_image(rng, mode, width, height)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    expected = _siglip_processor(size, mean, std)(images=image, return_tensors="pt").pixel_values[0]
    got = pixel_values(image, ImageProcessing(size, mean, std))
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    default = pixel_values(image, ImageProcessing(size))  # mean = std = 0.5: values in [-1, 1]
    assert default.min() >= -1 and default.max() <= 1


def test_load_pixels_reads_a_file_as_the_processor_does(tmp_path):
    image = _random_image(np.random.default_rng(1), "RGB", 40, 30)
    image.save(tmp_path / "a.png")
    proc = ImageProcessing(24)
    torch.testing.assert_close(load_pixels(tmp_path / "a.png", proc), pixel_values(image, proc))


def _jpeg_bytes(width=64, height=48) -> bytes:
    buffer = io.BytesIO()
    _random_image(np.random.default_rng(2), "RGB", width, height).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_open_image_refuses_missing_corrupt_truncated_and_huge_images_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jpg: no such image file$"):
        open_image(tmp_path / "nope.jpg")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(UserError, match=r"noise\.jpg: not a readable image") as e:
        open_image(tmp_path / "noise.jpg")
    assert "\n" not in str(e.value)
    (tmp_path / "cut.jpg").write_bytes(_jpeg_bytes()[:-600])
    with pytest.raises(UserError, match=r"cut\.jpg: unreadable image: .*truncated") as e:
        open_image(tmp_path / "cut.jpg")
    assert "\n" not in str(e.value)
    (tmp_path / "big.jpg").write_bytes(_jpeg_bytes(300, 200))
    with pytest.raises(UserError, match=r"big\.jpg: image of 300x200 pixels is too large"):
        open_image(tmp_path / "big.jpg", max_pixels=50_000)
    assert open_image(tmp_path / "big.jpg").size == (300, 200)


# ---------------------------------------------------------------------------------------------
# LLaVA-style files


def _write_json(path: Path, records: list) -> Path:
    # One record per line, so record k (0-based) starts on line k + 2.
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n",
                    encoding="utf-8")
    return path


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(_jpeg_bytes(16, 16))


def _conv(human: str, answer: str = "回答", image: str | None = "a.jpg", **extra) -> dict:
    record = {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return {**record, **extra}


GOOD = [
    {"id": "1", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\n图里有什么？"}, {"from": "gpt", "value": "一只猫。"},
        {"from": "human", "value": "它是什么颜色？"}, {"from": "gpt", "value": "白色。"}]},
    _conv("这是哪里？\n<image>", "公园。", "sub/b.jpg"),  # placeholder after the text
    _conv("描述这张图片。", "一座山。", "a.jpg"),          # no placeholder: put at the start
    _conv("你好", "你好！", None),                        # text only
    {"image": "a.jpg", "messages": [{"role": "system", "content": "你是助手。"},
                                    {"role": "user", "content": [{"type": "image"},
                                                                 {"type": "text", "text": "数一数。"}]},
                                    {"role": "assistant", "content": "3"}], "qtype": "数量"},
]


def _check_good(convs: list[ImageConversation], data: Path, images: Path, lines: list[int]) -> None:
    assert [c.where for c in convs] == [f"{data}:{n}" for n in lines]
    assert [c.image for c in convs] == [images / "a.jpg", images / "sub/b.jpg", images / "a.jpg", None,
                                        images / "a.jpg"]
    assert convs[0].messages == [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n图里有什么？"},
                                 {"role": "assistant", "content": "一只猫。"},
                                 {"role": "user", "content": "它是什么颜色？"},
                                 {"role": "assistant", "content": "白色。"}]
    assert convs[1].messages[0]["content"] == f"{IMAGE_PLACEHOLDER}\n这是哪里？"
    assert convs[2].messages[0]["content"] == f"{IMAGE_PLACEHOLDER}\n描述这张图片。"
    assert convs[3].messages == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert convs[4].messages == [{"role": "system", "content": "你是助手。"},
                                 {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n数一数。"},
                                 {"role": "assistant", "content": "3"}]
    assert convs[4].qtype == "数量" and convs[0].qtype == ""


def test_llava_json_maps_roles_and_normalises_the_image_placeholder(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    _images(tmp_path / "imgs", "a.jpg", "sub/b.jpg")
    data = _write_json(tmp_path / "data.json", GOOD)
    bad = BadRecords()
    convs = read_image_conversations(str(data), tmp_path / "imgs", bad=bad)
    _check_good(convs, data, tmp_path / "imgs", [2, 3, 4, 5, 6])
    assert bad.count == 0


def test_llava_jsonl_finds_images_next_to_the_file_without_images_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    _images(tmp_path, "a.jpg", "sub/b.jpg")
    data = _write_jsonl(tmp_path / "data.jsonl", GOOD)
    convs = image_conversations(str(data))
    _check_good(convs, data, tmp_path, [1, 2, 3, 4, 5])


def test_a_key_of_a_json_object_and_a_directory_are_sources_too(tmp_path):
    _images(tmp_path / "data", "a.jpg")
    (tmp_path / "data" / "splits.json").write_text(json.dumps({"train": [_conv("问"), _conv("再问")]}),
                                                   encoding="utf-8")
    _write_jsonl(tmp_path / "data" / "more.jsonl", [_conv("<image>\n三问")])
    convs = read_image_conversations(f"{tmp_path / 'data' / 'splits.json'}#train", None)
    assert [c.where for c in convs] == [f"{tmp_path / 'data' / 'splits.json'}:train record {i}" for i in (1, 2)]
    convs = read_image_conversations(str(tmp_path / "data"), None)
    assert [c.messages[0]["content"] for c in convs] == [f"{IMAGE_PLACEHOLDER}\n{q}" for q in ("三问", "问", "再问")]
    with pytest.raises(UserError, match=r"splits\.json#test: no list of records under the key 'test'"):
        read_image_conversations(f"{tmp_path / 'data' / 'splits.json'}#test", None)


def test_missing_corrupt_and_truncated_images_are_counted_skips_naming_file_line_and_image(tmp_path):
    _images(tmp_path, "ok.jpg")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "cut.jpg").write_bytes(_jpeg_bytes()[:-600])
    data = _write_json(tmp_path / "d.json", [_conv("<image>\n问", image="ok.jpg"),
                                             _conv("<image>\n问", image="gone.jpg"),
                                             _conv("<image>\n问", image="noise.jpg"),
                                             _conv("<image>\n问", image="cut.jpg")])
    bad = BadRecords()
    convs = read_image_conversations(str(data), None, bad=bad)  # skip_bad=False: still skipped
    assert [c.image for c in convs] == [tmp_path / "ok.jpg"]
    assert bad.count == 3
    assert bad.reasons == Counter({"missing image": 1, "unreadable image": 2})
    assert bad.problems[0] == f"{data}:3: missing image {tmp_path / 'gone.jpg'}"
    assert bad.problems[1].startswith(f"{data}:4: unreadable image {tmp_path / 'noise.jpg'}: ")
    assert bad.problems[2].startswith(f"{data}:5: unreadable image {tmp_path / 'cut.jpg'}: ")
    assert "truncated" in bad.problems[2]
    assert all("\n" not in p for p in bad.problems)


BAD_RECORDS = [
    (_conv("<image>\n看<image>"), r"<image> appears 2 times; one image is given"),
    ({"image": "ok.jpg", "conversations": [{"from": "human", "value": "<image>\n问"},
                                           {"from": "gpt", "value": "答"},
                                           {"from": "human", "value": "<image>再看"},
                                           {"from": "gpt", "value": "答"}]},
     r"<image> appears 2 times; one image is given"),
    (_conv("<image>\n问", image=None), r"<image> placeholder but no image"),
    ({"image": "ok.jpg", "conversations": "问"}, r"'conversations' is a string, not a list"),
    ({"image": "ok.jpg", "conversations": [{"from": "gpt", "value": "答"}, {"from": "human", "value": "问"}]},
     r"message 1 is from the assistant; roles must alternate"),
    ({"conversations": [{"from": "human", "value": "问"}, {"from": "human", "value": "又问"},
                        {"from": "gpt", "value": "答"}]}, r"message 2 is from the user; roles must alternate"),
    (_conv("<image>\n问", answer="  "), r"message 2 \(assistant\) is empty"),
    ({"image": "ok.jpg", "conversations": [{"from": "human", "value": "问"}]},
     r"the last message is not from the assistant"),
    ({"image": "ok.jpg", "conversations": [{"from": "robot", "value": "问"}]}, r"message 1 has unknown role 'robot'"),
    ({"image": "ok.jpg"}, r"no 'conversations' or 'messages' field \(fields: image\)"),
    ("just text", r"expected an object, found a string"),
]


@pytest.mark.parametrize("record,message", BAD_RECORDS)
def test_each_bad_record_is_a_one_line_error_naming_file_line(tmp_path, record, message):
    _images(tmp_path, "ok.jpg")
    data = _write_json(tmp_path / "d.json", [_conv("<image>\n好", image="ok.jpg"), record])
    with pytest.raises(UserError, match=f"^{str(data)}:3: {message}") as e:
        read_image_conversations(str(data), None)
    assert "\n" not in str(e.value)


def test_bad_records_are_counted_skips_with_skip_bad(tmp_path):
    _images(tmp_path, "ok.jpg")
    data = _write_jsonl(tmp_path / "d.jsonl", [_conv("<image>\n好", image="ok.jpg")]
                        + [record for record, _ in BAD_RECORDS] + [_conv("好", image="missing.jpg")])
    with open(data, "ab") as f:
        f.write(b"{not json\n")
    bad = BadRecords()
    convs = read_image_conversations(str(data), None, skip_bad=True, bad=bad)
    assert len(convs) == 1 and convs[0].where == f"{data}:1"
    assert bad.count == len(BAD_RECORDS) + 2
    assert bad.reasons["missing image"] == 1 and bad.reasons["invalid JSON"] == 1
    assert bad.problems[0] == f"{data}:2: <image> appears 2 times; one image is given"
    assert bad.summary().startswith(f"{bad.count} bad records skipped: ")


def test_unsupported_and_missing_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"nothing\.json: no such file"):
        read_image_conversations(str(tmp_path / "nothing.json"), None)
    (tmp_path / "d.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.csv: unsupported file type"):
        read_image_conversations(str(tmp_path / "d.csv"), None)
    (tmp_path / "obj.json").write_text('"text"', encoding="utf-8")
    with pytest.raises(UserError, match=r"obj\.json:1: expected a JSON list of records, found a string"):
        read_image_conversations(str(tmp_path / "obj.json"), None)
    with pytest.raises(UserError, match=r"builtin:shapes-zh#dev: no split 'dev'"):
        image_conversations("builtin:shapes-zh#dev")
    with pytest.raises(UserError, match=r"builtin:cats: no such built-in image set"):
        image_conversations("builtin:cats")


# ---------------------------------------------------------------------------------------------
# builtin:shapes-zh


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def test_shape_scenes_are_deterministic_and_differ_by_seed():
    a, b = shape_scenes("val", 30, seed=3), shape_scenes("val", 30, seed=3)
    assert [_digest(s.image) for s in a] == [_digest(s.image) for s in b]
    assert [(s.caption, s.questions) for s in a] == [(s.caption, s.questions) for s in b]
    assert [_digest(s.image) for s in shape_scenes("val", 10, seed=3)] == [_digest(s.image) for s in a[:10]]
    assert [_digest(s.image) for s in shape_scenes("val", 30, seed=4)] != [_digest(s.image) for s in a]
    assert a[0].image.size == (64, 64) and a[0].image.mode == "RGB"
    assert shape_scenes("test", 2, size=32)[0].image.size == (32, 32)


def test_no_test_or_val_picture_is_a_train_picture():
    train = {_digest(s.image) for s in shape_scenes("train", 1500)}
    test = [_digest(s.image) for s in shape_scenes("test")]
    val = [_digest(s.image) for s in shape_scenes("val")]
    assert len(test) == SPLITS["test"] and len(val) == SPLITS["val"]
    assert not train & set(test) and not train & set(val) and not set(test) & set(val)


def test_answers_are_balanced_per_question_type():
    answers: dict[str, Counter] = {}
    for conv in shapes_conversations("test", "qa"):
        answers.setdefault(conv.qtype, Counter())[conv.messages[1]["content"]] += 1
    assert set(answers) == {"颜色", "形状", "数量", "位置"}
    assert set(answers["颜色"]) == set(COLOURS) and set(answers["形状"]) == set(KINDS)
    assert set(answers["位置"]) == {"左边", "右边", "上方", "下方"}
    for qtype, counts in answers.items():
        total = sum(counts.values())
        assert total >= 300, qtype
        assert counts.most_common(1)[0][1] / total < 0.5, (qtype, counts)


def test_questions_and_captions_match_the_drawn_shapes():
    for scene in shape_scenes("val", 50):
        for s in scene.shapes:
            assert f"{s.colour}的{s.kind}" in scene.caption
        assert scene.caption.startswith("图中有")
        for qtype, question, answer in scene.questions:
            if qtype == "颜色":
                kind = question[len("图中的"):question.index("是")]
                assert [s.colour for s in scene.shapes if s.kind == kind] == [answer]
            elif qtype == "形状":
                colour = question[len("图中"):question.index("的")]
                assert [s.kind for s in scene.shapes if s.colour == colour] == [answer]
            elif qtype == "数量" and question == "图中有几个图形？":
                assert answer == str(len(scene.shapes))
        # The colour of a shape is where it is drawn: the centre pixel of a circle or a square.
        pixels = np.asarray(scene.image)
        for s in scene.shapes:
            if s.kind in ("圆形", "正方形"):
                cell = 64 / 3
                x = int((s.col + 0.5) * cell + s.dx / 4)
                y = int((s.row + 0.5) * cell + s.dy / 4)
                assert np.abs(pixels[y, x].astype(int) - COLOURS[s.colour]).max() < 40


def test_shapes_conversations_caption_and_qa_kinds():
    captions = shapes_conversations("test", "caption", n=20)
    assert len(captions) == 20 and all(isinstance(c.image, Image.Image) for c in captions)
    assert captions[16].where == "builtin:shapes-zh#test:17"
    assert all(c.messages[0]["content"].startswith(IMAGE_PLACEHOLDER + "\n") for c in captions)
    assert len({c.messages[0]["content"] for c in captions}) > 1  # prompts vary
    qa = image_conversations("builtin:shapes-zh#test", kind="qa", n=20)
    assert len(qa) > 40 and all(c.qtype for c in qa)
    assert image_conversations("builtin:shapes-zh", kind="caption", n=3)[0].where == "builtin:shapes-zh#train:1"
    with pytest.raises(UserError, match="unknown kind 'story'"):
        shapes_conversations("val", "story", n=2)


@pytest.mark.parametrize("kind", ["qa", "caption"])
def test_written_shapes_folder_reads_back_as_the_builtin_conversations(tmp_path, kind):
    data = write_shapes_folder(tmp_path / "shapes", "val", 12, kind, seed=5)
    assert data == tmp_path / "shapes" / "data.json"
    assert sorted(p.name for p in (tmp_path / "shapes" / "images").iterdir())[:2] == ["0001.png", "0002.png"]
    memory = shapes_conversations("val", kind, n=12, seed=5)
    bad = BadRecords()
    files = read_image_conversations(str(data), None, bad=bad)
    assert bad.count == 0 and len(files) == len(memory)
    for f, m in zip(files, memory):
        assert f.messages == m.messages and f.qtype == m.qtype
        assert np.array_equal(np.asarray(open_image(f.image)), np.asarray(m.image))
    assert files[0].where == f"{data}:2"
    # Written again over itself: allowed (an earlier such folder); over other files: refused.
    write_shapes_folder(tmp_path / "shapes", "val", 3, kind, seed=5)
    assert len(list((tmp_path / "shapes" / "images").iterdir())) == 3
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="exists and holds other files"):
        write_shapes_folder(tmp_path / "mine", "val", 3, kind)
