"""Tokenizer of an HF checkpoint directory (`tokenizer.json`), with explicit pad and EOS.

Special-token ids are resolved once, from `generation_config.json`, `config.json` and
`tokenizer_config.json` in that order of precedence, so the sampler's stop set and the
pad id used for batching are visible fields rather than library defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` with the ids the RL loop needs.

    eos_ids: every id that ends a response (Qwen instruct models stop on two).
    pad_id: fills prompts (left) and responses (right); masked out everywhere.
    """

    backend: Any  # tokenizers.Tokenizer
    eos_ids: tuple[int, ...]
    pad_id: int
    bos_id: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added by a post-processor."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def pad_prompts(
        self, prompts: Sequence[Sequence[int]], length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Left-pads token lists to `length` → tokens [B, length] int32, mask [B, length] bool.

        Raises on a prompt longer than `length`: cutting it silently would change the task.
        """
        tokens = np.full((len(prompts), length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), length), bool)
        for i, ids in enumerate(prompts):
            if len(ids) > length:
                raise ValueError(f"prompt {i} has {len(ids)} tokens, max_prompt_len is {length}")
            if ids:
                tokens[i, length - len(ids) :] = ids
                mask[i, length - len(ids) :] = True
        return tokens, mask


def load_tokenizer(path: str | os.PathLike, *, pad_token: str | None = None) -> Tokenizer:
    """The tokenizer of an HF checkpoint directory. The pad id is `pad_token` if given,
    else the checkpoint's pad token, else its first EOS id (safe: pads are always masked)."""
    from tokenizers import Tokenizer as Backend

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json in {path!r}")
    backend = Backend.from_file(file)
    tok_cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    model_cfg = _read_json(os.path.join(path, "config.json"))
    gen_cfg = _read_json(os.path.join(path, "generation_config.json"))

    def token_id(token: Any) -> int | None:
        if isinstance(token, dict):  # older tokenizer_config.json: {"content": ..., ...}
            token = token.get("content")
        return None if token is None else backend.token_to_id(token)

    eos = _ids(gen_cfg.get("eos_token_id")) or _ids(model_cfg.get("eos_token_id"))
    if not eos and token_id(tok_cfg.get("eos_token")) is not None:
        eos = (token_id(tok_cfg["eos_token"]),)
    if not eos:
        raise ValueError(f"no EOS token id found in the config files of {path!r}")
    pad = token_id(pad_token or tok_cfg.get("pad_token"))
    if pad_token is not None and pad is None:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary")
    bos = _ids(gen_cfg.get("bos_token_id")) or _ids(model_cfg.get("bos_token_id"))
    return Tokenizer(
        backend=backend,
        eos_ids=eos,
        pad_id=eos[0] if pad is None else pad,
        bos_id=bos[0] if bos else None,
    )
