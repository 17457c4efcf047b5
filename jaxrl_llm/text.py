"""The one place where agent text meets token ids.

Prompts of notebook 000 end in "Action: " with a trailing space. BPE tokenizers merge a space into
the *next* word (" look" is one token), so tokenizing the prompt and the action separately would
leave a lone space token followed by an unnatural "look". We therefore move that space from the
prompt to the action: the text is identical, the split is the natural one, and training, scoring
and sampling all use this same split.
"""

from __future__ import annotations

from typing import Sequence


def split_space(prompt: str) -> tuple[str, str]:
    """`prompt` -> (prompt without its trailing space, the prefix every action then needs)."""
    return (prompt[:-1], " ") if prompt.endswith(" ") else (prompt, "")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_pieces(tokenizer, pieces: Sequence[str]) -> list[int]:
    """Concatenated token ids of separately tokenized pieces (`envs.textworld.prompt_pieces`).

    Tokenizing piece by piece is what makes multi-turn prefill exact: the ids of a history never
    change when a step is appended.
    """
    return [i for piece in pieces for i in encode(tokenizer, piece)]


def encode_tail(tokenizer, tail: str) -> list[int]:
    """Ids of the per-step tail, its trailing space moved to the action (module doc)."""
    return encode(tokenizer, split_space(tail)[0])


def encode_prompt(tokenizer, pieces: Sequence[str], tail: str) -> list[int]:
    """Ids of a whole prompt: history pieces + tail, exactly as the agent feeds them."""
    return encode_pieces(tokenizer, pieces) + encode_tail(tokenizer, tail)


def encode_action(tokenizer, tail: str, action: str) -> list[int]:
    """Ids of an action as the continuation of a prompt ending in `tail`, + EOS (the stop)."""
    return encode(tokenizer, split_space(tail)[1] + action) + [tokenizer.eos_token_id]


def decode_actions(tokenizer, tokens, lengths) -> list[str]:
    """Generated ids `[B, N]` with lengths `[B]` -> action strings (stop tokens dropped)."""
    return [tokenizer.decode(list(row[:n]), skip_special_tokens=True).strip()
            for row, n in zip(tokens, lengths)]


class ByteTokenizer:
    """A byte-level tokenizer (256 bytes + EOS) for tiny random models: smoke runs and tests."""

    vocab_size = 257
    eos_token_id = 256
    name_or_path = "bytes"

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False):
        class Encoded:
            input_ids = list(text.encode())
        return Encoded()

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids if i < 256).decode(errors="replace")

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r) for r in rows]
