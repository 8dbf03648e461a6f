"""Image-text conversations: LLaVA / Chinese-LLaVA instruction data and the built-in shapes set.

A .json file holds a list of records (or an object of records keyed by id, or of lists of
records, {"train": [...], ...}: all of them, or the one `file.json#key` names); a .jsonl file
one record per line; a directory, every .json/.jsonl file in it. A record:

    {"id": "000001", "image": "coco/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\n图中有什么？"},
                       {"from": "gpt", "value": "一只猫。"}, ...]}

or OpenAI-style messages: {"image": ..., "messages": [{"role": "user", "content": ...}, ...]}
(a content may be a list of parts: {"type": "text", "text": ...} and {"type": "image"} or
{"type": "image_url", ...}, the image part standing where the picture goes).

    convs = read_image_conversations("data.json", Path("images"), skip_bad=True, bad=bad)
    convs = image_conversations("builtin:shapes-zh#val", kind="qa")   # files or built-ins

Each `ImageConversation` has messages [{"role": "system"|"user"|"assistant", "content": str}]
in which the picture is the literal IMAGE_PLACEHOLDER ("<|image|>", the tokenizer's reserved
token). As LLaVA does, a user turn's `<image>` (or "<|image|>") is taken out of its text and
put at the start, followed by a newline: "问题\\n<image>" and "<image>\\n问题" both become
"<|image|>\\n问题"; a turn that is only "<image>" becomes "<|image|>". A record with an image
and no placeholder gets one at the start of its first user turn (LLaVA's convention). A record
without "image" is a text-only conversation (image None).

The image path is `images_dir / record["image"]`, or relative to the data file's folder when
no images_dir is given. Problems:
- a missing, corrupt or truncated image, or one too large to decode safely: always a counted
  skip (reason "missing image" / "unreadable image"), the message naming file:line and the
  image; images are decoded (JPEGs at 1/8 scale) to check them, a few at a time in threads.
- `<image>` more than once while one image is given, `<image>` without an image, a placeholder
  in an assistant turn, roles that do not alternate user/assistant (one leading system turn
  allowed), an empty message, a last turn not from the assistant, a record of the wrong shape:
  `UserError("file:line: problem")`, or a counted skip with `skip_bad`.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from babyllama.data.images import check_image
from babyllama.data.records import (BadRecords, Record, Reporter, Unreadable, id_records,
                                    item_lines, json_or_lines, json_type, jsonl_records,
                                    keyed_by_id, load_json, source_files)
from babyllama.errors import UserError

IMAGE_PLACEHOLDER = "<|image|>"
LLAVA_IMAGE_TOKEN = "<image>"
BUILTIN_PREFIX = "builtin:"
_KINDS = {".json": "json", ".jsonl": "jsonl"}
SUPPORTED = ".json (a list of records), .jsonl (and .gz of either), or a directory of them"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
# Either spelling of the placeholder, with the blanks around it (taken out with it).
_PLACEHOLDER = re.compile(r"[ \t]*(?:<image>|<\|image\|>)[ \t]*\n?")
_CHECK_THREADS = 8


@dataclass
class ImageConversation:
    """One conversation about (at most) one image: `image` a file (Path), a picture in memory
    (built-in sets), or None for text only; `messages` as the module docstring says; `where`
    "file:line" or "builtin:shapes-zh#test:17"; `qtype` the question type of a checkable
    question ("颜色", "形状", "数量", "位置"), "" otherwise."""

    image: Path | Image.Image | None
    messages: list[dict]
    where: str
    qtype: str = ""


class BadImageRecord(Exception):
    """One record is not a usable image conversation; the message says why (the caller adds
    file:line)."""


def image_conversations(source: str, images_dir: Path | None = None, *, kind: str = "qa",
                        skip_bad: bool = False, bad: BadRecords | None = None, seed: int = 0,
                        size: int = 64, n: int | None = None) -> list[ImageConversation]:
    """The conversations of `source`: "builtin:shapes-zh[#split]" (train when no split is named;
    `kind` "caption" or "qa", `n` scenes (default the split's size), `seed`, `size` pixels), or
    a data file or directory read by `read_image_conversations` (kind, seed, size and n are not
    used). Raises UserError for an unknown built-in set or split and as the reader does."""
    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        from babyllama.data.shapes import SHAPES_SOURCE, SPLITS, shapes_conversations
        name, _, split = source.partition("#")
        if name != SHAPES_SOURCE:
            raise UserError(f"{source}: no such built-in image set (available: {SHAPES_SOURCE})")
        split = split or "train"
        if split not in SPLITS:
            raise UserError(f"{source}: no split '{split}' (splits: {', '.join(SPLITS)})")
        return shapes_conversations(split, kind, n=n, seed=seed, size=size)
    return read_image_conversations(source, images_dir, skip_bad=skip_bad, bad=bad)


def read_image_conversations(source: str, images_dir: Path | None, *, skip_bad: bool = False,
                             bad: BadRecords | None = None) -> list[ImageConversation]:
    """The conversations of a LLaVA-style .json/.jsonl file (or `file.json#key`, or a directory
    of such files), in file order, their images checked (module docstring). Raises UserError
    for a missing or unsupported file and, unless `skip_bad`, the first bad record; bad
    records under `skip_bad`, and records whose image is missing or unreadable (always), are
    counted in `bad`."""
    report = Reporter(skip_bad, bad)
    convs: list[ImageConversation] = []
    for path, split in source_files(source, _KINDS, SUPPORTED):
        base = Path(images_dir) if images_dir is not None else path.parent
        for record in _records(path, split):
            if isinstance(record.value, Unreadable):
                report(record.where, record.value.problem, record.value.reason)
                continue
            try:
                convs.append(parse_record(record.value, record.where, base))
            except BadImageRecord as e:
                report(record.where, str(e))
    return _with_usable_images(convs, report.bad)


def parse_record(record, where: str, images_dir: Path) -> ImageConversation:
    """One record as an ImageConversation (its image not checked); raises BadImageRecord."""
    if not isinstance(record, dict):
        raise BadImageRecord(f"expected an object, found {json_type(record)}")
    image = _image_path(record, images_dir)
    if "conversations" in record:
        turns = _turns(record["conversations"], "conversations", ("from", "role"), ("value", "content"))
    elif "messages" in record:
        turns = _turns(record["messages"], "messages", ("role", "from"), ("content", "value"))
    else:
        fields = ", ".join(map(str, list(record)[:10])) or "none"
        raise BadImageRecord(f"no 'conversations' or 'messages' field (fields: {fields})")
    qtype = record.get("qtype", "")
    return ImageConversation(image, _messages(turns, image is not None), where,
                             qtype if isinstance(qtype, str) else "")


def _records(path: Path, split: str | None) -> Iterator[Record]:
    if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        yield from jsonl_records(path)
        return
    if split is not None:  # file.json#key: the list under that key, records counted
        top = load_json(path)
        if not isinstance(top, dict) or not isinstance(top.get(split), list):
            raise UserError(f"{path}#{split}: no list of records under the key '{split}'")
        for i, item in enumerate(top[split], 1):
            yield Record(f"{path}:{split} record {i}", item)
        return
    shape, top = json_or_lines(path)
    if shape == "jsonl":  # JSON lines under a .json name
        yield from jsonl_records(path)
        return
    if top is None:
        return
    if keyed_by_id(top) and not any(k in top for k in ("conversations", "messages", "image")):
        yield from id_records(path, top)
        return
    if isinstance(top, dict) and top and all(isinstance(v, list) for v in top.values()):
        for key, items in top.items():  # splits: {"train": [...], "val": [...]}
            for i, item in enumerate(items, 1):
                yield Record(f"{path}:{key} record {i}", item)
        return
    if not isinstance(top, list):
        raise UserError(f"{path}:1: expected a JSON list of records, found {json_type(top)}")
    for line, item in zip(item_lines(path, top), top):
        yield Record(f"{path}:{line}", item, line, line)


def _image_path(record: dict, images_dir: Path) -> Path | None:
    image = record.get("image")
    if isinstance(image, list):  # multi-image records: one image is supported
        if len(image) > 1:
            raise BadImageRecord(f"{len(image)} images; one image per conversation is supported")
        image = image[0] if image else None
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise BadImageRecord(f"'image' is {json_type(image)}, not a string")
    return images_dir / image


def _turns(value, field: str, role_keys: tuple[str, str], content_keys: tuple[str, str]
           ) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        raise BadImageRecord(f"'{field}' is {json_type(value)}, not a list")
    if not value:
        raise BadImageRecord(f"'{field}' is empty")
    turns = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise BadImageRecord(f"message {i} is {json_type(m)}, not an object")
        role_key = next((k for k in role_keys if k in m), None)
        content_key = next((k for k in content_keys if k in m), None)
        if role_key is None:
            raise BadImageRecord(f"message {i} has no '{role_keys[0]}' (or '{role_keys[1]}')")
        if content_key is None:
            raise BadImageRecord(f"message {i} has no '{content_keys[0]}' (or '{content_keys[1]}')")
        raw_role = m[role_key]
        role = ROLES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise BadImageRecord(f"message {i} has unknown role {raw_role!r} (known: {', '.join(ROLES)})")
        turns.append((role, _content(m[content_key], i)))
    return turns


def _content(content, i: int) -> str:
    if isinstance(content, list):  # OpenAI content parts
        out = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif kind in ("image", "image_url"):
                out.append(LLAVA_IMAGE_TOKEN + "\n")
            else:
                raise BadImageRecord(f"message {i} has a content part that is neither text nor image")
        return "".join(out)
    if not isinstance(content, str):
        raise BadImageRecord(f"message {i} is {json_type(content)}, not a string")
    return content


def _messages(turns: list[tuple[str, str]], has_image: bool) -> list[dict]:
    """Checked messages, the image placeholder normalised (module docstring)."""
    count = sum(len(_PLACEHOLDER.findall(content)) for _, content in turns)
    if count and not has_image:
        raise BadImageRecord(f"{LLAVA_IMAGE_TOKEN} placeholder but no image")
    if count > 1:
        raise BadImageRecord(f"{LLAVA_IMAGE_TOKEN} appears {count} times; one image is given")
    messages: list[dict] = []
    for i, (role, content) in enumerate(turns, 1):
        holds = bool(_PLACEHOLDER.search(content))
        text = _PLACEHOLDER.sub("\n", content).strip() if holds else content.strip()
        text = re.sub(r"\n{3,}", "\n\n", text) if holds else text
        if not text and not holds:
            raise BadImageRecord(f"message {i} ({role}) is empty")
        if role == "system":
            if i != 1:
                raise BadImageRecord(f"message {i} is a system message inside the conversation; "
                                     f"only a leading one is supported")
        else:
            expected = "user" if not messages or messages[-1]["role"] != "user" else "assistant"
            if role != expected:
                raise BadImageRecord(f"message {i} is from the {role}; roles must alternate "
                                     f"user, assistant, ... (starting with the user)")
        if holds:
            if role != "user":
                raise BadImageRecord(f"message {i} ({role}) holds the {LLAVA_IMAGE_TOKEN} "
                                     f"placeholder; it belongs in a user message")
            text = IMAGE_PLACEHOLDER + ("\n" + text if text else "")
        messages.append({"role": role, "content": text})
    if not messages or messages[-1]["role"] != "assistant":
        raise BadImageRecord("the last message is not from the assistant" if messages
                             else "no messages")
    if has_image and not count:
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = IMAGE_PLACEHOLDER + "\n" + first["content"]
    return messages


def _with_usable_images(convs: list[ImageConversation], bad: BadRecords) -> list[ImageConversation]:
    """The conversations whose image (if any) opens; the others counted in `bad`. Each image
    file is checked once, several at a time (Pillow decodes outside the GIL)."""
    paths = list(dict.fromkeys(c.image for c in convs if isinstance(c.image, Path)))
    if not paths:
        return convs
    threads = max(1, min(_CHECK_THREADS, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(threads) as pool:
        problems = dict(zip(paths, pool.map(_image_problem, paths)))
    kept = []
    for conv in convs:
        problem = problems.get(conv.image) if isinstance(conv.image, Path) else None
        if problem is None:
            kept.append(conv)
        else:
            bad.add(conv.where, problem[0], problem[1])
    return kept


def _image_problem(path: Path) -> tuple[str, str] | None:
    """(problem, reason) for an image file that cannot be used, None for a good one."""
    if not path.is_file():
        return f"missing image {path}", "missing image"
    try:
        check_image(path)
    except UserError as e:
        return f"unreadable image {e}", "unreadable image"
    return None
