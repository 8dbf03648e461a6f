"""How well a model predicts given tokens, in batches: the one scoring primitive behind
perplexity / accuracy / bits per character, multiple choice and the trainer's validation loss.

    target_scores(model, x, y)            per row: (nats, targets, correct) for targets y
                                          (-100 = not scored), as the trainer's batches come
    score_requests(model, [(ctx, cont)])  [Scored]: the log-likelihood of each continuation
                                          after its context (lm-evaluation-harness's
                                          `loglikelihood` request)

The LM head runs only at the positions that are scored, in chunks: the full (batch, length,
vocab) logits would be ~2 GB for a 64k vocabulary at batch 16 x 512.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from babyllama.errors import UserError
from babyllama.infer.generate import eval_mode

# Logits materialised at once: 2**25 floats = 128 MB (512 positions of a 64k vocabulary).
HEAD_CHUNK_ELEMENTS = 1 << 25


@dataclass
class Scored:
    logprob: float    # sum of the continuation tokens' log-probabilities (nats)
    tokens: int       # continuation length in tokens
    greedy: bool      # every continuation token was the model's top choice
    correct: int      # how many continuation tokens were the model's top choice
    truncated: bool   # the context was cut on the left to fit the model's context


def base_model(model):
    """Our `Llama` under a peft (LoRA) wrapper; LoRA layers stay active inside it."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def gathered_scores(model, x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                    targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of `targets[i]` predicted at (rows[i], positions[i]) of the batch `x`,
    and whether it was the argmax. Runs under the caller's no_grad / autocast."""
    llama = base_model(model)
    hidden = llama.hidden_states(x)[rows, positions]
    chunk = max(1, HEAD_CHUNK_ELEMENTS // llama.config.vocab_size)
    logps, hits = [], []
    for i in range(0, len(targets), chunk):
        # log-softmax in fp32 whatever the compute dtype (as the training loss).
        logits = llama.lm_head(hidden[i:i + chunk]).float()
        t = targets[i:i + chunk]
        logps.append(torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1))
        hits.append(logits.argmax(-1) == t)
    if not logps:
        empty = torch.zeros(0, device=x.device)
        return empty, empty.bool()
    return torch.cat(logps), torch.cat(hits)


def wide_float(device: torch.device) -> torch.dtype:
    """The dtype to accumulate log-likelihood sums in: float64, except on Apple's MPS, which
    has none (float32 there: sums of ~1e6 nats keep ~6 significant digits)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@torch.no_grad()
def target_scores(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of the batch: summed negative log-likelihood (nats), number of scored
    targets, and how many the argmax predicted (next-token accuracy, as small-model write-ups report it)."""
    mask = y != -100
    rows, positions = mask.nonzero(as_tuple=True)
    logp, hit = gathered_scores(model, x, rows, positions, y[rows, positions])
    B = x.size(0)
    wide = wide_float(x.device)
    nats = torch.zeros(B, dtype=wide, device=x.device).index_add_(0, rows, -logp.to(wide))
    correct = torch.zeros(B, dtype=torch.long, device=x.device).index_add_(0, rows, hit.long())
    return nats, mask.sum(1), correct


@torch.no_grad()
def score_requests(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   batch_size: int = 16, desc: str | None = None,
                   progress: bool = True) -> list[Scored]:
    """Score each (context ids, continuation ids): the continuation's log-likelihood after the
    context, and whether greedy decoding would have produced it.

    A context too long for the model is cut on the left (the continuation is kept whole).
    Requests whose inputs are identical (the same question scored for options "A", "B", ...)
    share one row of the batch. Rows are sorted by length so batches pad little.
    """
    llama = base_model(model)
    limit = llama.config.max_position_embeddings
    device = next(llama.parameters()).device
    inputs: dict[tuple[int, ...], int] = {}      # input ids -> row index
    items: list[tuple[int, int, list[int], bool]] = []   # (row, first scored position, targets, cut)
    for ctx, cont in requests:
        cont = list(cont)
        if not cont:
            raise ValueError("score_requests: an empty continuation has no likelihood")
        if not ctx:
            raise ValueError("score_requests: the context must hold at least one token (BOS)")
        if len(cont) > limit:
            raise UserError(f"a continuation of {len(cont)} tokens does not fit the model's "
                            f"context ({limit} tokens)")
        seq = list(ctx) + cont
        cut = max(0, len(seq) - 1 - limit)
        key = tuple(seq[cut:-1])
        row = inputs.setdefault(key, len(inputs))
        items.append((row, len(key) - len(cont), cont, cut > 0))

    keys = list(inputs)
    order = sorted(range(len(keys)), key=lambda r: -len(keys[r]))
    by_row: dict[int, list[int]] = {}
    for i, (row, *_rest) in enumerate(items):
        by_row.setdefault(row, []).append(i)
    results: list[Scored | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="req", disable=not progress, leave=False)
    # Dropout off whatever mode the caller left the model in (evaluation mid-training).
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch_rows = order[start:start + batch_size]
            width = len(keys[batch_rows[0]])
            # Right padding: causal attention keeps pads from influencing the real positions.
            x = torch.zeros(len(batch_rows), width, dtype=torch.long)
            rows, positions, targets, owners = [], [], [], []
            for b, r in enumerate(batch_rows):
                x[b, :len(keys[r])] = torch.tensor(keys[r])
                for i in by_row[r]:
                    _, first, cont, _ = items[i]
                    rows += [b] * len(cont)
                    positions += range(first, first + len(cont))
                    targets += cont
                    owners.append(i)
            logp, hit = gathered_scores(model, x.to(device), torch.tensor(rows, device=device),
                                        torch.tensor(positions, device=device),
                                        torch.tensor(targets, device=device))
            # Each request's tokens are consecutive: sum them per request in one pass.
            segment = torch.repeat_interleave(torch.arange(len(owners)),
                                              torch.tensor([len(items[i][2]) for i in owners]))
            sums = torch.zeros(len(owners), dtype=torch.float64).index_add_(0, segment, logp.double().cpu())
            hits = torch.zeros(len(owners), dtype=torch.long).index_add_(0, segment, hit.long().cpu())
            for i, lp, correct in zip(owners, sums.tolist(), hits.tolist()):
                n = len(items[i][2])
                results[i] = Scored(lp, n, correct == n, correct, items[i][3])
            bar.update(len(owners))
    bar.close()
    return results  # type: ignore[return-value]
