"""Every text and JSON file the package reads accepts a UTF-8 BOM (as Windows tools write it) and
turns other bad bytes into one line naming the file and line (the shared case bom-config-json)."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from babyllama.errors import UserError
from babyllama.textfile import read_json, read_json_object, read_text
from conftest import REPO, babyllama_cmd, cli_env

BOM = b"\xef\xbb\xbf"


def with_bom(path: Path) -> None:
    path.write_bytes(BOM + path.read_bytes())


def test_read_text_drops_a_bom_and_names_the_line_of_bad_bytes(tmp_path):
    (tmp_path / "a.txt").write_bytes(BOM + "第一行\n第二行".encode())
    assert read_text(tmp_path / "a.txt") == "第一行\n第二行"
    with gzip.open(tmp_path / "a.txt.gz", "wb") as f:
        f.write(BOM + "压缩".encode())
    assert read_text(tmp_path / "a.txt.gz") == "压缩"
    (tmp_path / "bad.txt").write_bytes("好\n好".encode() + b"\xff\n")
    with pytest.raises(UserError, match=r"bad\.txt:2: not UTF-8 text: byte 0xff at byte offset 7"):
        read_text(tmp_path / "bad.txt")
    (tmp_path / "bom-bad.txt").write_bytes(BOM + "北京".encode() + b"\xff")
    with pytest.raises(UserError, match=r"bom-bad\.txt:1: not UTF-8 text: byte 0xff at byte offset 9"):
        read_text(tmp_path / "bom-bad.txt")
    with pytest.raises(UserError, match=r"missing\.txt: no such file"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="cannot read"):
        read_text(tmp_path)


def test_read_json_accepts_a_bom_and_names_file_and_line(tmp_path):
    (tmp_path / "c.json").write_bytes(BOM + b'{"a": 1}')
    assert read_json(tmp_path / "c.json") == {"a": 1}
    (tmp_path / "bad.json").write_text('{\n  "a": 1,\n}', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json:3: not valid config\.json \("):
        read_json(tmp_path / "bad.json", "config.json")
    (tmp_path / "list.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(UserError, match="expected a JSON object, found list"):
        read_json_object(tmp_path / "list.json")


@pytest.fixture(scope="module")
def hf_dir_with_boms(tiny_tokenizer, tmp_path_factory):
    """A transformers export of a chat model whose every JSON file starts with a BOM."""
    from babyllama.export.hf import write_hf
    from babyllama.model.llama import Llama, ModelConfig
    from babyllama.tokenizer import Tokenizer
    from babyllama.tokenizer.chat_template import TEMPLATES

    tok = Tokenizer.load(tiny_tokenizer.save(tmp_path_factory.mktemp("tok")))
    tok.chat_template = TEMPLATES["chatml"]

    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))
    out = tmp_path_factory.mktemp("bom") / "hf"
    write_hf(model, tok, out, chat=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with_bom(out / name)
    return out


def test_a_transformers_directory_with_boms_loads_exports_and_imports(hf_dir_with_boms, tmp_path):
    from babyllama.export import export_run
    from babyllama.export.hf import import_hf
    from babyllama.llm import load

    llm = load(hf_dir_with_boms, device="cpu")
    assert isinstance(llm.generate("你好", max_new_tokens=3, temperature=0), str)
    assert llm.tokenizer.chat_template and not llm.tokenizer.chat_template.startswith("\ufeff")
    assert export_run(hf_dir_with_boms, "gguf", tmp_path / "gguf").path.is_file()
    run = import_hf(hf_dir_with_boms, tmp_path / "imported")
    assert load(run, device="cpu").generate("你好", max_new_tokens=3, temperature=0) == \
        llm.generate("你好", max_new_tokens=3, temperature=0)


def test_the_cli_reads_a_config_json_with_a_bom(hf_dir_with_boms, tmp_path):
    r = subprocess.run(babyllama_cmd() + ["generate", str(hf_dir_with_boms), "--prompt", "你好",
                                          "--max-new-tokens", "3"],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_chat_documents_templates_and_config_files_lose_their_bom(tiny_tokenizer, tmp_path):
    from babyllama.cli.chat import read_document
    from babyllama.config import load_config
    from babyllama.tokenizer.chat_template import render, resolve_template

    (tmp_path / "doc.txt").write_bytes(BOM + "  示例市位于河畔。\n".encode())
    assert read_document(str(tmp_path / "doc.txt")) == "示例市位于河畔。"
    (tmp_path / "t.jinja").write_bytes(BOM + b"{% for m in messages %}{{ m.content }}{% endfor %}")
    text, _ = render(resolve_template(str(tmp_path / "t.jinja")), [{"role": "user", "content": "你好"}])
    assert text == "你好"
    (tmp_path / "c.yaml").write_bytes(BOM + b"train:\n  lr: 0.01\n")
    assert load_config(str(tmp_path / "c.yaml")).train.lr == 0.01


def test_adapter_configs_retain_lists_and_id_maps_with_a_bom_are_read(tmp_path):
    pytest.importorskip("peft")
    from babyllama.lora import LoraConfig, apply_lora, load_adapter, save_adapter
    from babyllama.model.llama import Llama, ModelConfig
    from babyllama.tokenizer.trim import load_id_map, read_retain_file

    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16)
    save_adapter(apply_lora(Llama(config), LoraConfig(r=2)), tmp_path / "adapter")
    with_bom(tmp_path / "adapter" / "adapter_config.json")
    assert load_adapter(Llama(config), tmp_path / "adapter").peft_config["default"].r == 2
    (tmp_path / "retain.txt").write_bytes(BOM + "Python\n 机器学习\n".encode())
    assert read_retain_file(tmp_path / "retain.txt") == ["Python", " 机器学习"]
    (tmp_path / "id_map.json").write_bytes(BOM + json.dumps(
        {"original_vocab_size": 3, "old_to_new": {"0": 0, "2": 1}}).encode())
    assert load_id_map(tmp_path / "id_map.json").tolist() == [0, -1, 1]


# Reading a file by any other route would bring back the defect: a BOM kept in the text, or
# json.loads refusing it. Allowed: textfile.py itself, and the streaming corpus readers, which
# drop a BOM at the first line themselves (data/readers.py, data/encoding.py).
DIRECT_READ = re.compile(r"\.read_text\(|json\.load\(|yaml\.safe_load\(open|\.from_file\("
                         r"|open\([^,()]+, encoding=\"utf-?8\"[,)]")  # reading text mode without -sig


def test_no_module_reads_a_text_file_around_textfile():
    offenders = []
    for path in sorted((REPO / "src" / "babyllama").rglob("*.py")):
        if path.name == "textfile.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if DIRECT_READ.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "read these through babyllama.textfile:\n" + "\n".join(offenders)
