"""Image-text training: `babyllama align` and `babyllama instruct`, through the one trainer loop.

LLaVA's two stages (Liu et al. 2023, "Visual Instruction Tuning"; LLaVA-1.5):

    align     captions; only the projector learns (encoder and language model frozen): the
              projector learns to put image features where the language model reads words.
    instruct  conversations about images; projector + language model learn (the encoder too
              when it was not pretrained: `vlm.freeze_vision`), optionally with LoRA on the
              language model.

Each stage is one flag away from seed 0's freezing experiments: `vlm.freeze_vision`,
`vlm.freeze_language`, `vlm.freeze_projector`, with per-part learning rates (`vlm.vision_lr`,
`vlm.language_lr`; the projector's is train.lr).

Examples are the SFT ones (chat template, loss on the assistant's tokens only) with the
`<|image|>` token expanded to the image's K positions, which are never targets. Batches are
right-padded length buckets (`SFTBatches` in pad mode: a row never mixes two images' positions)
plus the batch's images as `pixel_values`, loaded and normalised per batch (so a large image
folder is never held in memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from babyllama.config import RunConfig, copy_config
from babyllama.data.images import ImageProcessing, load_pixels, pixel_values
from babyllama.data.llava import ImageConversation, image_conversations
from babyllama.data.records import BadRecords
from babyllama.data.sft import IGNORE, BuildStats, SFTBatches, eval_batches, split_validation
from babyllama.errors import UserError
from babyllama.infer.chat import chat_text
from babyllama.infer.config import GenerationConfig
from babyllama.infer.images import IMAGE_PLACEHOLDER
from babyllama.lora import apply_lora, trainable_counts
from babyllama.model.vlm import PARTS, VisionLanguageModel, expand_image_tokens, part_of
from babyllama.model.weights import load_state, load_weights, read_weights
from babyllama.run import Run, read_siglip
from babyllama.tokenizer.chat_template import fit_chat
from babyllama.train.distributed import all_reduce_sum, cleanup, init_distributed
from babyllama.train.sft import finetune_schedule, finetune_tokenizer, report_start, start_finetune
from babyllama.train.trainer import autocast_context, eval_metrics, train


@dataclass
class ImageExample:
    """An SFT example whose image token is expanded: `ids` int32, `mask` bool (targets), and
    the image (a file, a picture in memory, or None for a text-only conversation)."""
    ids: np.ndarray
    mask: np.ndarray
    image: Path | object | None

    def inputs_targets(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[:-1], np.where(self.mask[1:], self.ids[1:], IGNORE)


def image_processing(cfg: RunConfig) -> ImageProcessing:
    v = cfg.vlm.vision
    return ImageProcessing(v.image_size, tuple(v.image_mean), tuple(v.image_std))


def image_pixels(image, proc: ImageProcessing) -> torch.Tensor:
    """(C, S, S) float32 of a file or an in-memory picture."""
    if isinstance(image, (str, Path)):
        return load_pixels(Path(image), proc)
    return pixel_values(image, proc)


def build_image_examples(convs: list[ImageConversation], tokenizer, max_len: int, *, image_token_id: int,
                         image_tokens: int) -> tuple[list[ImageExample], BuildStats]:
    """Encode conversations (chat template, assistant tokens as targets) into examples of at
    most `max_len` tokens after the image token is expanded to `image_tokens` positions.
    Older turns are dropped to fit, never the turn that holds the image; conversations that
    cannot fit, or whose placeholders do not match their image, are dropped and counted."""
    stats = BuildStats()
    out = []
    for conv in convs:
        stats.conversations += 1
        n_images = 1 if conv.image is not None else 0
        budget = max_len - (image_tokens - 1) * n_images
        fitted = fit_chat(tokenizer, conv.messages, budget) if budget > 1 else None
        if fitted is None:
            stats.dropped += 1
            stats.reasons[f"longer than {max_len} tokens with its image"] += 1
            continue
        enc, turns_dropped, _ = fitted
        placeholders = sum(1 for t in enc.ids if t == image_token_id)
        if placeholders != n_images:
            stats.dropped += 1
            reason = ("the turn with the image does not fit" if n_images and not placeholders
                      else f"{placeholders} {IMAGE_PLACEHOLDER} tokens for {n_images} image(s)")
            stats.reasons[reason] += 1
            continue
        ids = expand_image_tokens(list(enc.ids), image_token_id, image_tokens)
        mask = [m for t, m in zip(enc.ids, enc.mask)
                for _ in range(image_tokens if t == image_token_id else 1)]
        mask = np.asarray(mask, dtype=bool)
        mask[np.asarray(ids) == image_token_id] = False  # image positions are never targets
        mask[0] = False
        if not mask.any():
            stats.dropped += 1
            stats.reasons["no assistant tokens to train on"] += 1
            continue
        if turns_dropped:
            stats.truncated += 1
            stats.turns_dropped += turns_dropped
        out.append(ImageExample(np.asarray(ids, dtype=np.int32), mask, conv.image))
        stats.examples += 1
    return out, stats


def batch_pixels(examples: list[ImageExample], proc: ImageProcessing, device) -> torch.Tensor | None:
    """The images of a batch's rows in row order, (N, C, S, S), or None when no row has one."""
    images = [image_pixels(e.image, proc) for e in examples if e.image is not None]
    return torch.stack(images).to(device) if images else None


class ImageTextBatches(SFTBatches):
    """`SFTBatches` in pad mode (length buckets, right padding), plus each batch's images."""

    def __init__(self, examples: list[ImageExample], *, proc: ImageProcessing, **kwargs):
        super().__init__(examples, mode="pad", **kwargs)
        self.proc = proc

    def get(self, step: int, micro: int, device):
        x, y, extra = super().get(step, micro, device)
        g = (step * self.grad_accum + micro) * self.world_size + self.rank
        rows = [self.examples[i] for i in self.batch_examples(g)]
        return x, y, {**extra, "pixel_values": batch_pixels(rows, self.proc, device)}


class HeldOutImageText:
    """Held-out examples for the trainer's evaluation: loss (nats per answer token),
    perplexity, next-token accuracy and bits per character/byte of the answers, with their
    images (the numbers `babyllama eval --task lm` and SFT report)."""

    def __init__(self, examples: list[ImageExample], batch_size: int, tokenizer, proc: ImageProcessing):
        # SFT's padded evaluation batches, and beside each the examples it holds (the same
        # length order `eval_batches` sorts by) for their pictures.
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
        rows = [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
        self.batches = [(x, y, r) for (x, y), r in zip(eval_batches(examples, batch_size, tokenizer.pad_id), rows)]
        self.proc = proc
        texts = [tokenizer.decode([int(t) for t in e.ids[e.mask]]) for e in examples]
        self.chars = sum(map(len, texts))
        self.bytes = sum(len(t.encode("utf-8")) for t in texts)

    @torch.no_grad()
    def evaluate(self, model, device, precision: str, info) -> dict:
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, correct
        for i, (x, y, rows) in enumerate(self.batches):
            if i % info.world_size != info.rank:
                continue
            x, y = x.to(device), y.to(device)
            with autocast_context(precision, device):
                logits, nats = model(x, y, loss_reduction="sum", pixel_values=batch_pixels(rows, self.proc, device))
            scored = y != IGNORE
            sums[0] += nats.double()
            sums[1] += scored.sum()
            sums[2] += (logits.argmax(-1).eq(y) & scored).sum()
        all_reduce_sum(sums, info)
        model.train(was_training)
        return eval_metrics(*sums.tolist(), self.chars, self.bytes)


def image_sample_fn(convs: list[ImageConversation], proc: ImageProcessing):
    """(sample prompts, the trainer's sample function): the first user turn of up to three
    held-out conversations, each answered about its own image, with the reference answer
    shown after it. The prompts name the example, so each maps back to its image."""
    chosen = [c for c in convs if c.image is not None][:3]
    prompts, by_prompt = [], {}
    for c in chosen:
        user = next(m["content"] for m in c.messages if m["role"] == "user")
        question = user.replace(IMAGE_PLACEHOLDER, "").strip()
        prompt = f"[{c.where}] {question}"
        reference = next((m["content"] for m in c.messages if m["role"] == "assistant"), "")
        prompts.append(prompt)
        by_prompt[prompt] = (c, question, reference)

    def sample(model, tokenizer, prompt: str, sampling: GenerationConfig) -> str:
        conv, question, reference = by_prompt[prompt]
        messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"}]
        try:
            answer = chat_text(model, tokenizer, messages, sampling, images=[image_pixels(conv.image, proc)])
        except UserError as e:
            answer = f"(no sample: {e})"
        return f"{answer}  [reference: {reference}]"

    return prompts, sample


def resolve_vision(cfg: RunConfig, base: Run) -> RunConfig:
    """`cfg` with its encoder settled: an image-text base keeps its own; `vlm.vision_init` (a
    SigLIP directory) sets the encoder's config from that checkpoint (a vlm.vision.* setting
    that disagrees with it is an error); and `freeze_vision` None resolved (frozen exactly
    when the encoder is pretrained)."""
    v = cfg.vlm
    pretrained = bool(v.vision_init)
    if base.is_vision():
        pretrained = pretrained or bool(base.config().vlm.vision_init)
    elif v.vision_init:
        vision, _ = read_siglip(Path(v.vision_init))
        for key in sorted(k for k in cfg.user_keys if k.startswith("vlm.vision.")):
            name = key.split(".", 2)[2]
            if getattr(vision, name) != getattr(v.vision, name):
                raise UserError(f"command line: {key}={getattr(v.vision, name)!r} disagrees with the SigLIP "
                                f"checkpoint {v.vision_init} ({name}={getattr(vision, name)!r})")
        v.vision = vision
    if v.freeze_vision is None:
        v.freeze_vision = pretrained
    return cfg


def vision_language_model(cfg: RunConfig, base: Run, info) -> VisionLanguageModel:
    """The stage's starting model: an image-text base's weights, or a language-model base's
    under a fresh projector and an encoder that is fresh or `vlm.vision_init`'s. Seeded."""
    torch.manual_seed(cfg.train.seed)
    model = VisionLanguageModel(cfg.model, cfg.vlm)
    if base.is_vision():
        load_weights(model, base.weights_file)
        source = f"{base.path} (image-text)"
    else:
        load_state(model.language_model, read_weights(base.weights_file), base.weights_file)
        source = f"{base.path} (language model)"
        if cfg.vlm.vision_init:
            _, state = read_siglip(Path(cfg.vlm.vision_init))
            load_state(model.vision_tower, state, cfg.vlm.vision_init)
            source += f" + encoder {cfg.vlm.vision_init}"
    v = cfg.vlm
    model.set_trainable(vision=not v.freeze_vision, projector=not v.freeze_projector,
                        language=not v.freeze_language)
    if info.is_main:
        n = model.parameter_counts()
        trainable = {part: sum(p.numel() for p in m.parameters() if p.requires_grad)
                     for part, m in model.part_modules().items()}
        shown = os.path.relpath(source) if not source.startswith("/") else source
        print(f"model: {n['total'] / 1e6:.2f}M parameters from {shown}: encoder {n['vision'] / 1e6:.2f}M "
              f"({n['vision'] / n['total']:.0%}), projector {n['projector'] / 1e6:.2f}M, language model "
              f"{n['language'] / 1e6:.2f}M; {v.image_tokens} positions per image")
        print("trains: " + ", ".join(f"{part} {'yes' if trainable[part] else 'frozen'}" for part in PARTS))
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("config: every part is frozen (vlm.freeze_vision, vlm.freeze_projector, "
                        "vlm.freeze_language): nothing would train")
    if cfg.lora.enabled:
        model = with_vision_lora(model, cfg, info.is_main)
    return model


def with_vision_lora(model: VisionLanguageModel, cfg: RunConfig, verbose: bool):
    """LoRA adapters on the language model's layers only; the parts that train whole (the
    projector, the encoder when not frozen) become peft `modules_to_save`, so they are saved
    with the adapter and merged by `merge-lora` like the adapters."""
    v = cfg.vlm
    if v.freeze_language:
        raise UserError("config: lora.enabled adapts the language model, which vlm.freeze_language freezes")
    whole = [name for name, frozen in (("multi_modal_projector", v.freeze_projector),
                                       ("vision_tower", v.freeze_vision)) if not frozen]
    model = apply_lora(model, cfg.lora, within="language_model", modules_to_save=whole)
    if verbose:
        trainable, total = trainable_counts(model)
        print(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} on the language model's "
              f"{', '.join(cfg.lora.targets())}" + (f", {' and '.join(whole)} trained whole" if whole else "")
              + f": {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    return model


def lr_scales(cfg: RunConfig):
    """Parameter name -> its learning rate as a multiple of train.lr (the projector's)."""
    v, lr = cfg.vlm, cfg.train.lr
    scale = {"projector": 1.0, "vision": (v.vision_lr or lr) / lr, "language": (v.language_lr or lr) / lr}
    return lambda name: scale[part_of(name)]


def read_image_data(cfg: RunConfig, bad: BadRecords) -> tuple[list, list, list[str]]:
    """(train conversations, held-out conversations, one report line per source)."""
    s = cfg.sft
    if not s.sources:
        raise UserError(f"no data: pass --data FILE (LLaVA-style JSON/JSONL) or --data builtin:shapes-zh "
                        f"(see `babyllama {cfg.stage} --help`)")
    # The built-in set: captions to align, one question per conversation to instruct. (All
    # of a picture's questions in one conversation would be cheaper, but a later question
    # often names an earlier answer -- "图中绿色的图形是什么形状？" after "绿色" -- so the
    # model learns to copy from the text instead of looking.)
    kind = "caption" if cfg.stage == "align" else "qa"
    images_dir = Path(cfg.vlm.images) if cfg.vlm.images else None
    if images_dir is not None and not images_dir.is_dir():
        raise UserError(f"{images_dir}: no such image folder (vlm.images / --images)")
    trains, vals, lines = [], [], []
    for k, source in enumerate(s.sources):
        convs = image_conversations(source, images_dir, kind=kind, skip_bad=s.skip_bad_records, bad=bad,
                                    seed=cfg.train.seed, size=cfg.vlm.vision.image_size)
        if not convs:
            raise UserError(f"{source}: no usable conversations")
        train_part, val_part = split_validation(convs, s.val_fraction, cfg.train.seed + k)
        trains += train_part
        vals += val_part
        with_images = sum(c.image is not None for c in convs)
        lines.append(f"{source}: {len(convs):,} conversations ({with_images:,} with an image; "
                     f"{len(train_part):,} train, {len(val_part):,} val)")
    return trains, vals, lines


def run_vision_stage(cfg: RunConfig, resume: bool = False) -> Path:
    """Train `cfg.stage` (align or instruct) from `cfg.sft.base` on `cfg.sft.sources` into
    `cfg.out_dir`. Raises UserError for a bad config, base or data, before any training."""
    cfg = copy_config(cfg)  # finetune_tokenizer records the template it chose in cfg.sft
    run, base = start_finetune(cfg, resume)
    if base.is_vision() and cfg.stage == "align" and not resume:
        print(f"note: {base.path} is already an image-text run; align trains its projector again")
    info, device = init_distributed(cfg.train.device)
    try:
        tokenizer = finetune_tokenizer(cfg, base)
        image_token_id = tokenizer.special_tokens.get("image")
        image_token_id = tokenizer.token_to_id(image_token_id) if image_token_id else None
        if image_token_id is None:
            raise UserError(f"{base.path}: its tokenizer has no {IMAGE_PLACEHOLDER} token (babyllama's "
                            "tokenizers reserve one; add it to an imported tokenizer)")
        cfg.vlm.image_token_id = image_token_id
        if not resume:
            cfg = resolve_vision(cfg, base)
        t, k = cfg.train, cfg.vlm.image_tokens
        if k >= t.seq_len:
            raise UserError(f"config: an image takes {k} positions and train.seq_len is {t.seq_len}: no room "
                            f"for text (use a larger patch_size or vlm.pixel_shuffle)")
        bad = BadRecords()
        train_convs, val_convs, lines = read_image_data(cfg, bad)
        build = dict(image_token_id=image_token_id, image_tokens=k)
        train_ex, stats = build_image_examples(train_convs, tokenizer, t.seq_len + 1, **build)
        val_ex, _ = build_image_examples(val_convs, tokenizer, t.seq_len + 1, **build)
        if not train_ex:
            raise UserError(f"no training examples left: {stats.summary()}")
        proc = image_processing(cfg)
        batches = ImageTextBatches(train_ex, proc=proc, seq_len=t.seq_len, batch_size=t.batch_size,
                                   grad_accum=t.grad_accum, seed=t.seed, pad_id=tokenizer.pad_id,
                                   rank=info.rank, world_size=info.world_size)
        if not resume:
            cfg = finetune_schedule(cfg, batches.steps_for_epochs(cfg.sft.epochs))
            if "train.sample_prompts" not in cfg.user_keys:
                cfg.train.sample_prompts = image_sample_fn(val_convs, proc)[0]
        t = cfg.train
        prompts, sample_fn = image_sample_fn(val_convs, proc)
        if info.is_main:
            report_start(cfg, lines, bad)
            images = sum(e.image is not None for e in train_ex)
            print(f"examples: {stats.summary()}")
            print(f"train: {len(train_ex):,} examples ({images:,} images, {k} positions each), "
                  f"{batches.batches_per_epoch:,} batches per epoch; val: {len(val_ex):,} -> {t.max_steps} steps")
            run.write_config(cfg)
            run.write_tokenizer(tokenizer)
        model = vision_language_model(cfg, base, info)
        eval_set = HeldOutImageText(val_ex, t.batch_size, tokenizer, proc) if val_ex else None
        # Samples only for the held-out conversations this run named at its start.
        known = set(prompts)
        sample = sample_fn if all(p in known for p in t.sample_prompts) else None
        train(cfg, model, tokenizer, batches, eval_set, run.path, device, info, resume=resume,
              sample_fn=sample, lr_scale=lr_scales(cfg))
    finally:
        cleanup(info)
    return run.path
