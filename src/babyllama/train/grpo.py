"""Group relative policy optimisation (GRPO, Shao et al. 2024): a chat run + prompts with a
reward in, a chat run out.

Each optimizer step, every rank samples `grpo.num_generations` (G) answers to each of its
prompts from the current policy with our engine (batched, seeded by (seed, step, rank), so a
resumed run samples the same), scores them with the reward, and turns each reward into an
advantage relative to its group: A = (r - mean(group)) / (std(group) + 1e-4). The loss per
answer token is PPO's clipped objective (Schulman et al. 2017),

    -min(ρ A, clip(ρ, 1 - ε, 1 + ε) A),   ρ = π(token) / π_old(token),

plus β times the k3 estimate of KL(π || π_ref), exp(ref - logp) - (ref - logp) - 1 (Schulman
2020), weighted by ρ as TRL does by default, when grpo.beta > 0; and it is normalised over all answer tokens of the step, every
micro-step and rank (TRL's default `loss_type="dapo"`, which the trainer's token-correct
accumulation gives exactly). Log-probs are taken at the sampling temperature, as the answers
were drawn. One update is made per batch of samples, so π_old is π itself (detached) and the
ratio is 1 at the update: the clipping acts only when samples are reused for several updates,
which this trainer does not do (TRL's default num_iterations=1 is the same).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from babyllama.config import RunConfig
from babyllama.data.problems import Problem, iter_problems
from babyllama.data.readers import BadRecords
from babyllama.data.sft import split_validation
from babyllama.errors import UserError
from babyllama.eval.math import MathOptions, run_math
from babyllama.infer.chat import chat_sample, prompt_ids
from babyllama.infer.config import decoding_defaults
from babyllama.infer.engine import prompt_budget
from babyllama.infer.generate import complete, eval_mode
from babyllama.train.distributed import DistInfo, all_reduce_sum, cleanup, init_distributed
from babyllama.train.logprobs import token_logps
from babyllama.train.rewards import checked_rewards, load_reward
from babyllama.train.sft import (finetune_model, finetune_schedule, finetune_tokenizer, parse_source,
                                 report_start, start_finetune)
from babyllama.train.trainer import Loss, train

IGNORE = -100


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards, groups of `group_size` adjacent answers to one prompt -> (N,) advantages:
    reward minus its group's mean, divided by the group's standard deviation (Bessel-corrected,
    + 1e-4) when `scale` (TRL's scale_rewards="group"; "none" when not)."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


def grpo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, epsilon: float, beta: float = 0.0,
                      ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Per-token losses (N, T), zero outside `mask`, and sums to log.

    `logps`, `old_logps`, `ref_logps`: (N, T) log-probs of the sampled tokens under the policy,
    the policy that sampled them and the reference; `advantages`: (N,); `mask`: (N, T) bool,
    the answer tokens. The formula is TRL GRPOTrainer's (`_compute_loss`, token level)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    A = advantages.unsqueeze(1)
    losses = -torch.min(ratio * A, clipped * A)
    stats = {"clip_ratio": (((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon) & (A > 0)))[mask].float().sum()}
    if beta:
        # Weighted by the ratio, as TRL's default use_bias_correction_kl: the samples come from
        # π_old, so this keeps the KL gradient unbiased when π has moved away from it (with one
        # update per sample the ratio is 1, and only the gradient gains the kl·∇log π term).
        kl = (torch.exp(ref_logps - logps) - (ref_logps - logps) - 1) * ratio
        stats["kl"] = kl[mask].detach().sum()
        losses = losses + beta * kl
    return losses * mask, stats


@dataclass
class Rollout:
    """One step's sampled answers on this rank, as training rows: prompt + answer, right-padded."""
    input_ids: torch.Tensor       # (R, T)
    targets: torch.Tensor         # (R, T): the answer tokens (with the end token), -100 elsewhere
    advantages: torch.Tensor      # (R,)
    ref_logps: torch.Tensor | None  # (R, T) reference log-probs of the targets (beta > 0)


class RolloutBatches:
    """The trainer's data for GRPO: each step's rows are sampled from the policy at the step's
    first micro-step, then split into `grad_accum` micro-batches of `batch_size` answers.

    `policy` is the model being trained (set before training; a peft model samples through its
    base model with the adapters active), `reference` a frozen copy of the start (beta > 0,
    full fine-tuning) or None (an adapter run's reference is the model with its adapter off)."""

    def __init__(self, problems: list[Problem], prompts: list[list[int]], tokenizer, cfg: RunConfig,
                 reward_fn, info: DistInfo):
        t, g = cfg.train, cfg.grpo
        per_step = t.batch_size * t.grad_accum
        if per_step % g.num_generations:
            raise UserError(f"config: train.batch_size x train.grad_accum ({per_step}) must be a multiple "
                            f"of grpo.num_generations ({g.num_generations}): whole groups per step")
        self.problems, self.prompts, self.tokenizer = problems, prompts, tokenizer
        self.cfg, self.g, self.reward_fn, self.info = cfg, g, reward_fn, info
        self.prompts_per_rank = per_step // g.num_generations
        self.units_per_micro = t.batch_size * g.max_new_tokens  # a constant (token-level loss)
        self.policy = None
        self.reference = None
        self.rollout: tuple[int, Rollout] | None = None
        self.last_stats: dict[str, float] = {}
        self.sampling = decoding_defaults("samples", temperature=g.temperature, top_k=g.top_k, top_p=1.0,
                                          min_p=0.0, repetition_penalty=1.0, max_new_tokens=g.max_new_tokens,
                                          num_return_sequences=g.num_generations)

    @property
    def prompts_per_step(self) -> int:
        return self.prompts_per_rank * self.info.world_size

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * len(self.problems) / self.prompts_per_step))

    def indices(self, step: int) -> list[int]:
        """This rank's prompts at `step`: an endless stream of seeded permutations."""
        n, seed = len(self.problems), self.cfg.train.seed
        start = (step * self.info.world_size + self.info.rank) * self.prompts_per_rank
        out = []
        for p in range(start, start + self.prompts_per_rank):
            order = np.random.default_rng([seed, p // n]).permutation(n)
            out.append(int(order[p % n]))
        return out

    def sample(self, step: int, device) -> Rollout:
        """Sample, score and normalise this rank's answers for `step`; records the step's stats."""
        index = self.indices(step)
        policy = self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy
        seed = int(np.random.default_rng([self.cfg.train.seed, step, self.info.rank]).integers(2**31))
        import dataclasses

        cfg = dataclasses.replace(self.sampling, seed=seed)
        with eval_mode(policy):
            completions = complete(policy, self.tokenizer, [self.prompts[i] for i in index], cfg)
        G = self.g.num_generations
        problems = [self.problems[i] for i in index for _ in range(G)]
        texts = [c.text for c in completions]
        rewards = checked_rewards(self.reward_fn, [p.question for p in problems], texts,
                                  [p.answer for p in problems], [p.source for p in problems])
        rewards_t = torch.tensor(rewards, dtype=torch.float32)
        advantages = group_advantages(rewards_t, G, self.g.scale_rewards)

        rows, targets = [], []
        for i, c in zip([i for i in index for _ in range(G)], completions):
            answer = list(c.ids) + ([c.end_token] if c.end_token is not None else [])
            seq = self.prompts[i] + answer
            rows.append(seq[:-1])
            targets.append([IGNORE] * (len(self.prompts[i]) - 1) + answer)
        T = max(map(len, rows))
        x = torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        for r, (ids, tg) in enumerate(zip(rows, targets)):
            x[r, :len(ids)], y[r, :len(tg)] = torch.tensor(ids), torch.tensor(tg)
        x, y = x.to(device), y.to(device)
        ref = None
        if self.g.beta:
            with torch.no_grad(), eval_mode(self.policy):
                if self.reference is not None:
                    ref = token_logps(self.reference, x, y, self.g.temperature)
                else:
                    with self.policy.disable_adapter():
                        ref = token_logps(self.policy, x, y, self.g.temperature)
        self.last_stats = self.rollout_stats(rewards_t, completions, device)
        return Rollout(x, y, advantages.to(device), ref)

    def rollout_stats(self, rewards: torch.Tensor, completions, device) -> dict[str, float]:
        """Mean reward, share of answers with reward >= 1 (solved, for the math reward), mean
        answer length, and the share of groups whose rewards are all equal (no signal),
        over every rank."""
        G = self.g.num_generations
        grouped = rewards.view(-1, G)
        sums = torch.tensor([rewards.sum().item(), (rewards >= 1).float().sum().item(),
                             float(sum(len(c.ids) for c in completions)), float(len(completions)),
                             (grouped.std(dim=1) == 0).float().sum().item(), float(grouped.size(0))],
                            dtype=torch.float32, device=device)
        s = all_reduce_sum(sums, self.info).tolist()
        return {"reward": s[0] / s[3], "solved": s[1] / s[3], "answer_tokens": s[2] / s[3],
                "zero_std_groups": s[4] / s[5]}

    def get(self, step: int, micro: int, device):
        if self.rollout is None or self.rollout[0] != step:
            self.rollout = (step, self.sample(step, device))
        r = self.rollout[1]
        B = self.cfg.train.batch_size
        rows = slice(micro * B, (micro + 1) * B)
        return (r.input_ids[rows], r.targets[rows], r.advantages[rows],
                None if r.ref_logps is None else r.ref_logps[rows])

    def loss(self, model, batch) -> Loss:
        x, y, advantages, ref = batch
        # Trim the micro-batch's padding columns (rows were padded to the step's longest).
        width = int((y != IGNORE).nonzero()[:, 1].max()) + 1 if (y != IGNORE).any() else 1
        x, y = x[:, :width], y[:, :width]
        ref = None if ref is None else ref[:, :width]
        logps = token_logps(model, x, y, self.g.temperature)
        mask = y != IGNORE
        losses, stats = grpo_token_losses(logps, logps.detach(), advantages, mask, self.g.epsilon,
                                          self.g.beta, ref)
        return Loss(losses.sum(), mask.sum(), stats)

    def step_stats(self) -> dict[str, float]:
        return self.last_stats


class HeldOutProblems:
    """Held-out problems scored as `babyllama eval --task math` scores them (greedy exact match
    of the final answer): `evaluate` returns val_accuracy (main process; every rank computes
    the same greedy answers, so no reduction is needed)."""

    def __init__(self, data: str | list[Problem], limit: int, tokenizer, context: int, max_new_tokens: int):
        self.tokenizer = tokenizer
        # Read and fitted now, so a bad file stops the run before training, not at the first
        # evaluation; problems too long to leave room for the answer are dropped and counted.
        problems = list(iter_problems(data, limit=limit)) if isinstance(data, str) else data[:limit]
        kept, _, self.dropped = encode_prompts(problems, tokenizer, context, max_new_tokens)
        if not kept:
            raise UserError(f"{data if isinstance(data, str) else 'the held-out problems'}: no problem "
                            f"leaves room for {max_new_tokens} answer tokens in the context")
        self.options = MathOptions(data=kept, chat=True, progress=False,
                                   generation=decoding_defaults("eval-generation", temperature=0.0,
                                                                max_new_tokens=max_new_tokens))
        self.options.check()

    def evaluate(self, model, device, precision: str, info: DistInfo) -> dict:
        policy = model.get_base_model() if hasattr(model, "get_base_model") else model
        with eval_mode(policy):
            result = run_math(policy, self.tokenizer, self.options)
        return {f"val_{k}": v for k, v in result.metrics.items()
                if isinstance(v, (int, float)) and k not in ("n", "samples")}


def read_problems(cfg: RunConfig) -> tuple[list[Problem], list[Problem], list[str], BadRecords]:
    """(train problems, held-out problems, report lines, bad records) of `cfg.sft.sources`."""
    s = cfg.sft
    if not s.sources:
        raise UserError("no prompts: pass --data FILE (problems with answers, or builtin:arith-zh)")
    bad = BadRecords()
    trains, vals, lines = [], [], []
    for k, spec in enumerate(s.sources):
        path, weight = parse_source(spec)
        if weight != 1:
            raise UserError(f"data source '{spec}': weights (@) mix conversation files; prompts are used as they are")
        math = cfg.grpo.reward == "math"
        problems = list(iter_problems(path, skip_bad=s.skip_bad_records, bad=bad, answers=math))
        if not problems:
            raise UserError(f"{path}: no usable prompts")
        # A held-out share is scored by the math task; other rewards train on every prompt.
        train_part, val_part = split_validation(problems, s.val_fraction if math else 0.0, cfg.train.seed + k)
        if cfg.grpo.max_prompts:
            train_part = train_part[:cfg.grpo.max_prompts]
        trains += train_part
        vals += val_part
        lines.append(f"{path}: {len(problems):,} problems ({len(train_part):,} used for training, "
                     f"{len(val_part):,} held out)")
    return trains, vals, lines, bad


def encode_prompts(problems: list[Problem], tokenizer, context: int, max_new_tokens: int,
                   system: str | None = None) -> tuple[list[Problem], list[list[int]], int]:
    """(problems kept, their chat prompts (after `system`, when given), how many were dropped
    for not leaving room for the answer in the context)."""
    kept, prompts, dropped = [], [], 0
    budget = prompt_budget(context, max_new_tokens)
    lead = [{"role": "system", "content": system}] if system else []
    for p in problems:
        try:
            ids, _ = prompt_ids(tokenizer, lead + [{"role": "user", "content": p.question}], budget=budget)
        except UserError:
            dropped += 1
            continue
        kept.append(p)
        prompts.append(ids)
    return kept, prompts, dropped


def run_grpo(cfg: RunConfig, resume: bool = False, eval_data: str | None = None, eval_limit: int = 200):
    """GRPO-tune `cfg.sft.base` (a chat run) on the prompts in `cfg.sft.sources` with the reward
    `cfg.grpo.reward` into `cfg.out_dir`. `eval_data` (problems) is scored at each evaluation
    (greedy accuracy; default: the held-out share of the data when the reward is `math`).
    Raises UserError for bad data, a bad reward, or a batch that does not hold whole groups."""
    run, base = start_finetune(cfg, resume)
    info, device = init_distributed(cfg.train.device)
    try:
        tokenizer = finetune_tokenizer(cfg, base)
        g = cfg.grpo
        reward_fn = load_reward(g.reward, format_bonus=g.format_bonus, device=device)
        train_problems, val_problems, lines, bad = read_problems(cfg)
        problems, prompts, dropped = encode_prompts(train_problems, tokenizer, cfg.model.max_position_embeddings,
                                                    g.max_new_tokens, cfg.sft.system_prompt or None)
        if not problems:
            raise UserError(f"no prompt leaves room for {g.max_new_tokens} answer tokens in the context")
        batches = RolloutBatches(problems, prompts, tokenizer, cfg, reward_fn, info)
        if not resume:
            cfg = finetune_schedule(cfg, batches.steps_for_epochs(cfg.sft.epochs))
            batches.cfg = cfg
        if info.is_main:
            report_start(cfg, lines, bad)
            if dropped:
                print(f"{dropped:,} prompts dropped: too long to leave {g.max_new_tokens} answer tokens")
            print(f"train: {len(problems):,} prompts; {batches.prompts_per_step} prompts x "
                  f"{g.num_generations} answers per step -> {cfg.train.max_steps} steps; reward {g.reward}")
            run.write_config(cfg)
            run.write_tokenizer(tokenizer)
        model = finetune_model(cfg, base, device, info)
        batches.policy = model
        if g.beta and not hasattr(model, "disable_adapter"):
            # Full fine-tuning keeps a frozen copy of the start as the KL reference.
            batches.reference = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        eval_set = None
        if eval_data is None and g.reward == "math" and val_problems:
            eval_data = val_problems  # the held-out share, scored by the math task
        if eval_data is not None:
            eval_set = HeldOutProblems(eval_data, eval_limit, tokenizer, cfg.model.max_position_embeddings,
                                       g.max_new_tokens)
            if eval_set.dropped and info.is_main:
                print(f"evaluation: {eval_set.dropped:,} problems dropped (too long for the context)")
        train(cfg, model, tokenizer, batches, eval_set, run.path, device, info, resume=resume,
              sample_fn=chat_sample)
    finally:
        cleanup(info)
    return run.path
