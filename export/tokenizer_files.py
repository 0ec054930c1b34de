"""The tokenizer files a Hub checkpoint has beside tokenizer.json, in the classic format.

transformers 5 saves a CLIP tokenizer as tokenizer.json and a short tokenizer_config.json only;
the slow ``CLIPTokenizer`` of transformers 4 (what optimum-onnx, pinned to transformers < 4.58,
and diffusers' model_index ``["transformers", "CLIPTokenizer"]`` load) reads vocab.json and
merges.txt instead, and expects the tokenizer_config.json and special_tokens_map.json that
openai/clip-vit-large-patch14 ships. These are written here from tokenizer.json's BPE model, so
they encode exactly as it does, whichever transformers version is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

CLASSIC_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_classic_files(tokenizer_json: Path, dest: Path, *, bos_token: str, eos_token: str, unk_token: str,
                        pad_token: str, model_max_length: int = 77) -> None:
    """vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json in ``dest``, for the
    CLIP BPE tokenizer ``tokenizer_json`` (the `tokenizers` library's file) with these special tokens."""
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_json}: a {model.get('type')} tokenizer, not CLIP's BPE")
    vocab = dict(model["vocab"])
    for tok in spec.get("added_tokens", []):
        vocab.setdefault(tok["content"], tok["id"])
    # tokenizers writes merges as "a b" strings (before 0.20) or [a, b] pairs
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False),
                                     encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": _added_token(bos_token), "eos_token": _added_token(eos_token),
               "pad_token": pad_token, "unk_token": _added_token(unk_token)}
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    decoder = {str(vocab[t]): dict(_added_token(t), special=True)
               for t in dict.fromkeys((bos_token, eos_token, unk_token, pad_token)) if t in vocab}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
        "bos_token": bos_token,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": int(model_max_length),
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": unk_token,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
