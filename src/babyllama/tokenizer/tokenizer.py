"""One `Tokenizer` class over two backends: HF `tokenizers` (our trained byte-level BPE, or any
`tokenizer.json`) and SentencePiece `.model` files (ChatGLM, Chinese-LLaMA: the tokenizers the
seeds reuse).

The rest of the package sees only this class, so it never needs to know which backend is in
use. Special tokens are looked up by role (`bos`, `eos`, `pad`, ...) and their ids are always
read from the tokenizer: ChatGLM3's tokenizer, for one, has no pad at id 0, and code that assumes one trains on garbage.

Rule for loaded tokenizers: their own ids are kept; any of our special tokens they lack is
appended after their last id (the unk role is the exception: a byte-level tokenizer has no
use for one, so `unk_id` may be None).

Control tokens (`<s>`, `</s>`, `<|im_end|>`, ...) come only from our own code -- BOS/EOS
wrapping and chat templates -- never from text: `encode` treats text that merely spells one as
ordinary characters, so a corpus that writes `<s>` for strike-through keeps it as text, a user
cannot close their own chat turn by typing `<|im_end|>`, and every string round-trips.
(transformers, like `tokenizers` by default, matches special tokens anywhere in the input:
huggingface/transformers#29279, huggingface/tokenizers#1850.) Text our own code builds with
control tokens in it is encoded with `parse_special=True`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from babyllama.atomic import atomic_write_bytes
from babyllama.errors import UserError
from babyllama.textfile import read_json_object, read_text

# Role -> token string. Order matters: a trained tokenizer reserves these at ids 0..k-1 in
# this order, so bos=0, eos=1, pad=2, unk=3. The `<|reserved_N|>` slots let later features
# add tokens without shifting ids of an already trained model.
SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<s>",
    "eos": "</s>",
    "pad": "<pad>",
    "unk": "<unk>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "image": "<|image|>",
    **{f"reserved_{i}": f"<|reserved_{i}|>" for i in range(6)},
}

HF_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
# What `encode_continued` puts before a text to encode it as text that follows other text.
_CONTINUE_AFTER = "\n"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"  # written by transformers
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer transformers keep the template here

# Roles whose names transformers' configs spell `<role>_token`.
_HF_NAMED_ROLES = ("bos", "eos", "pad", "unk")


# ----------------------------------------------------------------------------------------
# Backends: the minimal surface `Tokenizer` needs from each library.


class HFBackend:
    """HF `tokenizers.Tokenizer`. Special tokens are registered as *special added tokens*, so
    `decode(skip_special_tokens=True)` drops them; `encode_special_tokens` makes the encoder
    treat their text as ordinary text (it is a runtime flag: tokenizer.json does not store it)."""

    kind = "hf-bpe"
    file_name = HF_FILE

    def __init__(self, tk):
        self.tk = tk
        tk.encode_special_tokens = True
        # encode_batch_fast (tokenizers >= 0.20) skips offset tracking we never use.
        self._batch = getattr(tk, "encode_batch_fast", tk.encode_batch)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def register_special(self, tokens: Sequence[str]) -> None:
        """Existing tokens keep their ids (and become special); missing ones are appended."""
        from tokenizers import AddedToken

        self.tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])

    def added_tokens(self) -> list[dict]:
        return [
            {"id": i, "content": t.content, "special": t.special}
            for i, t in sorted(self.tk.get_added_tokens_decoder().items())
        ]

    def control_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}

    # add_special_tokens=False everywhere: a loaded tokenizer.json may carry a post-processor
    # that adds bos itself; `Tokenizer.encode(add_bos=...)` is the one place that decides.
    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_file(self, path: Path) -> None:
        atomic_write_bytes(path, self.tk.to_str(pretty=True).encode("utf-8"))


class SentencePieceBackend:
    """A SentencePiece model plus special tokens appended after its last piece.

    SentencePiece cannot learn new pieces after training, so the appended specials live here,
    and `decode` puts their text back (or skips it). `encode` sees text only: SentencePiece
    never matches a control piece (`<s>`, `</s>`) from text, and the appended ones are
    inserted by `Tokenizer` itself (`parse_special=True`), between separately encoded pieces
    as transformers' LlamaTokenizer does. One consequence worth knowing: each piece between
    specials is encoded on its own, so models with a dummy-prefix normalizer (Llama) see
    "▁user" after `<|im_start|>`.
    """

    kind = "sentencepiece"
    file_name = SP_FILE

    def __init__(self, sp):
        self.sp = sp
        self.base_size = sp.get_piece_size()
        self.appended: list[str] = []  # ids base_size, base_size + 1, ...
        self.special_ids: dict[int, str] = {}

    @property
    def vocab_size(self) -> int:
        return self.base_size + len(self.appended)

    def token_to_id(self, token: str) -> int | None:
        if token in self.appended:
            return self.base_size + self.appended.index(token)
        i = self.sp.piece_to_id(token)  # returns unk_id for unknown pieces: check it
        return i if 0 <= i < self.base_size and self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str | None:
        if 0 <= i < self.base_size:
            return self.sp.id_to_piece(i)
        if 0 <= i - self.base_size < len(self.appended):
            return self.appended[i - self.base_size]
        return None

    def register_special(self, tokens: Sequence[str]) -> None:
        for t in tokens:
            if self.token_to_id(t) is None:
                self.appended.append(t)
            self.special_ids[self.token_to_id(t)] = t

    def added_tokens(self) -> list[dict]:
        return [
            {"id": self.base_size + k, "content": t, "special": True}
            for k, t in enumerate(self.appended)
        ]

    def control_tokens(self) -> dict[str, int]:
        return {t: i for i, t in self.special_ids.items()}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One SentencePiece batch call: it runs the texts on several threads.
        return self.sp.encode(texts) if texts else []

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self.special_ids[i])
            else:
                run.append(i)
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    def save_file(self, path: Path) -> None:
        atomic_write_bytes(path, self.sp.serialized_model_proto())


# ----------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> ids, with special tokens addressed by role. See docs/CONTRACTS.md."""

    def __init__(self, backend, special_tokens: dict[str, str], chat_template: str | None = None,
                 pretokenizer: str | None = None, fixed_vocab: bool = False):
        """Use `Tokenizer.load` or `train_tokenizer`; this registers `special_tokens` (role ->
        token string) on `backend`, appending the ones it lacks. `fixed_vocab`: the tokenizer
        of a released model, whose embedding table has no rows for new tokens (`load`)."""
        self._backend = backend
        self.fixed_vocab = fixed_vocab
        # Tokens besides EOS (and <|im_end|>) that end an answer: a released model's
        # generation_config.json eos ids, as Llama 3's <|eot_id|> (set by `babyllama import`).
        self.end_tokens: list[str] = []
        backend.register_special(list(dict.fromkeys(special_tokens.values())))
        self.special_tokens: dict[str, str] = dict(special_tokens)
        self.special_token_ids: dict[str, int] = {
            role: backend.token_to_id(tok) for role, tok in special_tokens.items()
        }
        self.chat_template = chat_template
        self.pretokenizer = pretokenizer  # name used by train_tokenizer, None when loaded
        self._prefix_ids: list[int] | None = None  # encode_continued's, computed on first use
        self._adds_prefix = False
        # Text -> id of every control token: the roles' tokens and any other special token a
        # loaded tokenizer.json declares (Qwen's <|endoftext|>, ...). Longest first, so a
        # token that prefixes another cannot win.
        self.control_tokens: dict[str, int] = backend.control_tokens()
        alternatives = sorted(self.control_tokens, key=len, reverse=True)
        self.control_pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    # -- ids ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self._backend.kind

    @property
    def backend(self):
        """The wrapped `tokenizers.Tokenizer` or `sentencepiece.SentencePieceProcessor`."""
        return self._backend.tk if self.kind == "hf-bpe" else self._backend.sp

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def added_tokens(self) -> list[dict]:
        """The special tokens registered on the wrapped model, as transformers lists them
        ([{"id", "content", "special"}]); for SentencePiece, those appended after its last
        piece (`backend.get_piece_size()` onwards), in id order."""
        return self._backend.added_tokens()

    @property
    def bos_id(self) -> int:
        return self.special_token_ids["bos"]

    @property
    def eos_id(self) -> int:
        return self.special_token_ids["eos"]

    @property
    def pad_id(self) -> int:
        return self.special_token_ids["pad"]

    @property
    def unk_id(self) -> int | None:
        return self.special_token_ids.get("unk")

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(i)

    # -- text --------------------------------------------------------------------------
    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               parse_special: bool = False) -> list[int]:
        """Token ids of `text`, with BOS/EOS around it if asked.

        Text that spells a control token (`</s>`, `<|im_end|>`) is encoded as the characters it
        is, unless `parse_special` is true: then each control token's text becomes its id. Use
        that only for text our own code builds (a rendered template), never for corpus or user
        text (see the module docstring)."""
        return self.encode_batch([text], add_bos, add_eos, parse_special)[0]

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False, add_eos: bool = False,
                     parse_special: bool = False) -> list[list[int]]:
        """`encode` of each text, in one backend call."""
        texts = list(texts)
        if not parse_special or self.control_pattern is None:
            return [self._wrap(ids, add_bos, add_eos) for ids in self._backend.encode_batch(texts)]
        pieces = [self.split_controls(t) for t in texts]
        plain = iter(self._backend.encode_batch([p for ps in pieces for p in ps if isinstance(p, str)]))
        return [self._wrap([i for p in ps for i in ([p] if isinstance(p, int) else next(plain))],
                           add_bos, add_eos) for ps in pieces]

    def encode_continued(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text where it continues other text rather than starting one:
        without the "▁" a SentencePiece model with a dummy prefix (Llama's, Baichuan's; also a
        tokenizer.json whose normalizer prepends one) puts in front of every string it encodes.
        `encode_chat` uses it where an answer follows its prompt's text. Each text is encoded
        after a newline whose ids are then dropped (transformers' LlamaTokenizer does the same
        with its unk token when legacy=False); a text whose ids do not split cleanly there, or
        any text of a tokenizer that adds no such prefix, is encoded as `encode_batch` does."""
        if not texts:
            return []
        if self._prefix_ids is None:
            self._prefix_ids = self._backend.encode(_CONTINUE_AFTER)
            probe = self._backend.encode(_CONTINUE_AFTER + "x")
            self._adds_prefix = probe[len(self._prefix_ids):] != self._backend.encode("x")
        if not self._adds_prefix:
            return self._backend.encode_batch(texts)
        head = self._prefix_ids
        joined = self._backend.encode_batch([_CONTINUE_AFTER + t for t in texts])
        return [ids[len(head):] if ids[:len(head)] == head else self._backend.encode(t)
                for t, ids in zip(texts, joined)]

    def split_controls(self, text: str, spans: Iterable[tuple[int, int]] | None = None) -> list[str | int]:
        """`text` as a list of plain-text pieces (str) and control token ids (int).

        `spans`: the [start, end) character ranges of `text` that are control tokens; None
        means every occurrence of a control token's text."""
        if spans is None:
            spans = [m.span() for m in self.control_pattern.finditer(text)] if self.control_pattern else []
        out: list[str | int] = []
        at = 0
        for start, end in spans:
            if start > at:
                out.append(text[at:start])
            out.append(self.control_tokens[text[start:end]])
            at = end
        if at < len(text):
            out.append(text[at:])
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Never raises on a prefix of valid ids (streaming): an incomplete UTF-8 sequence at
        the end decodes to U+FFFD until the rest of its bytes arrive."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (size {n})")
        return self._backend.decode(ids, skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, unk={self.unk_id})")

    # -- files -------------------------------------------------------------------------
    def config(self) -> dict:
        """Contents of tokenizer_config.json. `*_token` and `chat_template` use transformers'
        key names so export can copy them."""
        cfg: dict = {"kind": self.kind}
        if self.kind == "hf-bpe":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        for role in _HF_NAMED_ROLES:
            cfg[f"{role}_token"] = self.special_tokens.get(role)
        cfg["special_tokens"] = dict(self.special_tokens)
        cfg["special_token_ids"] = dict(self.special_token_ids)
        cfg["added_tokens"] = self._backend.added_tokens()
        cfg["chat_template"] = self.chat_template
        if self.pretokenizer:
            cfg["pretokenizer"] = self.pretokenizer
        if self.fixed_vocab:
            cfg["fixed_vocab"] = True
        if self.end_tokens:
            cfg["end_tokens"] = list(self.end_tokens)
        return cfg

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json or tokenizer.model, plus tokenizer_config.json."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._backend.save_file(d / self._backend.file_name)
        text = json.dumps(self.config(), ensure_ascii=False, indent=2) + "\n"
        atomic_write_bytes(d / CONFIG_FILE, text.encode("utf-8"))
        return d

    @classmethod
    def load(cls, path: str | os.PathLike, fixed_vocab: bool = False) -> "Tokenizer":
        """Load a directory written by `save`, a directory holding tokenizer.json or
        tokenizer.model (with optional transformers configs), or one of those files.

        `fixed_vocab` (also read back from a saved tokenizer_config.json): a released model's
        tokenizer, whose vocabulary must not grow (its embeddings have no row for a new token).
        Roles whose token it lacks are then left out rather than appended (`<|image|>`,
        `<|reserved_0|>`, ...); a missing pad becomes the EOS token (what transformers users
        pad with); a missing BOS or EOS is a UserError."""
        return _load(Path(path), fixed_vocab)


def sentencepiece_proto(tokenizer: Tokenizer):
    """The ModelProto of a SentencePiece tokenizer: its pieces with types and scores, and the
    trainer and normalizer specs the processor does not expose (needed to convert, export or
    trim it)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.backend.serialized_model_proto())
    return proto


# ----------------------------------------------------------------------------------------
# Loading


def _load(path: Path, fixed_vocab: bool = False) -> Tokenizer:
    if not path.exists():
        raise UserError(f"{path}: no such file or directory (expected a tokenizer directory, "
                        f"a {HF_FILE} or a SentencePiece .model file)")
    if path.is_dir():
        directory = path
        names = (HF_FILE, SP_FILE)
        if (path / SP_FILE).is_file() and _read_configs(path).get("kind") == "sentencepiece":
            names = (SP_FILE,)  # a transformers export carrying both: SentencePiece is exact
        file = next((path / n for n in names if (path / n).is_file()), None)
        if file is None:
            raise UserError(f"{path}: directory holds neither {HF_FILE} nor {SP_FILE}")
    else:
        file = path
        # Sibling configs belong to the file only under the standard names (HF layout).
        directory = path.parent if path.name in (HF_FILE, SP_FILE) else None

    backend = _open_hf(file) if file.suffix == ".json" else _open_sentencepiece(file)
    cfg = _read_configs(directory) if directory else {}
    if directory and "bos_token" not in cfg and "special_tokens" not in cfg:
        _model_bos(backend, cfg, directory)
    if cfg.get("kind") in ("hf-bpe", "sentencepiece") and cfg["kind"] != backend.kind:
        raise UserError(f"{directory / CONFIG_FILE}: says kind {cfg['kind']!r} "
                        f"but {file.name} is {backend.kind!r}")
    if backend.kind == "sentencepiece":
        _restore_appended(backend, cfg, directory)
    fixed_vocab = fixed_vocab or cfg.get("fixed_vocab") is True
    tok = Tokenizer(backend, _resolve_special_tokens(backend, cfg, fixed_vocab, path),
                    chat_template=cfg.get("chat_template"), fixed_vocab=fixed_vocab)
    ends = cfg.get("end_tokens")
    if not isinstance(ends, list) and fixed_vocab and directory is not None:
        ends = _model_end_tokens(tok, directory)
    tok.end_tokens = [t for t in ends if isinstance(t, str) and tok.token_to_id(t) is not None] \
        if isinstance(ends, list) else []
    _check_saved_ids(tok, cfg, directory)
    return tok


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _open_hf(file: Path) -> HFBackend:
    from tokenizers import Tokenizer as HFTokenizer

    text = read_text(file)  # from_file would refuse a BOM
    try:
        return HFBackend(HFTokenizer.from_str(text))
    except Exception as e:  # tokenizers raises plain Exception with a serde message
        raise UserError(f"{file}: not a tokenizers tokenizer.json ({_first_line(e)})") from None


def _open_sentencepiece(file: Path) -> SentencePieceBackend:
    import sentencepiece as spm

    try:
        return SentencePieceBackend(spm.SentencePieceProcessor(model_file=str(file)))
    except Exception as e:
        raise UserError(f"{file}: not a SentencePiece model ({_first_line(e)})") from None


def _token_name(value) -> str | None:
    """transformers writes special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_configs(directory: Path) -> dict:
    """Our tokenizer_config.json, or transformers' tokenizer_config.json +
    special_tokens_map.json (the latter wins, as in transformers) + chat_template.jinja."""
    cfg: dict = {}
    for name in (CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
        if (directory / name).is_file():
            data = read_json_object(directory / name, "tokenizer config")
            cfg.update({k: v for k, v in data.items() if v is not None})
    template = cfg.get("chat_template")
    if isinstance(template, list):  # transformers' named-templates form
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        # transformers 5 reads this file first when both are there: the same template here.
        template = read_text(directory / CHAT_TEMPLATE_FILE)
    if template is not None and not isinstance(template, str):
        raise UserError(f"{directory / CONFIG_FILE}: chat_template is {type(template).__name__}, "
                        "not the template's text")
    cfg["chat_template"] = template
    return cfg


def _model_bos(backend, cfg: dict, directory: Path) -> None:
    """A released model's tokenizer_config.json may name no BOS (Qwen2's is null: its
    documents are separated by <|endoftext|>); the model's config.json then says which token
    starts a text (`bos_token_id`), and that one is used rather than appending our `<s>`,
    a token the model never saw."""
    model_config = directory / "config.json"
    if not model_config.is_file():
        return
    bos_id = read_json_object(model_config, "config.json").get("bos_token_id")
    if isinstance(bos_id, int) and 0 <= bos_id < backend.vocab_size and backend.id_to_token(bos_id):
        cfg["bos_token"] = backend.id_to_token(bos_id)


def _model_end_tokens(tok: "Tokenizer", directory: Path) -> list[str]:
    """A released model's tokens besides EOS that end a turn: the other ids of its
    generation_config.json's (or config.json's) `eos_token_id` list (Llama 3 Instruct:
    <|eot_id|> beside <|end_of_text|>), which transformers' `generate` stops at."""
    ids: list = []
    for name in ("generation_config.json", "config.json"):
        if (directory / name).is_file():
            value = read_json_object(directory / name, name).get("eos_token_id")
            ids += value if isinstance(value, list) else [value]
    tokens = [tok.id_to_token(i) for i in ids if isinstance(i, int) and not isinstance(i, bool)
              and 0 <= i < tok.vocab_size]
    return [t for t in dict.fromkeys(tokens) if t and t != tok.special_tokens.get("eos")]


def _resolve_special_tokens(backend, cfg: dict, fixed_vocab: bool = False,
                            source: Path | None = None) -> dict[str, str]:
    """Role -> token string. Priority: a SentencePiece model's own bos/eos/unk pieces, then
    names from the config (ours or transformers'), then our defaults (appended if absent,
    unless `fixed_vocab`: see `Tokenizer.load`)."""
    saved = cfg.get("special_tokens") if isinstance(cfg.get("special_tokens"), dict) else {}
    own = {}
    if backend.kind == "sentencepiece":
        sp = backend.sp
        own = {r: sp.id_to_piece(i) for r, i in
               (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()),
                ("unk", sp.unk_id())) if i >= 0}
    tokens: dict[str, str] = {}
    for role in dict.fromkeys([*SPECIAL_TOKENS, *saved]):
        name = (own.get(role) or _token_name(saved.get(role))
                or _token_name(cfg.get(f"{role}_token")) or SPECIAL_TOKENS.get(role))
        # A tokenizer without unk (byte-level BPE) gets none: nothing could ever produce it.
        if role == "unk" and backend.token_to_id(name) is None:
            continue
        if fixed_vocab and (not name or backend.token_to_id(name) is None):
            if role in ("bos", "eos"):
                raise UserError(f"{source}: the tokenizer has no {role.upper()} token ({name!r} is not in "
                                f"its vocabulary); name one as {role}_token in tokenizer_config.json")
            if role == "pad":
                tokens["pad"] = tokens["eos"]
            continue
        if name:
            tokens[role] = name
    return tokens


def _restore_appended(backend: SentencePieceBackend, cfg: dict, directory: Path | None) -> None:
    """Re-append a saved SentencePiece tokenizer's extra tokens in their saved id order, so
    ids survive save/load even if SPECIAL_TOKENS grows in a later version."""
    added = sorted((a for a in cfg.get("added_tokens") or [] if isinstance(a, dict)),
                   key=lambda a: a.get("id", -1))
    for a in added:
        if a.get("id") != backend.vocab_size or not isinstance(a.get("content"), str):
            raise UserError(f"{directory / CONFIG_FILE}: added token {a!r} does not follow "
                            f"the model's {backend.vocab_size} ids")
        backend.appended.append(a["content"])


def _check_saved_ids(tok: Tokenizer, cfg: dict, directory: Path | None) -> None:
    saved = cfg.get("special_token_ids")
    if not isinstance(saved, dict):
        return
    for role, i in saved.items():
        if tok.special_token_ids.get(role) != i:
            raise UserError(f"{directory / CONFIG_FILE}: special token {role!r} has id {i} "
                            f"there but {tok.special_token_ids.get(role)} in the tokenizer file")
