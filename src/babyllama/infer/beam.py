"""Beam search, step for step the algorithm of transformers' `generate(num_beams=...)` (the beam
search fine-tuning guides decode with), so the same weights give the same sequences (tests check it).

Each step scores every (beam, token) continuation by its summed log-probability and keeps the
best 2 x beams: those ending in a stop token (or at the length limit) are offered to the
finished hypotheses with the length penalty `score / generated_length ** length_penalty`, the
best `num_beams` others continue. `early_stopping` decides when to stop: True as soon as
`num_beams` hypotheses are finished, False when the best running beam (scored at its current
length) can no longer beat the worst finished one, "never" when it cannot at the length limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from babyllama.infer.config import GenerationConfig
from babyllama.infer.engine import Batch, fit_prompts
from babyllama.infer.logits import History, apply_penalties

NEG = -1.0e9  # transformers' "impossible" score


@dataclass
class Hypothesis:
    tokens: list[int]          # generated tokens, without the stop token
    score: float               # length-penalised log-probability
    finish_reason: str         # "stop" (stop token) or "length"


def beam_search(model, prompts: list[list[int]], cfg: GenerationConfig,
                stop_ids: tuple[int, ...] = ()) -> list[list[Hypothesis]]:
    """The `num_return_sequences` best hypotheses of each prompt, best first."""
    cfg.check()
    context = model.config.max_position_embeddings
    prompts = fit_prompts(prompts, context, cfg)
    B, K = len(prompts), cfg.num_beams
    budget = min(cfg.max_new_tokens, context - max(len(p) for p in prompts))
    if budget <= 0:
        return [[Hypothesis([], 0.0, "length") for _ in range(cfg.num_return_sequences)] for _ in prompts]
    stops = sorted(set(stop_ids) | set(cfg.stop_token_ids))
    batch = Batch(model, prompts, budget)
    device = batch.logits.device
    V = batch.logits.size(-1)
    history = History(prompts, V, cfg, device)
    expand = [b for b in range(B) for _ in range(K)]
    batch.select(expand)
    history.select(expand)

    keep = max(2, 1 + len(stops)) * K          # candidates kept per step (enough to continue)
    first_k = torch.arange(keep, device=device) < K
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    running = torch.zeros(B, K, budget, dtype=torch.long, device=device)
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = NEG                # all beams start equal: only the first may expand
    finished = torch.zeros(B, K, budget, dtype=torch.long, device=device)
    finished_scores = torch.full((B, K), NEG, device=device)
    finished_len = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    offsets = (torch.arange(B, device=device) * K)[:, None]

    for t in range(budget):
        logits = batch.logits
        log_probs = apply_penalties(torch.log_softmax(logits.float(), dim=-1), history, cfg)
        total = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        cand_scores, cand_index = torch.topk(total, keep, dim=-1)
        cand_beam, cand_token = cand_index // V, cand_index % V
        cand_seqs = torch.gather(running, 1, cand_beam[:, :, None].expand(B, keep, budget)).clone()
        cand_seqs[:, :, t] = cand_token
        hits = torch.isin(cand_token, stop_tensor) | (t + 1 >= budget)

        # The best K candidates that did not stop keep running.
        alive_scores = cand_scores + hits.float() * NEG
        nxt = torch.topk(alive_scores, K, dim=-1).indices
        running = torch.gather(cand_seqs, 1, nxt[:, :, None].expand(B, K, budget))
        running_scores = torch.gather(alive_scores, 1, nxt)
        parents = torch.gather(cand_beam, 1, nxt)
        tokens = torch.gather(cand_token, 1, nxt)

        # Candidates among the top K that stopped join the finished hypotheses if good enough.
        just_finished = hits & first_k[None, :]
        offered = cand_scores / ((t + 1) ** cfg.length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & (cfg.early_stopping is True)
        offered = offered + full.float() * NEG + (~improvable).float() * NEG + (~just_finished).float() * NEG
        merged_scores = torch.cat((finished_scores, offered), dim=1)
        best = torch.topk(merged_scores, K, dim=-1).indices
        finished = torch.gather(torch.cat((finished, cand_seqs), 1), 1, best[:, :, None].expand(B, K, budget))
        finished_scores = torch.gather(merged_scores, 1, best)
        finished_len = torch.gather(torch.cat((finished_len, torch.full_like(cand_token, t + 1)), 1), 1, best)
        is_finished = torch.gather(torch.cat((is_finished, just_finished), 1), 1, best)

        # Stop when no running beam can improve the finished ones (the length it is judged at
        # depends on early_stopping), when all are finished under early_stopping=True, or when
        # every candidate stopped.
        best_len = budget if (cfg.early_stopping == "never" and cfg.length_penalty > 0) else t + 1
        best_running = running_scores[:, :1] / (best_len ** cfg.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values,
                                     torch.tensor(NEG, device=device))
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        all_done = bool(is_finished.all()) and cfg.early_stopping is True
        if not bool(improvable.any()) or all_done or bool(hits.all()) or t + 1 >= budget:
            break

        rows = (parents + offsets).view(-1)
        row_list = rows.tolist()
        batch.select(row_list)
        history.select(row_list)
        flat = tokens.view(-1)
        history.append(flat, flat.tolist())
        batch.step(flat)

    out = []
    for b in range(B):
        hyps = []
        for k in range(cfg.num_return_sequences):
            n = int(finished_len[b, k])
            seq = finished[b, k, :n].tolist()
            reason = "length"
            if seq and seq[-1] in stops:
                seq, reason = seq[:-1], "stop"
            hyps.append(Hypothesis(seq, float(finished_scores[b, k]), reason))
        out.append(hyps)
    return out
