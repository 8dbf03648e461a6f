"""Tokenizers: train a byte-level BPE, or load tokenizer.json / SentencePiece models, behind one
`Tokenizer` class with special tokens addressed by role (see docs/CONTRACTS.md)."""

from babyllama.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer
from babyllama.tokenizer.train import DEFAULT_PRETOKENIZER, PRETOKENIZERS, train_tokenizer

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "train_tokenizer", "PRETOKENIZERS", "DEFAULT_PRETOKENIZER"]
