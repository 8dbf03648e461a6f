"""Run configuration: dataclasses, YAML presets, `key=value` overrides, early validation.

A run is described by `RunConfig` = model + train settings + where the data and the output go.
Presets live in `configs/*.yaml` (shipped inside the package). The command line overrides any
field with dotted keys (`train.lr=3e-4 model.num_hidden_layers=8`); an unknown key or a
value of the wrong type is a one-line error that names the key, before any work starts. The
fully resolved config is printed at start and saved as `config.yaml` in the run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from babyllama.atomic import atomic_write_text
from babyllama.errors import UserError
from babyllama.lora import LoraConfig
from babyllama.model.llama import ModelConfig
from babyllama.model.vlm import VLMConfig
from babyllama.textfile import read_text

PRESET_DIR = Path(__file__).parent / "configs"

PRECISIONS = ("auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
SCHEDULES = ("cosine", "linear", "wsd", "constant")
OPTIMIZERS = ("adamw", "adamw8bit", "muon")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 16            # sequences per micro-step per process
    grad_accum: int = 1             # micro-steps per optimizer step
    max_steps: int = 1000
    # > 0: training ends once this much wall time (minutes, evaluations and checkpoints
    # included) is spent, or at max_steps if that comes first; the schedule then follows the
    # time (train/schedule.py), and a resumed run keeps the time already spent.
    max_minutes: float = 0.0
    lr: float = 6e-4
    min_lr_ratio: float = 0.1       # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"        # cosine | linear | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2     # wsd: share of the steps spent decaying at the end
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    optimizer: str = "adamw"        # adamw | adamw8bit (bitsandbytes' 8-bit AdamW states) | muon
                                    # (Muon for the hidden weight matrices, AdamW for the rest)
    grad_clip: float = 1.0          # 0 disables clipping
    precision: str = "auto"         # auto | fp32 | bf16-mixed | fp16-mixed | bf16-true
    activation_checkpointing: bool = False
    compile: bool = False           # torch.compile the model (GPU)
    # Several processes under torchrun: ddp keeps a whole copy of the model per process; fsdp
    # shards weights, gradients and optimizer states across them (train/fsdp.py).
    strategy: str = "ddp"           # ddp | fsdp
    device: str = "auto"            # auto | cpu | cuda | cuda:N | mps
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 200           # 0 disables periodic evaluation (the final one still runs)
    eval_batches: int = 20          # pretraining's held-out windows: this many global batches
                                    # (batch_size x processes windows each)
    # Evaluation tasks run at each evaluation (main process), as `babyllama eval` runs them:
    # e.g. [{task: choice, data: path/to/cmmlu, limit: 5}, {task: generation, data: prompts.txt}]
    eval_tasks: list[dict] = field(default_factory=list)
    sample_every: int = 500         # 0 disables periodic samples (the final one still runs)
    sample_prompts: list[str] = field(default_factory=lambda: ["中国", "今天天气", "这个手机"])
    sample_max_new_tokens: int = 48
    save_every: int = 200           # resume state every N steps (and always at the end)
    max_bad_steps: int = 20         # consecutive non-finite steps before giving up

    def problems(self) -> list[str]:
        out = []
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every"):
            if getattr(self, name) <= 0:
                out.append(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "sample_every", "save_every", "eval_batches",
                     "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                out.append(f"train.{name} must not be negative, got {getattr(self, name)}")
        if self.lr <= 0:
            out.append(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.max_minutes < math.inf:
            out.append(f"train.max_minutes must be 0 (off) or a positive number, got {self.max_minutes}")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            out.append(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        for name, allowed in (("precision", PRECISIONS), ("schedule", SCHEDULES),
                              ("optimizer", OPTIMIZERS), ("strategy", STRATEGIES)):
            if getattr(self, name) not in allowed:
                out.append(f"train.{name} must be one of {', '.join(allowed)}; "
                           f"got {getattr(self, name)!r}")
        return out


SFT_MODES = ("pack", "pad")
PACKED_ATTENTION = ("auto", "flex", "mask")
SFT_LOSS_ON = ("all", "last")


@dataclass
class SFTConfig:
    """Fine-tuning from a base run: `stage: sft` (conversations), and the stages after it
    (`dpo`, `reward`: preference pairs; `grpo`: prompts), which read the same base, data,
    template, epochs and held-out settings from this section."""
    base: str = ""                  # the run directory the weights start from
    sources: list[str] = field(default_factory=list)  # conversation files, `PATH` or `PATH@WEIGHT`
    format: str = ""                # "" detects the schema per file; else one name for all
    template: str = "chatml"        # chatml | babyllama | phi2 | llama2-chinese | a .jinja file
    system_prompt: str = ""         # default system prompt for conversations without one
    loss_on: str = "all"            # all assistant turns, or only the last one
    mode: str = "pack"              # pack several conversations per row, or pad length buckets
    # Packed rows' attention: flex (FlexAttention block masks, CUDA) or mask (a boolean mask
    # with SDPA); auto picks flex on CUDA without dropout (FlexAttention has none).
    packed_attention: str = "auto"  # auto | flex | mask
    epochs: float = 3.0             # sets train.max_steps (unless max_tokens is set)
    max_tokens: int = 0             # > 0: train on about this many tokens instead of epochs
    val_fraction: float = 0.02      # held-out conversations for evaluation
    replay_data: str = ""           # prepared pretraining shards to replay ("base": the base run's)
    replay_ratio: float = 0.0       # extra pretraining rows per SFT row (replay against forgetting)
    shuffle_constraints: float = 0.0  # probability to shuffle `key：value` instruction lines (augmentation)
    skip_bad_records: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.loss_on not in SFT_LOSS_ON:
            out.append(f"sft.loss_on must be one of {', '.join(SFT_LOSS_ON)}; got {self.loss_on!r}")
        if self.mode not in SFT_MODES:
            out.append(f"sft.mode must be one of {', '.join(SFT_MODES)}; got {self.mode!r}")
        if self.packed_attention not in PACKED_ATTENTION:
            out.append(f"sft.packed_attention must be one of {', '.join(PACKED_ATTENTION)}; "
                       f"got {self.packed_attention!r}")
        if self.epochs <= 0 and self.max_tokens <= 0:
            out.append("sft.epochs or sft.max_tokens must be positive")
        if self.max_tokens < 0:
            out.append(f"sft.max_tokens must not be negative, got {self.max_tokens}")
        if not 0 <= self.val_fraction < 1:
            out.append(f"sft.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.replay_ratio < 0:
            out.append(f"sft.replay_ratio must not be negative, got {self.replay_ratio}")
        if not 0 <= self.shuffle_constraints <= 1:
            out.append(f"sft.shuffle_constraints must be in [0, 1], got {self.shuffle_constraints}")
        return out


COMPUTE_DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class LoraSection(LoraConfig):
    """`lora:` in a run config: the adapter's shape (LoraConfig) plus how the run uses it."""
    enabled: bool = False
    qlora: bool = False          # base weights in 4-bit NF4 (bitsandbytes), adapters in full precision
    compute_dtype: str = "fp32"  # QLoRA: the dtype 4-bit weights are dequantized to per matmul

    def problems(self) -> list[str]:
        out = super().problems()
        if self.compute_dtype not in COMPUTE_DTYPES:
            out.append(f"lora.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; "
                       f"got {self.compute_dtype!r}")
        return out


DPO_LOSSES = ("sigmoid", "ipo", "simpo")


@dataclass
class DPOConfig:
    """`stage: dpo`: direct preference optimisation on pairs (Rafailov et al. 2023).

    sigmoid: -log σ(β((log π_c - log π_ref,c) - (log π_r - log π_ref,r))), the DPO paper's loss;
    ipo:     ((Δ per token) - 1/(2β))², Azar et al. 2023 (IPO), log-ratios averaged over the
             answer's tokens as TRL does;
    simpo:   -log σ(β (mean log π_c - mean log π_r) - γ), Meng et al. 2024: reference-free (no
             reference log-probs are computed), length-normalised, with a target margin γ.
    """
    loss: str = "sigmoid"
    beta: float = 0.1               # DPO/IPO: strength of the pull toward the reference (TRL's default)
    simpo_gamma: float = 0.5        # SimPO's target reward margin γ (TRL CPOConfig's simpo_gamma)

    def problems(self) -> list[str]:
        out = []
        if self.loss not in DPO_LOSSES:
            out.append(f"dpo.loss must be one of {', '.join(DPO_LOSSES)}; got {self.loss!r}")
        if self.beta <= 0:
            out.append(f"dpo.beta must be positive, got {self.beta}")
        if self.simpo_gamma < 0:
            out.append(f"dpo.simpo_gamma must not be negative, got {self.simpo_gamma}")
        return out


@dataclass
class RewardConfig:
    """`stage: reward`: a scalar-head reward model trained on pairs with the Bradley–Terry loss
    -log σ(r_c - r_r - margin) (Ouyang et al. 2022; TRL's RewardTrainer)."""
    margin: float = 0.0                  # a fixed margin the chosen reward must clear (Llama 2 uses one)
    center_rewards_coefficient: float = 0.0  # + c·(r_c + r_r)² keeps rewards near 0 (Eisenstein et al. 2023)

    def problems(self) -> list[str]:
        out = []
        if self.center_rewards_coefficient < 0:
            out.append(f"reward.center_rewards_coefficient must not be negative, got "
                       f"{self.center_rewards_coefficient}")
        return out


@dataclass
class GRPOConfig:
    """`stage: grpo`: group relative policy optimisation (Shao et al. 2024, DeepSeekMath).

    Each step samples `num_generations` answers per prompt from the current policy, scores
    them with `reward`, normalises each reward within its prompt's group (advantage =
    (r - mean) / (std + 1e-4)) and minimises the clipped ratio objective per answer token,
    normalised over all answer tokens of the step (TRL's `loss_type="dapo"`), plus β times the
    k3 estimate of KL(π || π_ref) per token when `beta` > 0 (Schulman 2020)."""
    reward: str = "math"            # math | rm:PATH (a reward run) | module:function (Python)
    num_generations: int = 8        # G: sampled answers per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0        # sampling temperature; the log-probs are taken at the same one
    top_k: int = 0                  # 0: the whole vocabulary (the exact policy; see GRPOTrainer)
    epsilon: float = 0.2            # ratio clipping range [1 - ε, 1 + ε] (PPO, Schulman et al. 2017)
    beta: float = 0.0               # KL coefficient; 0 needs no reference model (TRL's default)
    format_bonus: float = 0.0       # math reward: added when the answer states it as 答案是N
    scale_rewards: bool = True      # divide by the group's std (Dr. GRPO argues for False)
    max_prompts: int = 0            # > 0: use at most this many prompts (quick runs)

    def problems(self) -> list[str]:
        out = []
        if self.num_generations < 2:
            out.append(f"grpo.num_generations must be at least 2 (a group needs a baseline), "
                       f"got {self.num_generations}")
        if self.max_new_tokens <= 0:
            out.append(f"grpo.max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature <= 0:
            out.append(f"grpo.temperature must be positive (sampling), got {self.temperature}")
        if self.top_k < 0:
            out.append(f"grpo.top_k must not be negative, got {self.top_k}")
        if not 0 < self.epsilon < 1:
            out.append(f"grpo.epsilon must be in (0, 1), got {self.epsilon}")
        if self.beta < 0:
            out.append(f"grpo.beta must not be negative, got {self.beta}")
        if not self.reward:
            out.append("grpo.reward must name a reward: math, rm:PATH or module:function")
        if self.max_prompts < 0:
            out.append(f"grpo.max_prompts must not be negative (0: all), got {self.max_prompts}")
        return out


@dataclass
class VisionSection(VLMConfig):
    """`vlm:` in the config of an image-text run (`babyllama align`, `babyllama instruct`): the
    image side of the model (VLMConfig) plus how a stage trains it.

    Learning rates: the projector trains at train.lr; the encoder and the language model at
    vision_lr / language_lr when set (> 0), else at train.lr too (all follow the schedule)."""
    images: str = ""                 # folder the data's relative image paths start from
    vision_init: str = ""            # a SigLIP directory (config.json + safetensors) to start the encoder from
    freeze_vision: bool | None = None    # None: frozen when the encoder is pretrained (vision_init), else trained
    freeze_projector: bool = False
    freeze_language: bool = False
    vision_lr: float = 0.0
    language_lr: float = 0.0

    def problems(self) -> list[str]:
        out = super().problems()
        for name in ("vision_lr", "language_lr"):
            if getattr(self, name) < 0:
                out.append(f"vlm.{name} must not be negative (0: train.lr), got {getattr(self, name)}")
        return out


STAGES = ("pretrain", "sft", "dpo", "reward", "grpo", "align", "instruct")
# Image-text stages: `align` trains the projector on captions (encoder and language model
# frozen, LLaVA's stage 1), `instruct` the projector and the language model on conversations
# about images (stage 2).
VLM_STAGES = ("align", "instruct")
# Stages that start from a base run and read the `sft:` section (base, data, template, epochs).
FINETUNE_STAGES = ("sft", "dpo", "reward", "grpo", *VLM_STAGES)
# Stages whose runs are chat models (their prompts go through the chat template).
CHAT_STAGES = ("sft", "dpo", "grpo", *VLM_STAGES)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: str = ""        # a directory written by `babyllama prepare`
    tokenizer: str = ""   # defaults to <data>/tokenizer
    out_dir: str = "runs/pretrain"
    preset: str = ""      # the preset this config started from (informational)
    stage: str = "pretrain"  # pretrain | sft | dpo | reward | grpo | align | instruct
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    vlm: VisionSection = field(default_factory=VisionSection)
    # The dotted keys the user set ("train.lr", ...): no default derived later (steps,
    # intervals, the LoRA learning rate) replaces them. Not saved, not settable.
    user_keys: frozenset[str] = field(default=frozenset(), compare=False, repr=False,
                                      metadata={"internal": True})

    def problems(self) -> list[str]:
        out = self.model.problems() + self.train.problems()
        if self.stage not in STAGES:
            out.append(f"stage must be one of {', '.join(STAGES)}; got {self.stage!r}")
        if self.stage in FINETUNE_STAGES:
            out += self.sft.problems()
            if self.sft.packed_attention == "flex" and self.model.dropout > 0:
                out.append("sft.packed_attention=flex: FlexAttention has no attention dropout; "
                           "set model.dropout=0 or use sft.packed_attention=mask")
        if self.stage in ("dpo", "reward", "grpo"):
            out += getattr(self, self.stage).problems()
        if self.stage in VLM_STAGES:
            out += self.vlm.problems()
        if self.lora.qlora and not self.lora.enabled:
            out.append("lora.qlora needs lora.enabled (or pass --qlora)")
        if self.lora.enabled:
            if self.stage not in ("sft", "dpo", "grpo", "instruct"):
                out.append("lora.enabled is for fine-tuning a chat model (babyllama sft, dpo, grpo, instruct); "
                           f"{self.stage} trains its own weights")
            out += self.lora.problems()
        if self.train.strategy == "fsdp":
            out += fsdp_problems(self)
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["user_keys"]
        d["train"]["betas"] = list(self.train.betas)
        # A run's config stays free of settings it never reads.
        if self.stage not in FINETUNE_STAGES:
            del d["sft"]
        for stage in ("dpo", "reward", "grpo"):
            if self.stage != stage:
                del d[stage]
        if self.stage not in VLM_STAGES:
            del d["vlm"]
        if not self.lora.enabled:
            del d["lora"]
        return d


# The stages train/fsdp.py shards: their loop is the plain trainer's with one model. DPO and
# GRPO also run a reference model or generate (a sharded model's generate is a collective every
# rank would have to join token by token), and the reward model has its own head.
FSDP_STAGES = ("pretrain", "sft")


def fsdp_problems(cfg: "RunConfig") -> list[str]:
    """What train.strategy=fsdp cannot run: stages other than pretraining and SFT, QLoRA
    (bitsandbytes' 4-bit weights are not DTensors FSDP can shard), fp16-mixed (torch's loss scaler
    does not unscale sharded gradients) and optimizers that need whole tensors (Muon
    orthogonalises each whole matrix; bitsandbytes' 8-bit AdamW keeps plain tensors)."""
    out, t = [], cfg.train
    if cfg.stage not in FSDP_STAGES:
        out.append(f"train.strategy=fsdp covers {' and '.join(FSDP_STAGES)}; the {cfg.stage} stage "
                   "trains with ddp (its reference model, reward head or generation is not sharded)")
    if cfg.lora.qlora:
        out.append("train.strategy=fsdp: QLoRA's 4-bit base (bitsandbytes) cannot be sharded; "
                   "use LoRA (without --qlora) or train.strategy=ddp")
    if t.precision == "fp16-mixed":
        out.append("train.strategy=fsdp: fp16-mixed needs a loss scaler for sharded gradients; "
                   "use bf16-mixed or fp32, or train.strategy=ddp")
    if t.optimizer != "adamw":
        out.append(f"train.strategy=fsdp: train.optimizer={t.optimizer} needs whole tensors "
                   "(Muon orthogonalises whole matrices, 8-bit AdamW keeps plain states); use adamw")
    return out


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _coerce(value, hint, key: str, source: str):
    """Check/convert a YAML value against a dataclass field's type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # No setting is meaningful at nan or inf (a learning rate, β, a margin): refused
            # here rather than surfacing as skipped steps or an optimizer's traceback.
            if not math.isfinite(number):
                raise UserError(f"{source}: {key} must be a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is dict:
        if isinstance(value, dict):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else typing.Any
            items = [v if item is typing.Any else _coerce(v, item, key, source) for v in value]
            return tuple(items) if origin is tuple else items
        if origin is list and isinstance(value, str):
            item = args[0] if args else typing.Any
            return [value if item is typing.Any else _coerce(value, item, key, source)]
    name = getattr(hint, "__name__", str(hint))
    raise UserError(f"{source}: {key} must be {name}, got {value!r}")


def apply_values(obj, values: dict, prefix: str = "", source: str = "command line"):
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj) if not f.metadata.get("internal")]
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise UserError(f"{source}: unknown config key '{key}'{hint}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise UserError(f"{source}: {key} must be a mapping of settings, got {v!r}")
            apply_values(current, v, f"{key}.", source)
        else:
            setattr(obj, k, _coerce(v, hints[k], key, source))


def read_yaml(path: Path) -> dict:
    """A YAML mapping; UserError (file:line) for a missing file, bad YAML or a non-mapping."""
    if not path.exists():
        raise UserError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of settings")
    return data


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        raise UserError(f"unknown preset '{name_or_path}': choose one of {', '.join(list_presets())} "
                        "or give a path to a YAML file")
    return candidate


def parse_overrides(pairs: list[str]) -> dict:
    """`["train.lr=3e-4", "model.tie_word_embeddings=true"]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"override '{pair}' must look like section.key=value (e.g. train.lr=3e-4)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


# --- resolution: start -> stage defaults -> the user's overrides ------------------------------
#
# Every command that builds a RunConfig goes through `resolve_config` (new runs) or
# `resume_config` (continuing one); none of them changes a config it was given.

# Fixed chat prompts for the samples written during SFT (one per domain the demo data covers).
SFT_SAMPLE_PROMPTS = ("你好，你是谁？", "你喜欢什么书？", "给我讲个笑话吧。")

# What may change when a run resumes: its length and how often it logs. Everything else (the
# model, the data, the schedule's shape) is the run's and would make the resumed run a
# different one.
# eval_tasks and sample_prompts change only what is measured, not what is trained (and a task
# whose data went missing would otherwise stop every resume at its final evaluation).
RESUME_KEYS = {"train": {"max_steps", "eval_every", "sample_every", "save_every", "log_every",
                         "device", "eval_tasks", "sample_prompts", "sample_max_new_tokens"}}


def dotted_keys(values: dict, prefix: str = "") -> set[str]:
    """{"train": {"lr": 1, "seq_len": 2}} -> {"train.lr", "train.seq_len"}."""
    out = set()
    for k, v in values.items():
        out |= dotted_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def copy_config(cfg: RunConfig, **changes) -> RunConfig:
    """A deep copy of `cfg` with top-level fields replaced (the original is left alone)."""
    out = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def sft_defaults(base: RunConfig, base_dir: str) -> RunConfig:
    """The starting point of fine-tuning the run `base` (saved at `base_dir`): its model, its
    hardware and optimiser settings; fine-tuning's own length, learning rate and intervals."""
    b = base.train
    train = TrainConfig(batch_size=b.batch_size, grad_accum=b.grad_accum, precision=b.precision,
                        optimizer=b.optimizer, betas=b.betas, device=b.device, compile=b.compile,
                        activation_checkpointing=b.activation_checkpointing, seed=b.seed,
                        seq_len=base.model.max_position_embeddings,
                        # Half the pretraining peak: enough to learn the chat format in a few
                        # epochs on a small model without wrecking what it knows.
                        lr=b.lr * 0.5, weight_decay=0.0, warmup_steps=0,
                        sample_prompts=list(SFT_SAMPLE_PROMPTS))
    return RunConfig(model=copy.deepcopy(base.model), train=train, stage="sft", preset=base.preset,
                     sft=SFTConfig(base=base_dir))


def stage_defaults(cfg: RunConfig, stage: str, base: RunConfig) -> RunConfig:
    """The fine-tuning defaults `sft_defaults` gave, adjusted for a stage after SFT."""
    out = copy.deepcopy(cfg)
    out.stage = stage
    t = out.train
    if stage == "dpo":
        # A tenth of SFT's rate: preference losses move the log-probs of whole answers, and DPO
        # papers train 7B models at 5e-7 (1/40 of SFT); small models tolerate more.
        t.lr = base.train.lr * 0.05
        out.sft.epochs = 2.0
        out.sft.val_fraction = 0.1   # pairs are few: a held-out share large enough for accuracy
    elif stage == "reward":
        t.lr = base.train.lr * 0.1
        out.sft.epochs = 2.0
        out.sft.val_fraction = 0.1
        t.sample_prompts = []        # a reward model scores; it does not generate
    elif stage == "grpo":
        t.lr = base.train.lr * 0.05
        out.sft.epochs = 1.0
        out.sft.val_fraction = 0.04  # the math reward's held-out problems (greedy accuracy)
    elif stage in VLM_STAGES:
        # An image-text run keeps the image side of an image-text base (align -> instruct).
        if base.stage in VLM_STAGES:
            out.vlm = copy.deepcopy(base.vlm)
            out.vlm.freeze_vision, out.vlm.vision_lr = None, 0.0
        else:
            # SFT's rate for the language model (half its base's), kept through align -> instruct.
            out.vlm.language_lr = base.train.lr * 0.5
        out.vlm.freeze_projector = False
        # LLaVA-1.5's rates: 1e-3 for the projector alone (stage 1); in stage 2 the language
        # model fine-tunes at SFT's rate (half its pretraining peak) while the projector and a
        # from-scratch encoder keep a higher one.
        t.lr = 1e-3
        t.weight_decay = 0.0
        t.sample_prompts = []  # samples are questions about held-out images (train/vision.py)
        out.sft.val_fraction = 0.02
        if stage == "align":
            # LLaVA's stage 1 trains the projector alone; `--train-vision` opens the encoder.
            out.vlm.freeze_vision = True
            out.vlm.freeze_language = True
            out.sft.epochs = 1.0
        else:
            out.vlm.freeze_language = False
            out.sft.epochs = 2.0
    return out


def resolve_config(stage: str = "pretrain", *, preset: str | None = None,
                   base: RunConfig | None = None, base_dir: str = "",
                   overrides: list[str] | dict | None = None) -> RunConfig:
    """The one resolution of a new run's config, validated.

    The start is a preset name or YAML file (pretraining), or the base run's config `base`
    saved at `base_dir` (fine-tuning: `sft_defaults`); the user's `overrides` ("section.key=value"
    strings or a nested dict) are applied last and recorded in `user_keys`. Rules that depend on
    what the user set run after them: a LoRA run trains at the base's peak learning rate unless
    train.lr was given. Raises UserError for an unknown key, a wrong type or an invalid value.
    """
    if stage in FINETUNE_STAGES:
        if base is None:
            raise UserError("fine-tuning needs the base run's config")
        cfg = sft_defaults(base, base_dir)
        if stage != "sft":
            cfg = stage_defaults(cfg, stage, base)
    elif stage == "pretrain":
        cfg = RunConfig()
        if preset:
            path = resolve_preset(preset)
            apply_values(cfg, read_yaml(path), "", str(path))
            cfg.preset = preset
    else:
        raise UserError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
    values = (overrides if isinstance(overrides, dict) else parse_overrides(overrides)) if overrides else {}
    if "vlm" in values and stage not in VLM_STAGES:
        raise UserError(f"command line: vlm.* settings are for `babyllama align` and `babyllama instruct`, "
                        f"not {stage}")
    for section in ("dpo", "reward", "grpo"):
        if section in values and section != stage:
            # Saved configs keep only their own stage's section: the setting would vanish unread.
            raise UserError(f"command line: {section}.* settings are for `babyllama {section}`, "
                            f"not {stage}")
    apply_values(cfg, values, "", "command line")
    cfg.user_keys = frozenset(dotted_keys(values))
    if stage in FINETUNE_STAGES and cfg.lora.enabled and "train.lr" not in cfg.user_keys:
        # Adapters start at zero and have few parameters: LoRA is usually run at several
        # times the full fine-tuning rate (Hu et al. 2021; QLoRA): for SFT the base's peak (2x
        # full SFT's), for the preference and RL stages 10x their full rate.
        cfg.train.lr = base.train.lr if stage == "sft" else min(base.train.lr, 10 * cfg.train.lr)
    if stage == "instruct" and cfg.lora.enabled and "vlm.language_lr" not in cfg.user_keys:
        cfg.vlm.language_lr *= 2  # the base's peak, as LoRA SFT trains at (see above)
    if stage == "grpo" and "train.batch_size" not in cfg.user_keys:
        # Completions per micro-batch: two prompts' groups.
        cfg.train.batch_size = 2 * cfg.grpo.num_generations
    check(cfg)
    return cfg


def load_config(preset: str | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """A pretraining config: `preset` (a name or a YAML path) with `overrides` applied."""
    return resolve_config("pretrain", preset=preset, overrides=overrides)


# Set from the data when a run starts (the tokenizer's vocabulary), whatever a preset says.
DERIVED_KEYS = {"model.vocab_size", "vlm.image_token_id"}


def resume_config(saved: RunConfig, overrides: list[str] | dict | None, out_dir: str) -> RunConfig:
    """The saved config of a run being resumed from `out_dir`, with the overrides allowed on
    resume (RESUME_KEYS); `overrides` as strings or nested values (the SFT flags). Keys
    derived from the data (DERIVED_KEYS) keep the run's values. Raises UserError naming the
    first key that may not change."""
    cfg = copy_config(saved, out_dir=out_dir)  # the run may have moved: trust the path given now
    if overrides:
        values = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        apply_values(cfg, values)
        for key in DERIVED_KEYS:
            section, _, name = key.partition(".")
            setattr(getattr(cfg, section), name, dotted_get(saved, key))
        # Repeating the original command with --resume restates its settings: a key outside
        # RESUME_KEYS is refused only when its value would actually change.
        for key in sorted(dotted_keys(values)):
            section, _, name = key.partition(".")
            if name in RESUME_KEYS.get(section, set()):
                continue
            if dotted_get(cfg, key) != dotted_get(saved, key):
                raise UserError(f"command line: {key} cannot change when resuming (only "
                                "train.max_steps, logging intervals, evaluation tasks and samples can)")
        cfg.user_keys = frozenset(dotted_keys(values))
    check(cfg)
    return cfg


def dotted_get(cfg, key: str):
    """`dotted_get(cfg, "train.lr")` -> cfg.train.lr."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def derive_schedule(cfg: RunConfig, max_steps: int, *, evals: int, saves: int, samples: int,
                    warmup_divisor: int, warmup_floor: int = 0, warmup_cap: int = 100,
                    logs: int | None = None) -> RunConfig:
    """A copy of `cfg` whose length and intervals follow from `max_steps`, the one place they
    are derived: `evals` evaluations, `saves` checkpoints and `samples` sample rounds over the
    run; warmup = min(warmup_cap, max(warmup_floor, max_steps // warmup_divisor)); with `logs`,
    about that many log lines (at least every 10 steps). Keys in `user_keys` are kept."""
    out = copy.deepcopy(cfg)
    t = out.train
    if "train.max_steps" in cfg.user_keys:
        max_steps = t.max_steps
    derived = {"max_steps": max_steps,
               "eval_every": max(1, max_steps // evals),
               "save_every": max(1, max_steps // saves),
               "sample_every": max(1, max_steps // samples),
               "warmup_steps": min(warmup_cap, max(warmup_floor, max_steps // warmup_divisor))}
    if logs:
        derived["log_every"] = max(1, min(10, max_steps // logs))
    for key, value in derived.items():
        if f"train.{key}" not in cfg.user_keys:
            setattr(t, key, value)
    return out


def check(cfg: RunConfig, source: str = "config") -> None:
    problems = cfg.problems()
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))


def config_from_dict(d: dict, source: str) -> RunConfig:
    cfg = RunConfig()
    apply_values(cfg, d, "", source)
    return cfg


def save_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
