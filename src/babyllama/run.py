"""The run directory: the only code that knows its layout.

Every stage writes one, and every command that reads a model reads one:

    RUN/
      config.yaml                 the resolved RunConfig: stage, model, train, data, sft.base, lora
      model.safetensors           the weights (pretraining, full SFT, merged or imported runs)
      adapter_config.json         a LoRA run: peft's adapter config and tensors, in peft's own
      adapter_model.safetensors     layout; the base they apply to is config.yaml's sft.base
      tokenizer/                  the tokenizer, with the chat template of a fine-tuned run
      reference_logps.safetensors a DPO run: the reference model's log-probs of its pairs
      resume/                     the exact state to continue from (weights or adapter,
                                    optimizer.pt, trainer.json written last; an FSDP run:
                                    weights, dcp/ sharded model and optimizer, rng-RANK.pt)
      metrics.jsonl  loss.png  samples.txt     what training logged
      eval/NAME.md  NAME.json  NAME.examples.jsonl   evaluation results

A transformers directory (config.json + model.safetensors + tokenizer files) opens read-only
through the same type, so every command that loads a run also loads one.

`resume/` is replaced atomically: the new state goes to `resume.tmp/`, then the old directory
is moved aside and the new one renamed into place. A run killed at any instant leaves either
the old or the new complete state (`resume_dir` also looks at the moment between the renames).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from babyllama.atomic import atomic_path, atomic_write_text
from babyllama.config import CHAT_STAGES, VLM_STAGES, RunConfig, config_from_dict, read_yaml, save_config
from babyllama.errors import UserError
from babyllama.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_model, load_adapter,
                            merge_lora, save_adapter)
from babyllama.model import families
from babyllama.model.families import Family
from babyllama.model.llama import Llama, ModelConfig
from babyllama.model.reward import RewardModel
from babyllama.model.vision import VisionConfig, load_siglip_state
from babyllama.model.vlm import VisionLanguageModel
from babyllama.model.weights import load_state, load_weights, read_weights, save_weights
from babyllama.textfile import read_json, read_json_object, read_text
from babyllama.tokenizer import Tokenizer

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer"
RESUME = "resume"
OPTIMIZER_STATE = "optimizer.pt"
TRAINER_STATE = "trainer.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
SAMPLES = "samples.txt"
EVAL = "eval"
REFERENCE = "reference_logps.safetensors"  # a DPO run's reference log-probs (computed once)
HF_CONFIG = "config.json"  # a transformers directory
# The files that hold a run's own weights (a LoRA run's are its adapter's).
WEIGHT_FILES = (WEIGHTS, ADAPTER_CONFIG, ADAPTER_WEIGHTS)

# Families whose tensors are laid out as transformers' Llama's (model/families.py): their
# directories open as they are; the others are converted once by `babyllama import`.
OPEN_AS_IS = ("llama", "mistral", "qwen2")


def model_config_from_hf(path: Path) -> ModelConfig:
    """Our ModelConfig from a transformers `config.json` of a family that opens as it is
    (OPEN_AS_IS). Raises UserError for a family that needs `babyllama import` first, and for
    what our model cannot represent (model/families.py)."""
    config, family = hf_model_config(path)
    if family.model_type not in OPEN_AS_IS:
        raise UserError(f"{path}: a {family.name} checkpoint (its tensors need converting): run "
                        f"`babyllama import {path.parent} -o RUN` and use RUN")
    return config


def hf_model_config(path: Path) -> tuple[ModelConfig, Family]:
    """Our ModelConfig and the family (model/families.py) of a transformers `config.json`."""
    return families.model_config(read_json_object(path, HF_CONFIG), path)


# transformers' SiglipVisionConfig fields that map one to one onto VisionConfig.
SIGLIP_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps",
                      "attention_dropout")


def read_siglip(path: Path) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """A SigLIP directory a user already has (`SiglipVisionModel` or a whole `SiglipModel`:
    config.json + model.safetensors, optionally preprocessor_config.json) as our VisionConfig
    and the vision tower's tensors. Raises UserError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such SigLIP directory")
    d = read_json_object(path / HF_CONFIG, HF_CONFIG)
    kind = d.get("model_type")
    if kind == "siglip":
        d = d.get("vision_config") or {}
    elif kind != "siglip_vision_model":
        raise UserError(f"{path}: model_type is {kind!r}; the encoder loads SigLIP checkpoints "
                        "(siglip or siglip_vision_model)")
    for key in ("image_size", "patch_size"):
        if isinstance(d.get(key), (list, tuple)):
            raise UserError(f"{path}: non-square {key} {d[key]} is not supported")
    vision = VisionConfig(**{k: d[k] for k in SIGLIP_CONFIG_KEYS if k in d})
    processor = path / "preprocessor_config.json"
    if processor.exists():
        p = read_json_object(processor, "preprocessor_config.json")
        vision.image_mean = list(p.get("image_mean", vision.image_mean))
        vision.image_std = list(p.get("image_std", vision.image_std))
    problems = vision.problems(prefix="")
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no .safetensors weights (convert a pytorch_model.bin with transformers first)")
    state = {}
    for f in files:
        state.update(read_weights(f))
    return vision, load_siglip_state(state)


class Run:
    """A run directory (or a transformers directory, read-only) at `path`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # -- where things are -------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS

    @property
    def adapter_weights_file(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def loss_plot_file(self) -> Path:
        return self.path / LOSS_PLOT

    @property
    def samples_file(self) -> Path:
        return self.path / SAMPLES

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL

    @property
    def reference_file(self) -> Path:
        return self.path / REFERENCE

    # -- what kind of run it is -------------------------------------------------------------
    def is_run(self) -> bool:
        """A babyllama run directory (it has config.yaml)."""
        return self.config_file.exists()

    def is_transformers(self) -> bool:
        """A transformers directory (config.json, no config.yaml)."""
        return not self.is_run() and (self.path / HF_CONFIG).exists()

    def has_weights(self) -> bool:
        return self.weights_file.exists()

    def is_lora(self) -> bool:
        """A LoRA run: its own weights are an adapter over the base run in sft.base."""
        return self.adapter_weights_file.exists() and not self.has_weights()

    def has_adapter(self) -> bool:
        return self.adapter_weights_file.exists()

    def is_trained(self) -> bool:
        """Config, weights and tokenizer all present: a run another stage can start from."""
        return self.is_run() and self.has_weights() and self.tokenizer_dir.exists()

    def require_trained(self) -> None:
        for path in (self.config_file, self.weights_file, self.tokenizer_dir):
            if not path.exists():
                raise UserError(f"{self.path}: not a trained run directory (no {path.name})")

    def has_started(self) -> bool:
        """Training has written resume state here (a new run must not overwrite it)."""
        return (self.path / RESUME).exists()

    def refuse_overwrite(self) -> None:
        """Raise UserError if a run already lives here (pass --resume to continue it)."""
        if self.has_started():
            raise UserError(f"{self.path}: already holds a run; pass --resume to continue it or "
                            "choose another --out")

    def refuse_nonempty(self) -> None:
        """Raise UserError if the directory exists with anything in it (a new whole run is
        written here, never mixed into another)."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: exists and is not a directory; choose another -o")
        if self.path.exists() and any(self.path.iterdir()):
            raise UserError(f"{self.path}: exists and is not empty; choose another -o")

    def chats(self) -> bool:
        """Whether prompts go through the chat template by default: a fine-tuned (SFT) run, a
        released model's run (imported) with a chat template, or a transformers directory
        whose tokenizer has one."""
        if self.is_run():
            if self.config().stage in CHAT_STAGES:
                return True
            tokenizer = self.load_tokenizer()
            return tokenizer.fixed_vocab and tokenizer.chat_template is not None
        tok_cfg = self.path / "tokenizer_config.json"
        return tok_cfg.exists() and '"chat_template"' in read_text(tok_cfg)

    # -- reading ----------------------------------------------------------------------------
    def require_exists(self) -> None:
        if not self.path.is_dir():
            raise UserError(f"{self.path}: no such run directory")

    def config(self) -> RunConfig:
        """The saved RunConfig. Raises UserError if there is none or it does not validate."""
        if not self.config_file.exists():
            raise UserError(f"{self.path}: not a run directory (no {CONFIG})")
        return config_from_dict(read_yaml(self.config_file), str(self.config_file))

    def model_config(self) -> ModelConfig:
        """The model config of a run (config.yaml) or a transformers directory (config.json)."""
        if not self.path.exists():
            raise UserError(f"{self.path}: no such run directory")
        if self.is_run():
            return self.config().model
        if self.is_transformers():
            config = model_config_from_hf(self.path / HF_CONFIG)
            # Embedding rows past the tokenizer are dropped at load (families.trim_vocabulary).
            config.vocab_size = min(config.vocab_size, self.load_tokenizer().vocab_size)
            return config
        raise UserError(f"{self.path}: not a run directory (no {CONFIG}) nor a transformers "
                        f"directory (no {HF_CONFIG})")

    def base(self) -> "Run | None":
        """The run a fine-tuned run started from (sft.base), or None."""
        if not self.is_run():
            return None
        base = self.config().sft.base
        return Run(base) if base else None

    def load_tokenizer(self) -> Tokenizer:
        """The run's tokenizer/, or the tokenizer files of a transformers directory (whose
        vocabulary cannot grow: `Tokenizer.load`'s fixed_vocab)."""
        if self.tokenizer_dir.exists():
            return Tokenizer.load(self.tokenizer_dir)
        tokenizer = Tokenizer.load(self.path, fixed_vocab=True)
        n = read_json_object(self.path / HF_CONFIG, HF_CONFIG).get("vocab_size") if self.is_transformers() else None
        if isinstance(n, int) and tokenizer.vocab_size > n:
            raise UserError(f"{self.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                            f"only {n} embeddings")
        return tokenizer

    def load_model(self, config: ModelConfig | None = None) -> Llama:
        """The run's model: `model.safetensors`, or a LoRA run's adapter folded into its base
        (merged once here, so generation costs what a plain model costs)."""
        config = config or self.model_config()
        if self.is_reward_model():
            raise UserError(f"{self.path}: is a reward model (it scores answers, it does not generate): "
                            f"use `babyllama score {self.path} --data PAIRS`, or `babyllama grpo --reward rm:{self.path}`")
        if self.has_weights():
            model = self.new_model(config)
            if self.is_transformers():
                state = families.trim_vocabulary(read_weights(self.weights_file), config.vocab_size)
                load_state(model, state, self.weights_file)
            else:
                load_weights(model, self.weights_file)
            return model
        if self.has_adapter():
            base = self.base()
            if base is None or not base.has_weights():
                raise UserError(f"{self.path}: a LoRA adapter for the base run {base}, which has "
                                f"no {WEIGHTS} (moved? edit sft.base in {CONFIG})")
            model = base.new_model(config)
            load_weights(model, base.weights_file)
            return merge_lora(load_adapter(model, self.path))
        raise UserError(f"{self.path}: no {WEIGHTS} (has the run saved a checkpoint yet?)")

    def new_model(self, config: ModelConfig | None = None) -> Llama | VisionLanguageModel:
        """A freshly initialised model of this run's architecture (an image-text run's has the
        encoder and projector its `vlm:` section describes)."""
        config = config or self.model_config()
        if self.is_vision():
            return VisionLanguageModel(config, self.config().vlm)
        return Llama(config)

    def is_vision(self) -> bool:
        """An image-text run (`stage: align` or `instruct`): encoder + projector + language model."""
        return self.is_run() and self.config().stage in VLM_STAGES

    def is_reward_model(self) -> bool:
        """A reward model run (`stage: reward`): its weights have a scalar head, not an LM head."""
        return self.is_run() and self.config().stage == "reward"

    def load_reward_model(self) -> RewardModel:
        """The reward model of a `stage: reward` run. Raises UserError for any other run."""
        if not self.is_reward_model():
            raise UserError(f"{self.path}: not a reward model run (train one with `babyllama reward`)")
        if not self.has_weights():
            raise UserError(f"{self.path}: no {WEIGHTS} (has the run saved a checkpoint yet?)")
        model = RewardModel(self.model_config())
        load_weights(model, self.weights_file)
        return model

    # -- writing ----------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_file)

    def write_tokenizer(self, tokenizer: Tokenizer) -> None:
        tokenizer.save(self.tokenizer_dir)

    def write_weights(self, model: torch.nn.Module) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_weights(model, self.weights_file)

    def write_plain_run(self, model: torch.nn.Module, tokenizer: Tokenizer, cfg: RunConfig) -> None:
        """A complete run of plain weights (merged from LoRA, imported): weights, tokenizer,
        then config.yaml with LoRA turned off and out_dir pointing here. Written in a sibling
        staging folder renamed into place, so a failure leaves no half-written run; the
        destination must not exist or be empty (`refuse_nonempty`)."""
        staging = self.path.with_name(f".{self.path.name}.partial")
        try:
            shutil.rmtree(staging, ignore_errors=True)
            part = Run(staging)
            part.write_weights(model)
            part.write_tokenizer(tokenizer)
            plain = config_from_dict(cfg.to_dict(), "config")
            plain.lora.enabled = plain.lora.qlora = False
            plain.out_dir = str(self.path)
            part.write_config(plain)
            if self.path.is_dir():
                self.path.rmdir()  # empty: refuse_nonempty let it through
            os.replace(staging, self.path)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"{self.path}: cannot write the run ({e.strerror or e})") from None

    # -- resume state -----------------------------------------------------------------------
    def resume_dir(self) -> Path | None:
        """The complete resume state to continue from, or None if there is none yet."""
        for name in (RESUME, f"{RESUME}.old"):
            d = self.path / name
            if (d / TRAINER_STATE).exists():
                return d
        return None

    def check_training_start(self, resume: bool, max_steps: int) -> None:
        """Before a training stage starts here: a new run must not overwrite one
        (`refuse_overwrite`), a resumed one must have state to resume and not be behind its step
        (`check_resume_length`); the path must be a directory or nothing yet."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: exists and is not a directory; choose another -o")
        if resume:
            if self.resume_dir() is None:
                raise UserError(f"{self.path}: nothing to resume (no resume/ state); start without --resume")
            self.check_resume_length(max_steps)
        else:
            self.refuse_overwrite()

    def resume_step(self) -> int | None:
        """The optimizer step the resume state was saved at, or None without one."""
        d = self.resume_dir()
        return None if d is None else int(read_json(d / TRAINER_STATE)["step"])

    def check_resume_length(self, max_steps: int) -> None:
        """Raise UserError if a resumed run's train.max_steps is behind the step it has reached
        (it would train nothing and record a length the weights have passed)."""
        step = self.resume_step()
        if step is not None and max_steps < step:
            raise UserError(f"{self.path}: the run is at step {step}; train.max_steps={max_steps} "
                            f"is behind it (give {step} or more)")

    def save_resume(self, model, optimizer_state: dict, trainer_state: dict) -> None:
        """Replace resume/ atomically with the model's weights (a peft model: its adapter),
        `optimizer_state` (torch.save'd: optimizer, scaler, RNG states) and `trainer_state`
        (JSON: step, data position, ...; written last, its presence marks the state complete)."""
        tmp = self.start_resume()
        if is_adapter_model(model):
            save_adapter(model, tmp, trainer_state.get("base"))
        else:
            save_weights(model, tmp / WEIGHTS)
        with atomic_path(tmp / OPTIMIZER_STATE) as p:
            torch.save(optimizer_state, p)
        self.finish_resume(tmp, trainer_state)

    @property
    def resume_staging_dir(self) -> Path:
        """Where the next resume state is written before `finish_resume` swaps it in."""
        return self.path / f"{RESUME}.tmp"

    def start_resume(self) -> Path:
        """An empty staging directory for the next resume state (`resume_staging_dir`); what a
        trainer writes there becomes resume/ at `finish_resume`."""
        tmp = self.resume_staging_dir
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def finish_resume(self, tmp: Path, trainer_state: dict) -> None:
        """Write `trainer_state` into the staged state `tmp` (last: it marks the state complete)
        and swap it in for resume/."""
        final, old = self.path / RESUME, self.path / f"{RESUME}.old"
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def load_resume(self, model, resume_dir: Path) -> tuple[dict, dict]:
        """Load resume_dir's weights (or adapter) into `model`; returns (optimizer_state,
        trainer_state). `torch.load(weights_only=True)` accepts only tensors and plain
        containers: nothing is unpickled as arbitrary objects."""
        if is_adapter_model(model):
            from peft import set_peft_model_state_dict

            weights = resume_dir / ADAPTER_WEIGHTS
            if not weights.exists():
                raise UserError(f"{resume_dir}: holds no adapter; this run was not started with LoRA")
            set_peft_model_state_dict(model, read_weights(weights))
        else:
            load_weights(model, resume_dir / WEIGHTS)
        if not (resume_dir / OPTIMIZER_STATE).exists():
            raise UserError(f"{self.path}: its resume state was saved with train.strategy=fsdp (sharded); "
                            "resume with train.strategy=fsdp under torchrun")
        optimizer_state = torch.load(resume_dir / OPTIMIZER_STATE, map_location="cpu", weights_only=True)
        return optimizer_state, read_json(resume_dir / TRAINER_STATE)

    def publish_weights(self) -> None:
        """Make the latest resume weights (`model.safetensors`, or a LoRA run's adapter files)
        the run's own without serialising them a second time: a hard link (safe because files
        here are only ever replaced, never modified in place), or a copy where there are no
        hard links."""
        for name in WEIGHT_FILES:
            source = self.path / RESUME / name
            if not source.exists():
                continue
            with atomic_path(self.path / name) as tmp:
                tmp.unlink()
                try:
                    os.link(source, tmp)
                except OSError:
                    shutil.copyfile(source, tmp)
