"""The `lm` task: perplexity, next-token accuracy, and bits per character and per byte.

Each document is scored as it was trained, `[bos] + tokens + [eos]`: every token after BOS is
predicted, the end of the document included. A document longer than the context is scored in
windows of `stride` new tokens, each seeing up to a full context of the tokens before it
(transformers' "perplexity of fixed-length models" recipe); the default stride, the whole
context, gives non-overlapping windows (fastest); a smaller stride gives each token more
history and a lower, fairer perplexity.

Perplexity depends on the tokenizer (a token is a different unit for each); bits per
character and per UTF-8 byte divide the same total information by a length every tokenizer
agrees on, so they compare models with different vocabularies.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from babyllama.data.readers import iter_documents, require_documents
from babyllama.data.shards import TokenShards
from babyllama.errors import UserError
from babyllama.eval.report import EvalResult
from babyllama.eval.scoring import score_requests

# Documents scored per call: bounds the requests held in memory on a large corpus.
DOCS_PER_CHUNK = 256


@dataclass
class LMOptions:
    data: str                   # text file / jsonl / folder / builtin:NAME, or a prepared dataset
    text_field: str = "text"
    split: str = "val"          # the split of a prepared dataset
    stride: int | None = None   # new tokens per window; None: the model's context
    limit: int | None = None    # the first N documents
    batch_size: int = 8
    progress: bool = True

    def check(self) -> None:
        if self.stride is not None and self.stride < 1:
            raise UserError(f"--stride must be at least 1, got {self.stride}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")


def window_requests(ids: list[int], context: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that predict ids[1:] exactly once, each input at most
    `context` tokens long."""
    out = []
    a, n = 1, len(ids) - 1
    while a <= n:
        b = min(a + stride, n + 1)       # predict ids[a:b]
        lo = max(0, b - 1 - context)     # from the input ids[lo:b-1]
        out.append((ids[lo:a], ids[a:b]))
        a = b
    return out


def documents(opts: LMOptions, tokenizer, vocab_size: int) -> Iterator[tuple[list[int], str]]:
    """(token ids with bos/eos, the document's text) for each document of the data."""
    path = Path(opts.data)
    if (path / "meta.json").exists():
        shards = TokenShards(path, opts.split)
        if shards.vocab_size != vocab_size:
            raise UserError(f"{path}: prepared with a tokenizer of {shards.vocab_size} tokens; "
                            f"the model has {vocab_size}: prepare the data with this run's tokenizer")
        for i in range(shards.n_documents):
            ids = shards.document(i).tolist()
            yield ids, tokenizer.decode(ids)
        return
    for text in require_documents(iter_documents(opts.data, text_field=opts.text_field), opts.data):
        yield [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id], text


def run_lm(model, tokenizer, opts: LMOptions) -> EvalResult:
    opts.check()
    context = model.config.max_position_embeddings
    stride = min(opts.stride or context, context)
    docs = itertools.islice(documents(opts, tokenizer, model.config.vocab_size), opts.limit)
    nats = 0.0
    tokens = correct = chars = n_bytes = n_docs = 0
    chunk = list(itertools.islice(docs, DOCS_PER_CHUNK))  # bad data fails before the bar shows
    bar = tqdm(desc="lm", unit="doc", disable=not opts.progress)
    while chunk:
        requests = [r for ids, _ in chunk for r in window_requests(ids, context, stride)]
        for s in score_requests(model, requests, batch_size=opts.batch_size, progress=False):
            nats -= s.logprob
            tokens += s.tokens
            correct += s.correct
        for _, text in chunk:
            chars += len(text)
            n_bytes += len(text.encode("utf-8"))
        n_docs += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(ppl=f"{math.exp(min(nats / max(tokens, 1), 50)):.2f}", refresh=False)
        chunk = list(itertools.islice(docs, DOCS_PER_CHUNK))
    bar.close()
    if tokens == 0:
        raise UserError(f"{opts.data}: no tokens to score")
    loss = nats / tokens
    bits = nats / math.log(2)
    metrics = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": correct / tokens,
               "bpc": bits / max(chars, 1), "bpb": bits / max(n_bytes, 1), "documents": n_docs,
               "tokens": tokens, "chars": chars, "bytes": n_bytes, "chars_per_token": chars / tokens}
    columns = ["documents", "tokens", "loss", "perplexity", "accuracy", "bits/char", "bits/byte",
               "chars/token"]
    row = {"documents": n_docs, "tokens": tokens, "loss": loss, "perplexity": metrics["ppl"],
           "accuracy": metrics["acc"], "bits/char": metrics["bpc"], "bits/byte": metrics["bpb"],
           "chars/token": metrics["chars_per_token"]}
    settings = {"stride": stride, "context": context}
    if (Path(opts.data) / "meta.json").exists():
        settings["split"] = opts.split
    if opts.limit:
        settings["limit"] = opts.limit
    return EvalResult("lm", opts.data, metrics, columns, [row], settings)
