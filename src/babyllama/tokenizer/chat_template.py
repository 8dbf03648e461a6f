"""Chat templates: conversation -> text -> (token ids, which tokens to train on).

Templates are Jinja, written so that transformers' `apply_chat_template` renders exactly the
same text as `render` (an exported model chats the way it was trained). Each marks the part of
an assistant turn the model must learn to produce -- the answer and the token that ends the
turn -- with `{% generation %}...{% endgeneration %}`, transformers' convention for
`return_assistant_tokens_mask`. Everything else (system prompt, document, user turns, the
assistant header) is context, never a target.

transformers is not a dependency: the Jinja environment below reproduces the one transformers
builds (same options, globals and `tojson`), with our own tracker for the generation blocks.
"""

from __future__ import annotations

import difflib
import json
import re
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from babyllama.errors import UserError
from babyllama.textfile import read_text
from babyllama.tokenizer.tokenizer import SPECIAL_TOKENS

# ----------------------------------------------------------------------------------------
# Presets. Conventions shared by all four (the tests hold them to it):
# - a leading {"role": "system"} message is the system prompt; a system message anywhere else,
#   or any role other than system/user/assistant, is an error (raise_exception);
# - documents come the transformers way, `documents=[{"title": ..., "text": ...}]`, after the
#   system prompt and before the first turn (grounded-dialogue data puts its 资料 passage first, too);
# - every block ends with its own separator, so the text of a conversation cut after a user
#   turn plus the generation prompt is a prefix of the whole conversation's text;
# - `{% generation %}` covers the answer and the token that ends the turn, never the header.
# Whitespace: every tag strips the template's own whitespace (`{%-`, `{{-`), so the layout
# below is for reading only and all output text is in string literals.

# ChatML, with special tokens written literally: they are fixed names in our vocabulary.
# The document gets its own `document` block rather than being pasted into the user turn: it is
# neither something the user said nor an instruction, and a block of its own keeps reference
# text and question apart for the model (and lets a conversation without one look exactly like
# plain ChatML).
CHATML = r"""
{%- set turns = messages -%}
{%- if messages and messages[0].role == 'system' -%}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' -}}
    {%- set turns = messages[1:] -%}
{%- endif -%}
{%- for doc in documents or [] -%}
    {{- '<|im_start|>document\n' + (doc.title + '\n' if doc.title else '') + doc.text + '<|im_end|>\n' -}}
{%- endfor -%}
{%- for message in turns -%}
    {%- if message.role == 'user' -%}
        {{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- generation -%}{{- message.content + '<|im_end|>' -}}{%- endgeneration -%}
        {{- '\n' -}}
    {%- elif message.role == 'system' -%}
        {{- raise_exception('a system message must be the first message') -}}
    {%- else -%}
        {{- raise_exception("unknown role '" ~ message.role ~ "' (expected system, user or assistant)") -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Seed 0's format: 资料/人类/助手 with BOS right before and EOS right after each answer. BOS is
# part of the prompt (the generation prompt ends with it); the model learns answer + EOS.
BABYLLAMA = r"""
{%- set turns = messages -%}
{%- if messages and messages[0].role == 'system' -%}
    {{- messages[0].content + '\n\n' -}}
    {%- set turns = messages[1:] -%}
{%- endif -%}
{%- for doc in documents or [] -%}
    {{- '资料：' + (doc.title + '\n' if doc.title else '') + doc.text + '\n\n' -}}
{%- endfor -%}
{%- for message in turns -%}
    {%- if message.role == 'user' -%}
        {{- '人类：' + message.content + '\n\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '助手：' + bos_token -}}
        {%- generation -%}{{- message.content + eos_token -}}{%- endgeneration -%}
        {{- '\n\n' -}}
    {%- elif message.role == 'system' -%}
        {{- raise_exception('a system message must be the first message') -}}
    {%- else -%}
        {{- raise_exception("unknown role '" ~ message.role ~ "' (expected system, user or assistant)") -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '助手：' + bos_token -}}
{%- endif -%}
"""

# litgpt's Phi-2 prompt ("Instruct: ...\nOutput:"). The space after "Output:" is inside the
# generation block: byte-level BPE makes " word" one pre-token, so a prompt ending in "Output: "
# would leave a lone space token the model never saw before an answer in training.
PHI2 = r"""
{%- set turns = messages -%}
{%- if messages and messages[0].role == 'system' -%}
    {{- messages[0].content + '\n' -}}
    {%- set turns = messages[1:] -%}
{%- endif -%}
{%- for doc in documents or [] -%}
    {{- 'Document: ' + (doc.title + '\n' if doc.title else '') + doc.text + '\n' -}}
{%- endfor -%}
{%- for message in turns -%}
    {%- if message.role == 'user' -%}
        {{- 'Instruct: ' + message.content + '\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- 'Output:' -}}
        {%- generation -%}{{- ' ' + message.content + eos_token -}}{%- endgeneration -%}
        {{- '\n' -}}
    {%- elif message.role == 'system' -%}
        {{- raise_exception('a system message must be the first message') -}}
    {%- else -%}
        {{- raise_exception("unknown role '" ~ message.role ~ "' (expected system, user or assistant)") -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'Output:' -}}
{%- endif -%}
"""

# FlagAlpha Llama2-Chinese: "<s>Human: ...\n</s><s>Assistant: ...\n</s>". Same space rule as
# PHI2; the "\n" before </s> is part of the answer the model learns.
LLAMA2_CHINESE = r"""
{%- set turns = messages -%}
{%- if messages and messages[0].role == 'system' -%}
    {{- bos_token + 'System: ' + messages[0].content + '\n' + eos_token -}}
    {%- set turns = messages[1:] -%}
{%- endif -%}
{%- for doc in documents or [] -%}
    {{- bos_token + 'Document: ' + (doc.title + '\n' if doc.title else '') + doc.text + '\n' + eos_token -}}
{%- endfor -%}
{%- for message in turns -%}
    {%- if message.role == 'user' -%}
        {{- bos_token + 'Human: ' + message.content + '\n' + eos_token -}}
    {%- elif message.role == 'assistant' -%}
        {{- bos_token + 'Assistant:' -}}
        {%- generation -%}{{- ' ' + message.content + '\n' + eos_token -}}{%- endgeneration -%}
    {%- elif message.role == 'system' -%}
        {{- raise_exception('a system message must be the first message') -}}
    {%- else -%}
        {{- raise_exception("unknown role '" ~ message.role ~ "' (expected system, user or assistant)") -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- bos_token + 'Assistant:' -}}
{%- endif -%}
"""

TEMPLATES: dict[str, str] = {
    "chatml": CHATML.strip(),
    "babyllama": BABYLLAMA.strip(),
    "phi2": PHI2.strip(),
    "llama2-chinese": LLAMA2_CHINESE.strip(),
}
DEFAULT_TEMPLATE = "chatml"

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ----------------------------------------------------------------------------------------
# The Jinja environment (transformers' `_compile_jinja_template`, minus transformers).

# (characters rendered so far, generation spans found) of the render in progress in this
# thread/task; None when rendering without tracking. A ContextVar keeps concurrent renders of
# the same cached template apart.
_TRACK: ContextVar[list | None] = ContextVar("chat_template_track", default=None)


class GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged and, while a
    tracked render is in progress, records the body's character span in the output."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

    def _generation(self, caller) -> str:
        text = caller()
        track = _TRACK.get()
        if track is not None:
            # `render` consumes the template's generator chunk by chunk and counts characters,
            # so track[0] is exactly where this block's output will start.
            track[1].append((track[0], track[0] + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # As transformers: Jinja's own tojson escapes HTML characters and non-ASCII text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _first_line(message) -> str:
    return (str(message).strip().splitlines() or ["error"])[0]


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """Compiled once per template text: compiling costs ~1000x a render."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template line {e.lineno}: {_first_line(e.message)}") from None


def _template_line(e: BaseException) -> int | None:
    """The template line being rendered when `e` was raised (Jinja rewrites the traceback so
    that template frames carry template line numbers)."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# ----------------------------------------------------------------------------------------


def resolve_template(spec: str) -> str:
    """Template text for `spec`: a preset name, a Jinja string (contains "{%" or "{{"), or the
    path of a template file. Checks that it compiles."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{%" in spec or "{{" in spec:
        _compile(spec)
        return spec
    path = Path(spec)
    if path.is_file():
        source = read_text(path)  # a BOM must not be rendered into every conversation
        try:
            _compile(source)
        except UserError as e:  # name the file: "path:line: problem"
            raise UserError(re.sub(r"^chat template line ", f"{path}:", str(e))) from None
        return source
    raise UserError(f"chat template {spec!r}: not a preset ({', '.join(TEMPLATES)}), "
                    f"a template file or a Jinja string")


def render(template: str, messages: list[dict], *, document: str | None = None,
           add_generation_prompt: bool = False,
           special_tokens: dict[str, str] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` (optionally led by a system message) with the Jinja text `template`.

    Returns the text and the [start, end) character spans of its `{% generation %}` blocks, as
    transformers' `apply_chat_template(..., documents=[{"title": "", "text": document}])` would.
    `special_tokens` (role -> token, default SPECIAL_TOKENS) become the `<role>_token`
    variables (bos_token, eos_token, ...)."""
    compiled = _compile(template)
    tokens = SPECIAL_TOKENS if special_tokens is None else special_tokens
    variables = {f"{role}_token": token for role, token in tokens.items()}
    documents = None if document is None else [{"title": "", "text": document}]
    track: list = [0, []]
    parts: list[str] = []
    reset = _TRACK.set(track)
    try:
        for chunk in compiled.generate(messages=messages, documents=documents,
                                       add_generation_prompt=add_generation_prompt, **variables):
            parts.append(chunk)
            track[0] += len(chunk)
    except (jinja2.TemplateError, TypeError) as e:
        line = _template_line(e)
        where = f"chat template line {line}" if line else "chat template"
        raise UserError(f"{where}: {_first_line(e)}") from None
    finally:
        _TRACK.reset(reset)
    return "".join(parts), track[1]


@dataclass
class ChatEncoding:
    ids: list[int]                 # tokens of the rendered conversation
    mask: list[bool]               # True for tokens inside a generation block (train on them)
    spans: list[tuple[int, int]]   # [start, end) token range of each generation block, in order


# Stand-in for a control token's text inside message content while finding which control tokens
# the template wrote (a Unicode private-use character: no template writes one).
_MASK = "\ue000"


def _masked(value, pattern: re.Pattern):
    """`value` (messages, a document) with every control token's text in its strings replaced
    by as many _MASK characters."""
    if isinstance(value, str):
        return pattern.sub(lambda m: _MASK * len(m.group()), value)
    if isinstance(value, dict):
        return {k: _masked(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked(v, pattern) for v in value]
    return value


def template_controls(tokenizer, source: str, text: str, messages: list[dict],
                      document: str | None, add_generation_prompt: bool) -> list[tuple[int, int]]:
    """The [start, end) character ranges of `text` (the rendered conversation) holding control
    tokens that the template wrote, in order. Control-token text inside messages or the
    document is left out: it stays text (a user message cannot open a fake system turn,
    huggingface/transformers#29279).

    The conversation is rendered again with that text masked in messages and document; a control
    token of `text` is the template's when the masked render has it at the same place (found
    through difflib's alignment when a template changes the content's length)."""
    pattern = tokenizer.control_pattern
    if pattern is None:
        return []
    found = [m.span() for m in pattern.finditer(text)]
    # The image placeholder is the one control token content may carry: it marks where a
    # message's image goes (LLaVA's `<image>`), so it is never masked.
    image = tokenizer.special_tokens.get("image")
    alternatives = re.split(r"(?<!\\)\|", pattern.pattern)  # the escaped token texts
    if image and re.escape(image) in alternatives:
        others = [a for a in alternatives if a != re.escape(image)]
        pattern = re.compile("|".join(others)) if others else None
        if pattern is None:
            return found
    masked_messages, masked_document = _masked(messages, pattern), _masked(document, pattern)
    if not found or (masked_messages == messages and masked_document == document):
        return found  # no control-token text in the content: every one is the template's
    masked, _ = render(source, masked_messages, document=masked_document,
                       add_generation_prompt=add_generation_prompt,
                       special_tokens=tokenizer.special_tokens)
    if len(masked) == len(text):
        return [(a, b) for a, b in found if masked[a:b] == text[a:b]]
    blocks = difflib.SequenceMatcher(None, text, masked, autojunk=False).get_matching_blocks()
    return [(a, b) for a, b in found
            if any(i <= a and b <= i + n and masked[j + a - i:j + b - i] == text[a:b]
                   for i, j, n in blocks)]


def answer_spans(tokenizer, source: str, text: str, messages: list[dict],
                 document: str | None) -> list[tuple[int, int]]:
    """The [start, end) character spans of the answers in `text` (the conversation rendered by
    `source`, a template without `{% generation %}` blocks, as released models ship theirs):
    each answer from the end of what the template renders before it with
    `add_generation_prompt=True`, through its content and the token that ends the turn (EOS or
    `<|im_end|>`, after optional whitespace) -- what a `{% generation %}` block would cover.
    Raises UserError naming the answer when it cannot be found that way: the template renders
    earlier turns differently once an answer follows (it rewrites history), changes the
    answer's text, or ends the turn with no stop token."""
    stops = stop_tokens(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        n = sum(m.get("role") == "assistant" for m in messages[:i]) + 1
        prompt, _ = render(source, messages[:i], document=document, add_generation_prompt=True,
                           special_tokens=tokenizer.special_tokens)
        where = f"chat template (it has no {{% generation %}} block): answer {n}"
        if not text.startswith(prompt):
            raise UserError(f"{where}: the conversation before it renders differently once the answer "
                            "follows, so the answer's tokens cannot be told apart (add a "
                            "{% generation %} block around the answers)")
        rest = text[len(prompt):]
        content = message["content"]
        lead = len(rest) - len(rest.lstrip())
        if not rest[lead:].startswith(content):
            raise UserError(f"{where}: the template does not write the answer as given right after "
                            "its generation prompt (add a {% generation %} block around the answers)")
        end = lead + len(content)
        end += len(rest[end:]) - len(rest[end:].lstrip())
        stop = next((t for t in stops if rest.startswith(t, end)), None)
        if stop is None:
            raise UserError(f"{where}: no {' or '.join(stops) or 'end-of-turn token'} ends it, so the "
                            "model would never learn to stop (add a {% generation %} block around "
                            "each answer and the token that ends it)")
        spans.append((len(prompt), len(prompt) + end + len(stop)))
    return spans


def encode_chat(tokenizer, messages: list[dict], *, document: str | None = None,
                add_generation_prompt: bool = False, template: str | None = None) -> ChatEncoding:
    """Render and encode a conversation. `template`: anything `resolve_template` takes; None
    means the tokenizer's own chat template, else the default preset.

    Control tokens come from the template only: `<|im_end|>` typed inside a message is encoded
    as text (`template_controls`)."""
    source = resolve_template(template or tokenizer.chat_template or DEFAULT_TEMPLATE)
    text, char_spans = render(source, messages, document=document,
                              add_generation_prompt=add_generation_prompt,
                              special_tokens=tokenizer.special_tokens)
    if not char_spans and any(m.get("role") == "assistant" for m in messages):
        if _GENERATION_TAG.search(source):
            if not add_generation_prompt:
                raise UserError("chat template: its {% generation %} blocks cover none of the answers")
        elif not add_generation_prompt:
            char_spans = answer_spans(tokenizer, source, text, messages, document)
        else:
            # A prompt cuts its earlier answers where training did, so that it is token for
            # token what the model was trained on; a template whose answers cannot be found
            # (never trained here) is encoded whole.
            try:
                char_spans = answer_spans(tokenizer, source, text, messages, document)
            except UserError:
                char_spans = []
    # Encode segment by segment, cutting the text at every generation-block boundary, rather
    # than the whole text at once. Then no token straddles prompt and answer, and the text
    # before an answer -- exactly what `add_generation_prompt=True` renders for inference --
    # always encodes to the same tokens, whether or not the answer follows. Encoding the whole
    # text, a tokenizer may merge across the boundary ("\n" + "\n\nanswer" -> "\n\n",
    # SentencePiece's dummy prefix): the model would be trained on tokens the prompt at
    # inference never produces. For ordinary answers both ways give the same ids.
    cuts = [0]
    for start, end in char_spans:
        if start < cuts[-1] or end < start:
            raise UserError("chat template: {% generation %} blocks must not nest or overlap")
        cuts += [start, end]
    cuts.append(len(text))
    controls = template_controls(tokenizer, source, text, messages, document, add_generation_prompt)
    # Each segment (context, generation, context, ...) splits further into text pieces and the
    # template's control tokens; all text pieces are encoded in one batch.
    segments = []
    for a, b in zip(cuts, cuts[1:]):
        inside = [(s - a, e - a) for s, e in controls if a <= s and e <= b]
        segments.append(tokenizer.split_controls(text[a:b], inside))
    # A text piece that starts a segment right after text (a cut between prompt and answer,
    # not a control token) continues that text: it is encoded without the dummy prefix a
    # SentencePiece model puts at the start of every string (`encode_continued`), as it would
    # be inside the whole text.
    continued, after_text, n = set(), False, 0  # positions among the text pieces
    for seg in segments:
        if seg and isinstance(seg[0], str) and after_text:
            continued.add(n)
        n += sum(isinstance(p, str) for p in seg)
        after_text = isinstance(seg[-1], str) if seg else after_text
    pieces = [p for seg in segments for p in seg if isinstance(p, str)]
    plain = iter(tokenizer.encode_batch([p for i, p in enumerate(pieces) if i not in continued]))
    joined = iter(tokenizer.encode_continued([p for i, p in enumerate(pieces) if i in continued]))
    encoded = iter([next(joined) if i in continued else next(plain) for i in range(len(pieces))])
    ids: list[int] = []
    mask: list[bool] = []
    spans: list[tuple[int, int]] = []
    for k, seg in enumerate(segments):
        seg_ids = [i for p in seg for i in ([p] if isinstance(p, int) else next(encoded))]
        trained = k % 2 == 1  # segments alternate: context, generation, context, ...
        if trained:
            spans.append((len(ids), len(ids) + len(seg_ids)))
        ids += seg_ids
        mask += [trained] * len(seg_ids)
    return ChatEncoding(ids, mask, spans)


def fit_chat(tokenizer, messages: list[dict], max_len: int, *, document: str | None = None,
             add_generation_prompt: bool = False,
             template: str | None = None) -> tuple[ChatEncoding, int, bool] | None:
    """`encode_chat` within `max_len` tokens: (encoding, messages dropped, document shortened),
    or None when even the last exchange cannot fit. Used for training examples and for chat
    prompts alike, so both shorten a conversation the same way: whole exchanges go from the
    front (system prompt kept, the rest still starts with a user turn), then the end of the
    document; the last user turn (and its answer) is never cut."""
    def encode(msgs, doc):
        return encode_chat(tokenizer, msgs, document=doc, add_generation_prompt=add_generation_prompt,
                           template=template)

    enc = encode(messages, document)
    if len(enc.ids) <= max_len:  # the common case: one encode
        return enc, 0, False
    n_system = 0
    while n_system < len(messages) and messages[n_system]["role"] == "system":
        n_system += 1
    head, turns = messages[:n_system], messages[n_system:]
    starts = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
    # Length shrinks as exchanges go, so binary-search the fewest to drop (log n encodes).
    k = _first_true(len(starts), lambda k: len(encode(head + turns[starts[k]:], document).ids) <= max_len)
    if k < len(starts):
        return encode(head + turns[starts[k]:], document), starts[k], False
    last = head + turns[starts[-1]:] if starts else messages
    dropped = starts[-1] if starts else 0
    if document:
        # Keep the document's longest prefix that fits (at least one character, so the
        # template still shows that there was one); the whole of it is known to be too long.
        cut = _first_true(len(document), lambda n: len(encode(last, document[:n]).ids) > max_len) - 1
        if cut >= 1:
            return encode(last, document[:cut]), dropped, True
    return None


def _first_true(n: int, pred) -> int:
    """Smallest k in [0, n) with pred(k) true, for pred false...false true...true; n if none."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def stop_tokens(tokenizer) -> tuple[str, ...]:
    """The texts of the tokens that end an answer: EOS, ChatML's <|im_end|> when the vocabulary
    has it, and a released model's other end tokens (`Tokenizer.end_tokens`: Llama 3's
    <|eot_id|>)."""
    candidates = (tokenizer.special_tokens["eos"], tokenizer.special_tokens.get("im_end", SPECIAL_TOKENS["im_end"]),
                  *getattr(tokenizer, "end_tokens", ()))
    return tuple(t for t in dict.fromkeys(candidates) if tokenizer.token_to_id(t) is not None)


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids of `stop_tokens`, EOS first."""
    return tuple(tokenizer.token_to_id(t) for t in stop_tokens(tokenizer))
