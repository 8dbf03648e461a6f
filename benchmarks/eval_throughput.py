"""Scoring speed of babyllama's evaluation next to transformers, same weights, same requests.

What is measured: scored tokens per second (lm) and questions per second (choice), both built from real data when
../shared/data is present (random tokens otherwise):

  lm      Wikipedia paragraphs, each `[bos] + tokens + [eos]`, in non-overlapping windows of
          the context (what `babyllama eval --task lm` scores): every position is a target.
  choice  CMMLU questions in the zero-shot letter format: one row per question, four
          one-token continuations ("A".."D") scored at its last position.

Ours is `score_requests` (sorted, right-padded batches; the LM head only at the scored
positions). The reference is the way lm-evaluation-harness's HF backend scores requests with
transformers' `LlamaForCausalLM`: the same padded batches, full logits for every position,
`log_softmax` over all of them, then a gather. Both return the same log-likelihoods (checked
before timing). Rounds alternate ours and theirs; the median round is reported.

    python benchmarks/eval_throughput.py                      # demo-cpu preset, 55k vocabulary
    python benchmarks/eval_throughput.py --rounds 3 --questions 200 --documents 40
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import available_cores, hf_twin  # noqa: E402

from babyllama.config import load_config  # noqa: E402
from babyllama.eval.lm import window_requests  # noqa: E402
from babyllama.eval.scoring import score_requests  # noqa: E402
from babyllama.model.llama import Llama  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_tokenizer():
    from babyllama.tokenizer import Tokenizer

    path = SHARED / "tokenizers" / "chinese-llama2"
    return Tokenizer.load(path) if path.exists() else None


def lm_requests(tok, context: int, n_docs: int, vocab: int) -> list:
    path = SHARED / "pretrain" / "zhwiki" / "paragraphs.jsonl"
    if tok is not None and path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()[:n_docs]
        docs = [[tok.bos_id] + tok.encode(json.loads(l)["text"]) + [tok.eos_id] for l in lines]
    else:
        g = torch.Generator().manual_seed(0)
        docs = [torch.randint(3, vocab, (400,), generator=g).tolist() for _ in range(n_docs)]
    return [r for d in docs for r in window_requests(d, context, context)]


def choice_requests(tok, n_questions: int, vocab: int) -> list:
    folder = SHARED / "eval" / "cmmlu" / "test"
    out = []
    if tok is not None and folder.exists():
        letters = [tok.encode("答案是：" + L)[-1] for L in "ABCD"]
        for f in sorted(folder.glob("*.csv")):
            with open(f, encoding="utf-8") as fh:
                for row in list(csv.DictReader(fh))[:max(1, n_questions // 67)]:
                    prompt = (f"题目：{row['Question']}\n" + "".join(f"{L}. {row[L]}\n" for L in "ABCD")
                              + "答案是：")
                    ids = [tok.bos_id] + tok.encode(prompt)
                    out += [(ids, [t]) for t in letters]
    else:
        g = torch.Generator().manual_seed(1)
        for _ in range(n_questions):
            ids = torch.randint(3, vocab, (80,), generator=g).tolist()
            out += [(ids, [t]) for t in (10, 11, 12, 13)]
    return out


def reference_scores(hf, requests, batch_size: int, context: int) -> list[float]:
    """lm-evaluation-harness's HF loglikelihood path, reduced to its arithmetic: unique inputs
    sorted by length, right-padded batches, log_softmax over every position's logits."""
    inputs, where = {}, []
    for ctx, cont in requests:
        seq = (list(ctx) + list(cont))[-(context + 1):]
        key = tuple(seq[:-1])
        where.append((inputs.setdefault(key, len(inputs)), len(key) - len(cont), list(cont)))
    keys = list(inputs)
    order = sorted(range(len(keys)), key=lambda r: -len(keys[r]))
    row_of, logps = {}, {}
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        x = torch.zeros(len(rows), len(keys[rows[0]]), dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, :len(keys[r])] = torch.tensor(keys[r])
            row_of[r] = (s, b)
        logps[s] = torch.log_softmax(hf(x).logits.float(), dim=-1)
    out = []
    for r, first, cont in where:
        s, b = row_of[r]
        pos = torch.arange(first, first + len(cont))
        out.append(logps[s][b, pos, torch.tensor(cont)].sum().item())
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo-cpu")
    ap.add_argument("--documents", type=int, default=60)
    ap.add_argument("--questions", type=int, default=335)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    torch.set_num_threads(available_cores())
    tok = load_tokenizer()
    cfg = load_config(args.preset).model
    cfg.vocab_size = tok.vocab_size if tok is not None else 8000
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    hf = hf_twin(model).eval()
    context = cfg.max_position_embeddings
    print(f"{args.preset}: vocab {cfg.vocab_size:,}, context {context}, {available_cores()} cores, "
          f"batch {args.batch_size}, load {os.getloadavg()[0]:.1f}, data: "
          f"{'../shared (zhwiki, CMMLU)' if tok is not None else 'random tokens'}")
    print(f"{'workload':<8} {'requests':>9} {'unit':>9} {'transformers /s':>16} {'ours /s':>9} "
          f"{'ratio':>6}")
    for name, requests in (("lm", lm_requests(tok, context, args.documents, cfg.vocab_size)),
                           ("choice", choice_requests(tok, args.questions, cfg.vocab_size))):
        unit, n_items = (("token", sum(len(c) for _, c in requests)) if name == "lm"
                         else ("question", len(requests) // 4))
        with torch.inference_mode():
            ours = [s.logprob for s in score_requests(model, requests, batch_size=args.batch_size,
                                                      progress=False)]
            theirs = reference_scores(hf, requests, args.batch_size, context)
            assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-2, "log-likelihoods differ"
            t_ours, t_hf = [], []
            for _ in range(args.rounds):
                # Called at once: the loop variables are bound by default arguments for clarity.
                t_ours.append(timed(lambda rs=requests: score_requests(model, rs, batch_size=args.batch_size,
                                                                       progress=False)))
                t_hf.append(timed(lambda rs=requests, c=context: reference_scores(hf, rs, args.batch_size, c)))
        a, b = n_items / statistics.median(t_hf), n_items / statistics.median(t_ours)
        print(f"{name:<8} {len(requests):>9,} {unit:>9} {a:>16,.1f} {b:>9,.1f} {b / a:>5.2f}x")


if __name__ == "__main__":
    main()
