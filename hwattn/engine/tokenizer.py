"""The tokenizer names the engine and server use, kept importable from here; they live in
`hwattn.data.tokenizer`, one wrapper for training, evaluation and serving."""

from hwattn.data.tokenizer import (CHAT_ROLES, EOS_NAMES, ByteTokenizer, IncrementalDetokenizer,
                                   StreamDetokenizer, Tokenizer, chat_prompt,
                                   incremental_detokenizer, load_tokenizer)

__all__ = ["CHAT_ROLES", "EOS_NAMES", "ByteTokenizer", "IncrementalDetokenizer",
           "StreamDetokenizer", "Tokenizer", "chat_prompt", "incremental_detokenizer",
           "load_tokenizer"]
