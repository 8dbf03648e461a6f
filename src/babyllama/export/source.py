"""What every export format starts from: a run's model (fp32, CPU, plain row-major weights)
and its tokenizer, with a LoRA run refused unless the user asked to merge it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from babyllama.errors import UserError
from babyllama.model.llama import Llama
from babyllama.run import Run
from babyllama.tokenizer import Tokenizer


@dataclass
class ExportSource:
    model: Llama              # eval mode, fp32, CPU, contiguous weights
    tokenizer: Tokenizer
    path: Path                # the run (or transformers) directory it came from
    chat: bool                # an SFT run: chat prompts are its normal input


def load_export_source(path: str | Path, merge: bool = False) -> ExportSource:
    """The run at `path` ready to export. A LoRA run holds only its adapter: the file the
    other tools open must hold the merged weights, so exporting one needs `merge=True`
    (merged in memory here) or a `babyllama merge-lora` run first."""
    run = Run(path)
    run.require_exists()
    if run.is_lora() and not merge:
        raise UserError(f"{path}: a LoRA run (adapter only); add --merge to fold the adapter into "
                        f"its base while exporting, or run `babyllama merge-lora {path} -o "
                        f"{path}-merged` and export that")
    tokenizer = run.load_tokenizer()
    model = run.load_model().float().eval()
    with torch.no_grad():  # merged or loaded weights may be views; files need plain layout
        for p in model.parameters():
            p.data = p.data.contiguous()
    return ExportSource(model, tokenizer, run.path, run.chats())
