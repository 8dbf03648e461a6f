"""Continuous batching: requests join the running batch between decode steps and leave the
moment they finish, so one slow answer never holds the others back and a new request never
waits for the whole batch to end (Orca, Yu et al. OSDI 2022; the scheduler of vLLM and of
llama.cpp's server).

Each `step()` is: rows that finished or were cancelled leave (their KV cache rows dropped);
one decode step for the rows still running; the prefill of newly admitted requests as a
forward pass of its own, its cache joined to the running one (`Batch.extend`); then one token
chosen for every row. Every request keeps its own sampling settings, seed, stop strings and
stop tokens: its rows' logits go through `process_logits` with its own config and history,
exactly as `Decoder` treats a batch that shares one config.

Single-threaded by design: one engine thread owns the model and calls `step()`; other threads
only `submit` (which queues) and `cancel` (a flag read at the next step).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from babyllama.errors import UserError
from babyllama.infer.config import GenerationConfig
from babyllama.infer.engine import Batch, fit_prompts, model_device
from babyllama.infer.generate import Detokenizer, StopStrings, resolve_stops
from babyllama.infer.images import image_positions, is_vision_model
from babyllama.infer.logits import History, choose_tokens

# Free cache positions a batch keeps ahead of its rows; a full cache grows by as many.
ROOM = 64


@dataclass
class TokenLogprob:
    """One generated token for OpenAI's `logprobs`: `text` is what the token adds to the
    content ("" for a byte that only starts a character; the token that completes it carries
    the character), so the texts of a choice's tokens join to its content. `logprob` is the
    model's log-probability before any sampling setting (vLLM's default); `top` the
    `top_logprobs` most likely tokens as (text, log-prob)."""
    token: int
    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Event:
    """What one step produced for one choice of a request."""
    request: "Request"
    index: int                       # the choice (0 .. n-1)
    text: str                        # new content ("" when nothing is safe to show yet)
    logprobs: list[TokenLogprob]     # tokens whose text has been shown (when asked for)
    finish_reason: str | None = None  # "stop" or "length" on the choice's last event
    completion_tokens: int = 0       # tokens generated for this choice so far


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request: a token prompt, its settings (`cfg.num_return_sequences`
    choices), the tokens that end it (`stop_ids`: EOS or the chat turn's end) and, when
    `logprobs` is not None, that many top alternatives per generated token. An image-text
    model's request may carry `pixel_values` (N, C, S, S): the images whose expanded positions
    the prompt holds (`infer.images.image_prompt`), read at its prefill only."""
    prompt: list[int]
    cfg: GenerationConfig
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    pixel_values: torch.Tensor | None = None
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False


class Row:
    """One choice of a request while it is in the batch: its text so far (detokenised and
    searched for stop strings) and the log-probs of tokens whose text is not shown yet."""

    def __init__(self, request: Request, index: int, tokenizer, limit: int):
        self.request, self.index, self.limit = request, index, limit
        self.detok = Detokenizer(tokenizer)
        self.stops = StopStrings(request.cfg.stop)
        self.generated = 0
        self.finish_reason: str | None = None
        self.held: list[tuple[int, TokenLogprob]] = []   # (start offset in the text, entry)
        self.length = 0                                   # characters decoded so far

    def push(self, token: int, entry: TokenLogprob | None) -> str:
        """Add a generated content token; the text that is now safe to show."""
        piece = self.detok.push(token)
        if entry is not None:
            entry.text = piece
            self.held.append((self.length, entry))
        self.length += len(piece)
        shown, stopped = self.stops.push(piece) if piece else ("", False)
        if stopped:
            self.finish_reason = "stop"
        return shown

    def finish(self, reason: str) -> str:
        """End the choice; the text still held back (an unfinished stop-string prefix, a
        partial character at the very end)."""
        if self.finish_reason is None:
            self.finish_reason = reason
        if self.stops.stopped:
            return ""
        rest = self.detok.flush()
        if rest and self.held:
            start, entry = self.held[-1]
            entry.text += rest
        self.length += len(rest)
        shown, _ = self.stops.push(rest)
        return shown + self.stops.flush()

    def release(self) -> list[TokenLogprob]:
        """The held log-prob entries whose text is now all shown; once the choice has ended,
        all of them, cut where a stop string cut the text, so their texts join to the content."""
        shown = self.stops.shown
        out = []
        while self.held:
            start, entry = self.held[0]
            if self.finish_reason is None and start + len(entry.text) > shown:
                break
            if self.finish_reason is not None and start >= shown and (start > shown or entry.text):
                break
            entry.text = entry.text[:max(0, shown - start)]
            out.append(entry)
            self.held.pop(0)
        if self.finish_reason is not None:
            self.held = []
        return out


def processing_key(cfg: GenerationConfig) -> tuple:
    """The settings `process_logits` and the draw read: requests equal in these share them."""
    return (cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repetition_penalty,
            cfg.frequency_penalty, cfg.presence_penalty, cfg.no_repeat_ngram_size)


class Scheduler:
    """The continuous-batching engine: `submit` requests, call `step()` until `idle`.

    `max_rows` bounds the batch (a request with n choices takes n rows); requests beyond it
    wait, in order, for rows to free up."""

    def __init__(self, model, tokenizer, max_rows: int = 16):
        if max_rows < 1:
            raise UserError(f"the batch must hold at least 1 row, got {max_rows}")
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self.context = model.config.max_position_embeddings
        self.device = model_device(model)
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()   # guards `waiting` against submitting threads
        self.rows: list[Row] = []       # one per batch row, in batch order
        self.batch: Batch | None = None
        self.pending: torch.Tensor | None = None  # each row's last token, not yet fed
        self.state: dict[int, tuple[History, torch.Generator | None]] = {}

    # -- called from any thread ---------------------------------------------------------------
    def check(self, request: Request) -> Request:
        """Validate `request` (raises UserError: settings, stop strings, a prompt that leaves
        no room in the context, more choices than the batch holds) and return it with its stop
        strings resolved (`resolve_stops`)."""
        request.cfg = resolve_stops(self.tokenizer, request.cfg)
        if request.cfg.num_beams > 1:
            raise UserError("beam search is not served (num_beams must be 1)")
        if request.cfg.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {request.cfg.max_new_tokens}")
        if request.cfg.num_return_sequences > self.max_rows:
            raise UserError(f"n={request.cfg.num_return_sequences} choices do not fit a batch of "
                            f"{self.max_rows} rows (the server's --max-batch)")
        if request.logprobs is not None and not 0 <= request.logprobs <= 20:
            raise UserError(f"top_logprobs must be between 0 and 20, got {request.logprobs}")
        fitted = fit_prompts([request.prompt], self.context, request.cfg)[0]
        if request.pixel_values is not None:
            if not is_vision_model(self.model):
                raise UserError("this model reads no images (it is a text model)")
            if fitted != request.prompt:
                raise UserError(f"a prompt with an image is longer than the context ({self.context} tokens, "
                                "each image taking its share): shorten the text")
            n = sum(1 for t in request.prompt if t == self.model.vlm_config.image_token_id)
            k = image_positions(self.model)
            if n != request.pixel_values.size(0) * k:
                raise UserError(f"the prompt has {n} image positions for {request.pixel_values.size(0)} "
                                f"image(s) of {k} positions each")
        request.prompt = fitted
        return request

    def submit(self, request: Request) -> None:
        """Queue a checked request; it joins the batch at a coming step."""
        with self.lock:
            self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): its rows leave at the next step."""
        request.cancelled = True

    @property
    def waiting_count(self) -> int:
        return len(self.waiting)

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting

    # -- called only from the engine thread ----------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One decode step for the running rows plus the prefill of the requests admitted now;
        the events of every row that generated a token or finished."""
        events: list[Event] = []
        for row in self.rows:
            if row.request.cancelled and row.finish_reason is None:
                row.finish_reason = "cancelled"
        self.leave()
        if self.rows:
            self.batch.step(self.pending)
        self.admit()
        if not self.rows:
            return events
        logits = self.batch.logits
        groups = self.groups()
        chosen = self.sample(groups, logits)
        token_list = chosen.tolist()
        for request, idx in groups:
            rows = slice(idx[0], idx[-1] + 1)
            self.emit(request, idx, logits[rows], chosen[rows], token_list[rows], events)
        self.pending = chosen
        return events

    def groups(self) -> list[tuple[Request, list[int]]]:
        """(request, its batch rows) in batch order; a request's rows are always adjacent."""
        out: list[tuple[Request, list[int]]] = []
        for i, row in enumerate(self.rows):
            if out and out[-1][0] is row.request:
                out[-1][1].append(i)
            else:
                out.append((row.request, [i]))
        return out

    def sample(self, groups: list[tuple[Request, list[int]]], logits: torch.Tensor) -> torch.Tensor:
        """One token per batch row, (rows,). A request with a seeded generator is drawn alone;
        the others are processed together with every request of the same settings (their
        histories stacked) and drawn in one go, since a row's result does not depend on the
        rows beside it: a dozen small ops per request per step would cost as much as the model
        itself at batch 16."""
        chosen = torch.empty(len(self.rows), dtype=torch.long, device=self.device)
        shared: dict[tuple, list[tuple[Request, list[int]]]] = {}
        for request, idx in groups:
            history, generator = self.state[request.id]
            if generator is None:
                shared.setdefault(processing_key(request.cfg), []).append((request, idx))
            else:
                chosen[idx[0]:idx[-1] + 1] = choose_tokens(logits[idx[0]:idx[-1] + 1], history, request.cfg,
                                                            generator)
        for members in shared.values():
            rows = [i for _, idx in members for i in idx]
            history = History.concat([self.state[request.id][0] for request, _ in members])
            cfg = members[0][0].cfg
            if len(rows) == len(self.rows):
                chosen = choose_tokens(logits, history, cfg)
            else:
                index = torch.tensor(rows, device=self.device)
                chosen[index] = choose_tokens(logits.index_select(0, index), history, cfg)
        return chosen

    def emit(self, request: Request, idx: list[int], logits: torch.Tensor, tokens: torch.Tensor,
             token_list: list[int], events: list[Event]) -> None:
        """Record a request's new tokens: its history, each row's text, stops and log-probs."""
        self.state[request.id][0].append(tokens, token_list)
        entries: list[TokenLogprob | None] = [None] * len(idx)
        if request.logprobs is not None:
            logprobs = logits.float().log_softmax(dim=-1)
            picked = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
            top_values, top_ids = (logprobs.topk(request.logprobs, dim=-1) if request.logprobs
                                   else (logprobs[:, :0], tokens[:, None][:, :0]))
            for j in range(len(idx)):
                top = [(self.tokenizer.decode([t], skip_special_tokens=False), v)
                       for t, v in zip(top_ids[j].tolist(), top_values[j].tolist())]
                entries[j] = TokenLogprob(token_list[j], "", picked[j], top)
        for j, (i, token) in enumerate(zip(idx, token_list)):
            row = self.rows[i]
            row.generated += 1
            text = ""
            if token in request.stop_ids:
                text = row.finish("stop")
            else:
                text = row.push(token, entries[j])
                if row.finish_reason is None and row.generated >= row.limit:
                    text += row.finish("length")
            events.append(Event(request, row.index, text, row.release(), row.finish_reason,
                                row.generated))

    def leave(self) -> None:
        """Drop the rows that finished (and their cache rows, history rows, pending tokens)."""
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) == len(self.rows):
            return
        for request, idx in self.groups():
            kept = [j for j, i in enumerate(idx) if self.rows[i].finish_reason is None]
            if not kept:
                del self.state[request.id]
            elif len(kept) < len(idx):
                self.state[request.id][0].select(kept)
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.batch = self.pending = None
            return
        self.batch.select(keep)
        self.batch.compact()
        self.pending = self.pending[keep]

    def admit(self) -> None:
        """Prefill the waiting requests that fit the free rows (in arrival order; cancelled
        ones are dropped) as one padded batch, and join it to the running one."""
        admitted: list[Request] = []
        free = self.max_rows - len(self.rows)
        with self.lock:
            while self.waiting:
                request = self.waiting[0]
                if request.cancelled:
                    self.waiting.popleft()
                    continue
                if request.cfg.num_return_sequences > free:
                    break
                free -= request.cfg.num_return_sequences
                admitted.append(self.waiting.popleft())
        if not admitted:
            return
        # Images enter at the prefill: the admitted requests' pixel values in row order (a
        # padded row holds no image positions, so `VisionLanguageModel.embed` fills each
        # request's positions with its own images).
        images = [r.pixel_values for r in admitted if r.pixel_values is not None]
        pixel_values = torch.cat(images) if images else None
        prefill = Batch(self.model, [r.prompt for r in admitted], ROOM, pixel_values)
        rows = [i for i, r in enumerate(admitted) for _ in range(r.cfg.num_return_sequences)]
        if len(rows) > len(admitted):
            prefill.select(rows)
        vocab = prefill.logits.size(-1)
        for request in admitted:
            n, cfg = request.cfg.num_return_sequences, request.cfg
            limit = min(cfg.max_new_tokens, self.context - len(request.prompt))
            generator = None
            if cfg.seed is not None and not cfg.greedy:
                generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
            self.state[request.id] = (History([request.prompt] * n, vocab, cfg, self.device), generator)
            self.rows += [Row(request, k, self.tokenizer, limit) for k in range(n)]
        if self.batch is None:
            self.batch = prefill
        else:
            self.batch.extend(prefill, ROOM)
