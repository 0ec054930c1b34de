"""CLIP tokenization with the `tokenizers` library, padded and truncated as diffusers does
(``tokenizer(prompt, padding="max_length", max_length=77, truncation=True)``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


class PromptTruncatedWarning(UserWarning):
    pass


class ClipTokenizer:
    def __init__(self, path: str | Path, max_length: int, pad_token_id: int, eos_token_id: int):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_length, self.pad_id, self.eos_id = max_length, pad_token_id, eos_token_id

    @classmethod
    def from_manifest(cls, model_dir: Path, rec: dict) -> "ClipTokenizer":
        path = Path(model_dir) / rec["file"]
        if not path.is_file():
            from .manifest import ModelDirError

            raise ModelDirError(f"{path} is missing; re-export the model with `sdrt export --overwrite`")
        return cls(path, rec["max_length"], rec["pad_token_id"], rec["eos_token_id"])

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """(B, max_length) int32 ids: BOS, tokens, EOS, then padding; over-long prompts keep their
        first max_length - 2 tokens (as transformers' truncation does) and warn."""
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        for row, enc in enumerate(self._tok.encode_batch(list(prompts))):
            ids = enc.ids
            if len(ids) > self.max_length:
                dropped = len(ids) - self.max_length
                warnings.warn(
                    f"prompt is {len(ids) - 2} tokens long, the text encoder takes {self.max_length - 2}; "
                    f"the last {dropped} were dropped: {self._tok.decode(ids[self.max_length - 1 : -1])!r}",
                    PromptTruncatedWarning,
                    stacklevel=3,
                )
                ids = ids[: self.max_length - 1] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out
