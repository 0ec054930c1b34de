"""CLIP tokenization with the `tokenizers` library, padded and truncated as diffusers does
(``tokenizer(prompt, padding="max_length", max_length=77, truncation=True)``), and the pieces that
prompt syntaxes (runtime/prompts.py) build their 77-token chunks from."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


class PromptTruncatedWarning(UserWarning):
    pass


class ClipTokenizer:
    def __init__(self, path: str | Path, max_length: int, pad_token_id: int, eos_token_id: int,
                 bos_token_id: int | None = None):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_length, self.pad_id, self.eos_id = max_length, pad_token_id, eos_token_id
        self.bos_id = self._tok.token_to_id("<|startoftext|>") if bos_token_id is None else bos_token_id

    @classmethod
    def from_manifest(cls, model_dir: Path, rec: dict) -> "ClipTokenizer":
        from .errors import ModelDirError

        path = Path(model_dir) / rec["file"]
        if not path.is_file():
            raise ModelDirError(f"{path} is missing; re-export the model with `sdrt export --overwrite`")
        missing = [k for k in ("pad_token_id", "eos_token_id") if k not in rec]
        if missing:
            raise ModelDirError(f"{Path(model_dir) / 'sdrt.json'}: the tokenizer record of {rec['file']} has no "
                                f"{' or '.join(missing)}; re-export the model with `sdrt export --overwrite`")
        try:
            return cls(path, rec["max_length"], rec["pad_token_id"], rec["eos_token_id"], rec.get("bos_token_id"))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ModelDirError(f"{path} is damaged: the tokenizers library cannot read it ({e}); "
                                "re-export the model with `sdrt export --overwrite`") from e

    def __call__(self, prompts: list[str], warn: bool = True) -> np.ndarray:
        """(B, max_length) int32 ids: BOS, tokens, EOS, then padding; over-long prompts keep their
        first max_length - 2 tokens (as transformers' truncation does) and, with ``warn``, warn."""
        keep = self.max_length - 2
        rows = []
        for ids in self.tokens(prompts):
            if len(ids) > keep and warn:
                warnings.warn(
                    f"prompt is {len(ids)} tokens long, the text encoder takes {keep}; "
                    f"the last {len(ids) - keep} were dropped: {self._tok.decode(ids[keep:])!r}",
                    PromptTruncatedWarning,
                    stacklevel=3,
                )
            rows.append(self.chunk(ids[:keep]))
        return np.stack(rows)

    def tokens(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, without BOS and EOS and untruncated."""
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def chunk(self, ids: list[int]) -> np.ndarray:
        """(max_length,) int32: BOS, ``ids`` (at most max_length - 2), EOS, padding."""
        row = np.full(self.max_length, self.pad_id, dtype=np.int32)
        row[: len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        return row

    def token_strings(self, ids: list[int]) -> list[str]:
        """The vocabulary entries of ``ids`` (``"cat</w>"``), as transformers' convert_ids_to_tokens."""
        return [self._tok.id_to_token(i) for i in ids]

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
