"""Export a run to the formats other tools open, and import transformers checkpoints.

    hf    transformers directory: config.json, model.safetensors, tokenizer files   (hf.py)
          (an image-text run: transformers' LLaVA, with the image processor's files)  (llava.py)
    gguf  one .gguf file for llama.cpp: f32, f16 or q8_0 tensors, tokenizer inside  (gguf.py)
    onnx  model.onnx (logits, past key/values in and out) + tokenizer files          (onnx.py)

Each is proven to give our model's outputs by a test against the tool that reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from babyllama.atomic import check_output_dir
from babyllama.errors import UserError
from babyllama.export.gguf import write_gguf
from babyllama.export.hf import write_hf, write_hf_reward, write_model_files
from babyllama.export.llava import check_llava_exportable
from babyllama.export.onnx import write_onnx
from babyllama.export.source import load_export_source
from babyllama.run import Run

# Weight types per format; the first is the default.
DTYPES: dict[str, tuple[str, ...]] = {
    "hf": ("f32", "f16", "bf16"),
    "gguf": ("f16", "f32", "q8_0"),
    "onnx": ("f32",),
}


# The file that marks a directory as an earlier export of the format (gguf writes one file).
EXPORT_MARKERS = {"hf": "config.json", "onnx": "model.onnx"}
ANY_NAME = re.compile(r".*", re.DOTALL)


@dataclass
class Exported:
    path: Path                 # the directory (hf, onnx) or file (gguf) written
    files: list[Path]
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.is_file())


def check_export_options(fmt: str, dtype: str | None) -> str:
    """The dtype to use; unknown formats and types are refused before any model loads."""
    if fmt not in DTYPES:
        raise UserError(f"--format {fmt}: unknown, choose one of {', '.join(DTYPES)}")
    dtype = dtype or DTYPES[fmt][0]
    if dtype not in DTYPES[fmt]:
        raise UserError(f"--dtype {dtype}: the {fmt} format takes {', '.join(DTYPES[fmt])}")
    return dtype


def gguf_path(out: Path, run: Path, dtype: str) -> Path:
    """`-o` names the file (ending .gguf) or a directory to put RUN-DTYPE.gguf in. Raises
    UserError where that would replace a file that is not a GGUF file (or needs a directory
    where a file is)."""
    path = out if out.suffix == ".gguf" else out / f"{run.resolve().name}-{dtype}.gguf"
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{parent}: exists and is not a directory; choose another -o")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; name a .gguf file or a folder to put it in")
    if path.exists():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":  # the magic every GGUF file starts with
                raise UserError(f"{path}: exists and is not a GGUF file; choose another -o")
    return path


def export_run(run: str | Path, fmt: str, out: str | Path, dtype: str | None = None,
               merge: bool = False) -> Exported:
    """Write the run (or transformers directory) `run` in format `fmt` to `out`."""
    dtype = check_export_options(fmt, dtype)
    run, out = Path(run), Path(out)
    if fmt in EXPORT_MARKERS:
        # An export writes files into `out` without deleting any: refuse a folder of other
        # things, whose files would be listed as exported; an earlier export is rewritten.
        check_output_dir(out, EXPORT_MARKERS[fmt], ANY_NAME)
    path = gguf_path(out, run, dtype) if fmt == "gguf" else out  # checked before the model loads
    if Run(run).is_vision():
        if fmt != "hf":
            raise UserError(f"{run}: gguf/onnx export of an image-text model is not supported: "
                            "use --format hf (LLaVA)")
        check_llava_exportable(Run(run).config().vlm, run)
    if Run(run).is_reward_model():
        if fmt != "hf":
            raise UserError(f"{run}: a reward model exports only to transformers (--format hf, as "
                            f"LlamaForSequenceClassification); {fmt} files hold language models")
        source = Run(run)
        model = source.load_reward_model().float().eval()
        warnings = write_hf_reward(model, source.load_tokenizer(), out, dtype=dtype)
        return Exported(out, sorted(p for p in out.iterdir() if p.is_file()), warnings)
    src = load_export_source(run, merge=merge)
    if fmt == "hf":
        warnings = write_hf(src.model, src.tokenizer, out, dtype=dtype, chat=src.chat)
        return Exported(out, sorted(p for p in out.iterdir() if p.is_file()), warnings)
    if fmt == "gguf":
        path.parent.mkdir(parents=True, exist_ok=True)
        result = write_gguf(src.model, src.tokenizer, path, dtype=dtype,
                            name=run.resolve().name, chat=src.chat)
        return Exported(path, [path], list(result.warnings))
    out.mkdir(parents=True, exist_ok=True)
    write_onnx(src.model, out / "model.onnx")
    # Next to the graph, the files that say how to feed it: sizes, tokenizer, stop tokens.
    warnings = write_model_files(src.model, src.tokenizer, out, src.chat)
    return Exported(out, sorted(p for p in out.iterdir() if p.is_file()), warnings)
