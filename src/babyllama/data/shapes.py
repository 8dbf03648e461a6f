"""The built-in synthetic image set `builtin:shapes-zh`: pictures of coloured shapes with Chinese
captions and questions whose answers can be checked.

    scenes = shape_scenes("test")                     # 500 ShapeScene(image, caption, questions)
    convs = shapes_conversations("train", "caption")  # alignment: image -> caption
    convs = shapes_conversations("val", "qa")         # one conversation per question, qtype set
    write_shapes_folder(Path("shapes"), "test", 100, "qa")  # images/NNNN.png + data.json

A scene is 1-4 shapes (圆形, 正方形, 三角形, 十字形) in six clearly separable colours (红色,
绿色, 蓝色, 黄色, 紫色, 黑色) on a white canvas of `size` pixels (64 by default), each in its own
cell of a 3x3 grid (so none overlap) with a random size and offset in the cell; drawn at 4x and
scaled down, so edges are smooth. Kinds, colours and counts are drawn uniformly, so the answers
of each question type are balanced and the text of a question does not give its answer away.

Questions (qtype, question, answer), asked only where the answer is unambiguous:
- 颜色: 图中的三角形是什么颜色？ -> 红色 (the only triangle)
- 形状: 图中红色的图形是什么形状？ -> 三角形 (the only red shape)
- 数量: 图中有几个图形？ -> 3 (two times in three), or 图中有几个圆形？ -> 2 (any kind, so
  the answer may be 0; a digit)
- 位置: 红色的圆形在图的左边还是右边？ -> 左边 / 上方还是下方 -> 下方 (a shape in a side column
  or row, the only one of its colour and kind)

Everything is a pure function of (split, seed, size): each split draws from its own
`random.Random` stream, and a scene's layout (kinds, colours, cells, pixel sizes and offsets) is
hashed into 100 buckets that belong to one split only (test 0-9, val 10-14, train the rest), so
no scene, hence no picture, is in two splits whatever the seed.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from babyllama.atomic import check_output_dir, replace_dir
from babyllama.data.llava import IMAGE_PLACEHOLDER, LLAVA_IMAGE_TOKEN, ImageConversation
from babyllama.errors import UserError

SHAPES_NAME = "shapes-zh"
SHAPES_SOURCE = "builtin:" + SHAPES_NAME
SPLITS = {"train": 4000, "val": 200, "test": 500}
_BUCKETS = {"test": range(0, 10), "val": range(10, 15)}
QTYPES = ("颜色", "形状", "数量", "位置")

KINDS = ("圆形", "正方形", "三角形", "十字形")
COLOURS = {"红色": (220, 30, 30), "绿色": (20, 160, 50), "蓝色": (30, 70, 230),
           "黄色": (240, 200, 0), "紫色": (150, 50, 190), "黑色": (20, 20, 20)}
BACKGROUND = (255, 255, 255)
GRID = 3
_SCALE = 4  # drawn at 4x, then scaled down
# Where each cell of the 3x3 grid is, in captions.
CELL_NAMES = (("左上方", "上方", "右上方"), ("左边", "中间", "右边"), ("左下方", "下方", "右下方"))
NUMBERS = ("零", "一", "两", "三", "四")
_OURS = re.compile(r"data\.json|images")  # what write_shapes_folder writes
CAPTION_PROMPTS = ("请描述这张图片。", "图中有什么？", "描述一下这张图。", "这张图片里画了什么？",
                   "请说说图里有哪些图形。")


@dataclass(frozen=True)
class Shape:
    kind: str    # one of KINDS
    colour: str  # one of COLOURS
    row: int     # grid cell, 0..GRID-1, top to bottom
    col: int     # left to right
    radius: int  # half the shape's side, in pixels of the 4x drawing
    dx: int      # offset of the centre from the cell's centre, 4x pixels
    dy: int


@dataclass
class ShapeScene:
    image: Image.Image
    caption: str
    questions: list[tuple[str, str, str]]  # (qtype, question, answer)
    shapes: list[Shape] = field(default_factory=list)


def shape_scenes(split: str, n: int | None = None, seed: int = 0, size: int = 64) -> list[ShapeScene]:
    """`n` scenes (default SPLITS[split]) of a split, a pure function of (split, seed, size);
    the first k scenes do not depend on n."""
    if split not in SPLITS:
        raise UserError(f"{SHAPES_SOURCE}#{split}: no such split (splits: {', '.join(SPLITS)})")
    if size < 16:
        raise UserError(f"{SHAPES_SOURCE}: image size must be at least 16 pixels, got {size}")
    n = SPLITS[split] if n is None else n
    rng = random.Random(f"{SHAPES_NAME}/{split}/{seed}/{size}")  # str seeds are stable
    scenes = []
    while len(scenes) < n:
        shapes = _layout(rng, size)
        if _split_of(shapes, size) != split:
            continue
        scenes.append(ShapeScene(draw(shapes, size), caption(shapes), _questions(shapes, rng), shapes))
    return scenes


def _layout(rng: random.Random, size: int) -> list[Shape]:
    cell = size * _SCALE / GRID
    count = rng.randint(1, 4)
    shapes = []
    for index in sorted(rng.sample(range(GRID * GRID), count)):
        radius = round(cell * rng.uniform(0.26, 0.40))
        room = int(cell / 2 - radius - 2 * _SCALE)  # the shape stays inside its cell
        dx, dy = (rng.randint(-room, room), rng.randint(-room, room)) if room > 0 else (0, 0)
        shapes.append(Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), index // GRID,
                            index % GRID, radius, dx, dy))
    return shapes


def _split_of(shapes: list[Shape], size: int) -> str:
    key = f"{size}|" + ";".join(f"{s.kind},{s.colour},{s.row},{s.col},{s.radius},{s.dx},{s.dy}"
                                for s in shapes)
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 100
    return next((split for split, buckets in _BUCKETS.items() if bucket in buckets), "train")


def draw(shapes: list[Shape], size: int) -> Image.Image:
    """The RGB picture of a layout, size x size pixels."""
    big = size * _SCALE
    cell = big / GRID
    image = Image.new("RGB", (big, big), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        x = (s.col + 0.5) * cell + s.dx
        y = (s.row + 0.5) * cell + s.dy
        r, colour = s.radius, COLOURS[s.colour]
        if s.kind == "圆形":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif s.kind == "正方形":
            q = r * 0.88  # a square looks bigger than a circle of the same width
            pen.rectangle((x - q, y - q, x + q, y + q), fill=colour)
        elif s.kind == "三角形":
            pen.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=colour)
        else:  # 十字形
            w = r * 0.36
            pen.rectangle((x - w, y - r, x + w, y + r), fill=colour)
            pen.rectangle((x - r, y - w, x + r, y + w), fill=colour)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def caption(shapes: list[Shape]) -> str:
    """"图中有两个图形：左边是一个红色的圆形，右上方是一个蓝色的正方形。" (reading order)."""
    parts = [f"{CELL_NAMES[s.row][s.col]}是一个{s.colour}的{s.kind}" for s in shapes]
    return f"图中有{NUMBERS[len(shapes)]}个图形：" + "，".join(parts) + "。"


def _questions(shapes: list[Shape], rng: random.Random) -> list[tuple[str, str, str]]:
    """One question of each type that has an unambiguous answer (module docstring)."""
    out = []
    by_kind = {k: [s for s in shapes if s.kind == k] for k in KINDS}
    by_colour = {c: [s for s in shapes if s.colour == c] for c in COLOURS}
    single_kinds = [k for k in KINDS if len(by_kind[k]) == 1]
    if single_kinds:
        k = rng.choice(single_kinds)
        out.append(("颜色", f"图中的{k}是什么颜色？", by_kind[k][0].colour))
    single_colours = [c for c in COLOURS if len(by_colour[c]) == 1]
    if single_colours:
        c = rng.choice(single_colours)
        out.append(("形状", f"图中{c}的图形是什么形状？", by_colour[c][0].kind))
    if rng.random() < 2 / 3:
        out.append(("数量", "图中有几个图形？", str(len(shapes))))
    else:  # any kind, absent ones too (0): the answers stay balanced
        k = rng.choice(KINDS)
        out.append(("数量", f"图中有几个{k}？", str(len(by_kind[k]))))
    placed = []
    for s in shapes:
        if sum(t.kind == s.kind and t.colour == s.colour for t in shapes) > 1:
            continue
        if s.col != 1:
            placed.append((s, "左边还是右边", "左边" if s.col == 0 else "右边"))
        if s.row != 1:
            placed.append((s, "上方还是下方", "上方" if s.row == 0 else "下方"))
    if placed:
        s, ask, answer = rng.choice(placed)
        out.append(("位置", f"{s.colour}的{s.kind}在图的{ask}？", answer))
    return out


def shapes_conversations(split: str, kind: str = "qa", n: int | None = None, seed: int = 0,
                         size: int = 64) -> list[ImageConversation]:
    """The scenes of `shape_scenes(split, n, seed, size)` as conversations whose image is the
    PIL picture: kind "caption", one per scene (a prompt from CAPTION_PROMPTS -> the caption),
    or "qa", one per question ("<|image|>\\n{question}" -> answer, qtype set). `where` is
    "builtin:shapes-zh#split:N", N the scene's 1-based number."""
    if kind not in ("caption", "qa"):
        raise UserError(f"{SHAPES_SOURCE}: unknown kind {kind!r} (kinds: caption, qa)")
    return _conversations(shape_scenes(split, n, seed, size), split, kind, seed)


def _conversations(scenes: list[ShapeScene], split: str, kind: str, seed: int) -> list[ImageConversation]:
    if kind not in ("caption", "qa"):
        raise UserError(f"{SHAPES_SOURCE}: unknown kind {kind!r} (kinds: caption, qa)")
    rng = random.Random(f"{SHAPES_NAME}/{split}/{seed}/prompts")
    convs = []
    for i, scene in enumerate(scenes, 1):
        where = f"{SHAPES_SOURCE}#{split}:{i}"
        for qtype, question, answer in _pairs(scene, kind, rng):
            convs.append(ImageConversation(scene.image, [
                {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
                {"role": "assistant", "content": answer}], where, qtype))
    return convs


def _pairs(scene: ShapeScene, kind: str, rng: random.Random) -> list[tuple[str, str, str]]:
    if kind == "caption":
        return [("", rng.choice(CAPTION_PROMPTS), scene.caption)]
    return scene.questions


def write_shapes_folder(out_dir: Path, split: str, n: int | None, kind: str = "qa", seed: int = 0,
                        size: int = 64) -> Path:
    """Write the conversations of `shapes_conversations(split, kind, n, seed, size)` as a LLaVA
    folder: images/NNNN.png (one per scene, numbered from 1) and data.json (a list, one record
    per line: id, image, conversations with "<image>", qtype), which
    `read_image_conversations(out_dir / "data.json", None)` reads back to the same
    conversations. The folder is built beside `out_dir` and moved into place whole; an
    existing `out_dir` must be empty or an earlier such folder. Returns the data.json path."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "data.json", _OURS)
    scenes = shape_scenes(split, n, seed, size)
    digits = max(4, len(str(len(scenes))))
    convs = _conversations(scenes, split, kind, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        for i, scene in enumerate(scenes, 1):
            buffer = io.BytesIO()
            scene.image.save(buffer, format="PNG")
            (tmp / "images" / f"{i:0{digits}d}.png").write_bytes(buffer.getvalue())
        records = []
        for k, conv in enumerate(convs, 1):
            i = int(conv.where.rsplit(":", 1)[1])
            question = conv.messages[0]["content"].replace(IMAGE_PLACEHOLDER, LLAVA_IMAGE_TOKEN, 1)
            records.append({"id": f"{SHAPES_NAME}-{split}-{k}", "image": f"images/{i:0{digits}d}.png",
                            "conversations": [{"from": "human", "value": question},
                                              {"from": "gpt", "value": conv.messages[1]["content"]}],
                            "qtype": conv.qtype})
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"
        (tmp / "data.json").write_bytes(text.encode("utf-8"))
        tmp.chmod(0o755)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "data.json"

