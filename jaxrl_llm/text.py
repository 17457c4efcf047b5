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


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts with their trailing space moved to the action (see module doc)."""
    return [tokenizer(split_space(p)[0], add_special_tokens=False).input_ids for p in prompts]


def encode_actions(tokenizer, prompts: Sequence[str], actions: Sequence[str],
                   eos: bool = True) -> list[list[int]]:
    """Token ids of each action as the continuation of its prompt (+ EOS, the stop token)."""
    ids = [tokenizer(split_space(p)[1] + a, add_special_tokens=False).input_ids
           for p, a in zip(prompts, actions, strict=True)]
    return [i + [tokenizer.eos_token_id] for i in ids] if eos else ids


def decode_actions(tokenizer, tokens, lengths) -> list[str]:
    """Generated ids `[B, N]` with lengths `[B]` -> action strings (stop tokens dropped)."""
    return [tokenizer.decode(list(row[:n]), skip_special_tokens=True).strip()
            for row, n in zip(tokens, lengths)]
