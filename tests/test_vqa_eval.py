"""The `vqa` evaluation task: answer normalisation and exact-match scoring, the majority
baseline, the image derangement, and `babyllama eval RUN --task vqa` on a tiny image-text run."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from PIL import Image

from babyllama.cli import main
from babyllama.data.llava import IMAGE_PLACEHOLDER, ImageConversation
from babyllama.data.shapes import QTYPES
from babyllama.errors import UserError
from babyllama.eval import vqa
from babyllama.eval.vqa import (ALL, OTHER, VQAOptions, answer_matches, derangement, image_order,
                                majority_baseline, normalize_answer, prepare, run_vqa, score_answers,
                                vqa_scores)

# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("text,normal", [
    ("红色", "红色"),
    ("  红色。 ", "红色"),
    ("红色！", "红色"),
    ("“红色。”", "红色"),
    ("３", "3"),                 # full-width digit
    ("3，", "3"),
    ("Yes.", "yes"),
    ("a  red\ncircle", "a red circle"),
    ("左边。。", "左边"),
    ("", ""),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize("predicted,reference,ok", [
    ("红色", "红色", True),
    ("红色。", "红色", True),
    (" 三角形 ", "三角形", True),
    ("３", "3", True),
    ("3个", "3", True),          # a number with its measure word
    ("3个图形", "3", False),
    ("三", "3", False),          # Chinese numerals are not read
    ("红色的", "红色", False),
    ("是红色", "红色", False),
    ("13", "3", False),
    ("红", "红色", False),
    ("", "红色", False),
    ("。", "。", False),         # nothing left to compare: never a match
    ("YES", "yes", True),
])
def test_answer_matches_is_exact_after_normalisation(predicted, reference, ok):
    assert answer_matches(predicted, reference) is ok


def test_score_answers_scores_each_pair_in_order():
    assert score_answers(["红色。", "蓝色", "2个", "左边"], ["红色", "绿色", "2", "右边"]) == [True, False, True, False]
    assert score_answers([], []) == []
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_answers(["a", "b"], ["a"])


def conv(qtype: str, answer: str, image="img", question="问题？") -> ImageConversation:
    return ImageConversation(image, [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
                                     {"role": "assistant", "content": answer}], "test:1", qtype)


def test_majority_baseline_is_the_most_frequent_answer_share_per_type():
    convs = ([conv("颜色", "红色")] * 3 + [conv("颜色", "蓝色。")] * 1 + [conv("颜色", "蓝色")] * 2
             + [conv("数量", "3"), conv("数量", "３"), conv("数量", "1"), conv("数量", "2")]
             + [conv("", "一只猫"), conv("", "一只猫"), conv("", "一只狗", image=None)])
    m = majority_baseline(convs)
    assert m["颜色"] == pytest.approx(3 / 6)      # 蓝色 (3 with the 。) ties 红色 (3)
    assert m["数量"] == pytest.approx(2 / 4)      # "3" and "３" are one answer
    assert m[OTHER] == 1.0                         # the image-less conversation is not counted
    assert m[ALL] == pytest.approx((3 + 2 + 2) / 12)
    assert majority_baseline([]) == {}


# ----------------------------------------------------------------------------- derangement


@pytest.mark.parametrize("groups", [
    list(range(7)),
    [0, 0, 0, 1, 1, 2, 3, 3, 4, 5],
    [0, 0, 1, 1],
    ["a", "a", "a", "b", "c", "d"],
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_derangement_gives_every_question_another_picture(groups, seed):
    perm = derangement(groups, seed)
    assert sorted(perm) == list(range(len(groups)))              # a permutation
    assert all(groups[perm[i]] != groups[i] for i in range(len(groups)))
    assert derangement(groups, seed) == perm                      # reproducible


def test_derangement_depends_on_the_seed_and_refuses_the_impossible():
    groups = list(range(20))
    assert len({tuple(derangement(groups, s)) for s in range(5)}) > 1
    assert derangement([], 0) == []
    for impossible in ([0], [0, 0, 0, 1], [5, 5]):
        with pytest.raises(UserError, match="cannot shuffle the images"):
            derangement(impossible)


# ----------------------------------------------------------------------------- on a tiny run


def test_vqa_through_the_cli_writes_the_report_with_every_type(vision_run, capsys):
    assert main(["eval", str(vision_run), "--task", "vqa", "--data", "builtin:shapes-zh#test",
                 "--limit", "20", "--shuffle-images", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1:-1] == [" type ", " n ", " accuracy ", " shuffled images ", " majority ",
                                         " images/s "]
    labels = [line.split("|")[1].strip() for line in table[2:]]
    assert labels == list(QTYPES) + [ALL]
    name = "vqa-builtin-shapes-zh-test"
    report = vision_run / "eval"
    record = json.loads((report / f"{name}.json").read_text(encoding="utf-8"))
    m = record["metrics"]
    assert m["n"] == 20 and sum(m[f"n/{t}"] for t in QTYPES) == 20
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["accuracy_shuffled_images"] <= 1
    assert m["images_per_s"] > 0 and record["settings"]["shuffle_images"] is True
    examples = [json.loads(line) for line in (report / f"{name}.examples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(examples) == 20
    assert all(e["image_from_shuffled"] != e["where"] for e in examples)  # another scene's picture
    # The table's accuracies are the examples' scores, and its majority the references'.
    correct = Counter(e["qtype"] for e in examples if e["correct"])
    for line in table[2:-1]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        n = int(cells[1])
        assert float(cells[2]) == pytest.approx(correct[cells[0]] / n, abs=1e-4)
        refs = Counter(e["reference"] for e in examples if e["qtype"] == cells[0])
        assert float(cells[4]) == pytest.approx(refs.most_common(1)[0][1] / n, abs=1e-4)
    assert "# vqa: builtin:shapes-zh#test" in (report / f"{name}.md").read_text(encoding="utf-8")


def test_shuffled_images_change_only_the_pictures(vision_run, monkeypatch):
    from babyllama.llm import load

    llm = load(vision_run, device="cpu")
    convs = vqa.image_conversations("builtin:shapes-zh#test", n=6, size=32)
    calls: dict[bool, list] = {False: [], True: []}
    real = vqa.complete
    for shuffle in (False, True):
        def spy(model, tokenizer, prompts, cfg, stops, pixel_values, _shuffle=shuffle):
            calls[_shuffle].append((prompts, pixel_values))
            return real(model, tokenizer, prompts, cfg, stops, pixel_values=pixel_values)
        monkeypatch.setattr(vqa, "complete", spy)
        result = vqa_scores(llm.model, llm.tokenizer, convs, shuffle=shuffle, batch_size=4, progress=False)
        assert len(result.examples) == len(convs) and result.shuffled is shuffle
    (plain, shuffled) = calls[False], calls[True]
    assert [p for p, _ in plain] == [p for p, _ in shuffled]     # the same token ids, batch by batch
    pixels, mixed = torch.cat([x for _, x in plain]), torch.cat([x for _, x in shuffled])
    assert pixels.shape == mixed.shape
    assert all(not torch.equal(a, b) for a, b in zip(pixels, mixed))  # every question another picture
    # The pictures are the same set, moved: the derangement of `image_order`.
    prepared = prepare(llm.model, llm.tokenizer, convs, vqa.image_processing_of(llm.model))
    order = image_order(prepared, shuffle=True)
    assert order == derangement(prepared.image_index, 0)
    # The model reads them: a question's first-token logits change with its picture.
    ids = torch.tensor([prepared.prompts[0]])
    own = torch.stack([prepared.pixels(prepared.image_index[0])])
    other = torch.stack([prepared.pixels(prepared.image_index[order[0]])])
    with torch.no_grad():
        a, _ = llm.model(ids, pixel_values=own, last_only=True)
        b, _ = llm.model(ids, pixel_values=other, last_only=True)
    assert not torch.allclose(a, b)


def test_vqa_reads_llava_files_and_skips_conversations_without_an_image(vision_run, tmp_path, capsys):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "pics" / "red.png")
    Image.new("RGB", (40, 40), (30, 70, 230)).save(tmp_path / "pics" / "blue.png")
    records = [{"image": "red.png", "qtype": "颜色",
                "conversations": [{"from": "human", "value": "<image>\n这是什么颜色？"}, {"from": "gpt", "value": "红色"}]},
               {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
               {"image": "blue.png",
                "conversations": [{"from": "human", "value": "<image>\n图里有什么？"}, {"from": "gpt", "value": "蓝色"},
                                  {"from": "human", "value": "是什么颜色？"}, {"from": "gpt", "value": "蓝色。"}]}]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert main(["eval", str(vision_run), "--task", "vqa", "--data", str(data), "--device", "cpu",
                 "--images", str(tmp_path / "pics"), "--name", "vqa-mine"]) == 0
    out = capsys.readouterr().out
    assert "skipped: 1 no image" in out
    record = json.loads((vision_run / "eval" / "vqa-mine.json").read_text(encoding="utf-8"))
    assert record["metrics"]["n"] == 2 and record["metrics"]["skipped"] == 1
    assert record["metrics"]["n/颜色"] == 1 and record["metrics"][f"n/{OTHER}"] == 1
    examples = [json.loads(line) for line in
                (vision_run / "eval" / "vqa-mine.examples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["question"] for e in examples] == ["这是什么颜色？", "是什么颜色？"]  # the last user turn
    assert [e["reference"] for e in examples] == ["红色", "蓝色。"]


def test_vqa_refuses_a_text_model_in_one_line(pretrained_run, capsys):
    assert main(["eval", str(pretrained_run), "--task", "vqa", "--data", "builtin:shapes-zh#test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "image-text run" in err and "\n" not in err
    from babyllama.llm import load

    llm = load(pretrained_run, device="cpu")
    with pytest.raises(UserError, match="needs an image-text model"):
        run_vqa(llm.model, llm.tokenizer, VQAOptions(data="builtin:shapes-zh#test", limit=2, progress=False))
