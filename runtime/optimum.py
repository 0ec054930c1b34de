"""Model directories in optimum's ONNX layout (``optimum-cli export onnx --task text-to-image``), read
without an sdrt.json: the manifest is derived from model_index.json, each component's config.json, the
scheduler config and the graphs' own inputs and outputs (read with ONNX Runtime: no `onnx` package).

Such a directory is never written to. Its derived manifest, the tokenizer.json that the `tokenizers`
library needs (optimum writes vocab.json and merges.txt only) and ONNX Runtime's optimized graphs live
in the user's cache, ``$XDG_CACHE_HOME/sdrt/imported/<key>/`` (default ~/.cache), beside links to the
directory's own folders; the key changes when any of its files does. ``import_model`` writes a full
sdrt model directory from one instead (``sdrt import DIR --out DIR``).

Where optimum's graphs differ from sdrt's, the manifest's records say so and the runtime follows them:
token ids int64, no attention mask, a scalar timestep, the text encoders' outputs by name
(``last_hidden_state``; SDXL's ``hidden_states.{N-1}``, the penultimate layer's, and ``text_embeds``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import ModelDirError
from .families import FAMILIES
from .files import replace_dir
from .manifest import FORMAT_VERSION, INPAINTING, MANIFEST_NAME, TEXT_TO_IMAGE, check_manifest

INDEX_NAME = "model_index.json"
# diffusers pipeline classes (model_index _class_name) -> family; sd1 and sd2 are told apart by the text tower
_PIPELINES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd", "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32"}
# sdrt's names for the dynamic dimensions, by component and tensor position
_DIMS = {
    "text_encoder": ["batch", None], "unet": ["batch", None, "latent_height", "latent_width"],
    "vae_decoder": ["batch", None, "height", "width"], "vae_encoder": ["batch", None, "latent_height", "latent_width"],
}
_REIMPORT = "export it again with `optimum-cli export onnx --task text-to-image`"


def is_optimum_dir(path: Path) -> bool:
    """A directory in optimum's ONNX layout: model_index.json and unet/model.onnx, no sdrt.json."""
    path = Path(path)
    return not (path / MANIFEST_NAME).is_file() and (path / INDEX_NAME).is_file() and (path / "unet" / "model.onnx").is_file()


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ModelDirError(f"{path} is missing; {_REIMPORT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path} cannot be read ({e}); {_REIMPORT}") from e
    if not isinstance(data, dict):
        raise ModelDirError(f"{path} is not a JSON object; {_REIMPORT}")
    return data


def _graph_io(path: Path) -> tuple[list, list]:
    """(inputs, outputs) of the graph at ``path`` as (name, dtype, shape) with ONNX Runtime's names."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelDirError(f"{path} is damaged: ONNX Runtime cannot load it ({first}); {_REIMPORT}") from e

    def rows(items):
        return [(t.name, _ORT_TYPES.get(t.type, t.type), list(t.shape)) for t in items]

    return rows(sess.get_inputs()), rows(sess.get_outputs())


def _spec(name: str, dtype: str, shape: list, dims: list) -> dict:
    """A manifest tensor record: fixed sizes kept, dynamic ones under sdrt's names (by position)."""
    out = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            out.append(d)
        else:
            out.append((dims[i] if i < len(dims) and dims[i] else f"{name}_{i}"))
    return {"name": name, "dtype": dtype, "shape": out}


def _pick(where: Path, io: list, names: list[str], dims: list, text_dims=None) -> list[dict]:
    by_name = {n: (n, t, s) for n, t, s in io}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ModelDirError(f"{where} has no {', '.join(missing)} (it has {', '.join(by_name)}); "
                            f"sdrt reads optimum's text-to-image layout: {_REIMPORT}")
    return [_spec(*by_name[n], text_dims(n) if text_dims else dims) for n in names]


def _tokenizer_record(src: Path, folder: str, out: Path) -> dict:
    """tokenizer.json for the `tokenizers` library in ``out/folder`` (the directory's own, or one built from
    its vocab.json and merges.txt as transformers' CLIP converter builds it) and the manifest's record."""
    tdir = src / folder
    config = _read(tdir / "tokenizer_config.json") if (tdir / "tokenizer_config.json").is_file() else {}
    special = _read(tdir / "special_tokens_map.json") if (tdir / "special_tokens_map.json").is_file() else {}

    def token(key, default):
        v = config.get(key) or special.get(key) or default
        return v["content"] if isinstance(v, dict) else v

    bos, eos = token("bos_token", "<|startoftext|>"), token("eos_token", "<|endoftext|>")
    pad, unk = token("pad_token", eos), token("unk_token", eos)
    (out / folder).mkdir(parents=True, exist_ok=True)
    dest = out / folder / "tokenizer.json"
    if (tdir / "tokenizer.json").is_file():
        shutil.copyfile(tdir / "tokenizer.json", dest)
    else:
        clip_tokenizer_json(tdir / "vocab.json", tdir / "merges.txt", dest, bos=bos, eos=eos, unk=unk, pad=pad)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(dest))
    ids = {name: tok.token_to_id(t) for name, t in (("bos", bos), ("eos", eos), ("pad", pad))}
    if None in ids.values():
        raise ModelDirError(f"{tdir}: the special tokens {bos!r}, {eos!r}, {pad!r} are not all in its vocabulary; {_REIMPORT}")
    max_length = config.get("model_max_length", 77)
    max_length = 77 if not isinstance(max_length, int) or max_length > 77 else max_length
    return {"file": f"{folder}/tokenizer.json", "max_length": max_length, "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}


def clip_tokenizer_json(vocab_path: Path, merges_path: Path, dest: Path, *, bos: str, eos: str, unk: str,
                        pad: str | None = None) -> None:
    """CLIP's tokenizer.json from vocab.json and merges.txt, as transformers' CLIPConverter builds the fast
    tokenizer: NFC, whitespace runs to one space, lower case; CLIP's pre-token pattern; byte-level BPE with
    ``</w>`` ending each word. The special tokens (a pad token too, as SDXL's second tokenizer's ``!``) are
    split out of the text before BPE, as transformers does with them."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise ModelDirError(f"{p} is missing; {_REIMPORT}")
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, continuing_subword_prefix="",
                                   end_of_word_suffix="</w>", fuse_unk=False))
    except Exception as e:
        raise ModelDirError(f"{vocab_path.parent}: vocab.json and merges.txt do not make a BPE tokenizer ({e}); {_REIMPORT}") from e
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]),
                                                      add_prefix_space=False, trim_offsets=False)
    tok.add_special_tokens(list(dict.fromkeys([bos, eos] + ([pad] if pad else []))))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest))


def derive_manifest(src: Path, out: Path) -> dict:
    """The sdrt manifest of the optimum-layout directory ``src``; the tokenizer.json files it names are
    written under ``out`` (the component files are ``src``'s own, by the same relative paths)."""
    src = Path(src)
    index = _read(src / INDEX_NAME)
    cls = index.get("_class_name", "")
    kind = _PIPELINES.get(cls.removeprefix("ORT"))
    if kind is None:
        raise ModelDirError(f"{src / INDEX_NAME}: a {cls or 'unnamed'} pipeline; sdrt reads Stable Diffusion 1.x/2.x "
                            "and SDXL base pipelines in optimum's layout")
    unet_cfg, te_cfg = _read(src / "unet" / "config.json"), _read(src / "text_encoder" / "config.json")
    vae_cfg = _read(src / "vae_decoder" / "config.json")
    scheduler = _read(src / "scheduler" / "scheduler_config.json")
    family = "sdxl" if kind == "sdxl" else (
        "sd2" if te_cfg.get("hidden_act") == "gelu" or te_cfg.get("hidden_size") == 1024 else "sd1")
    latent = int(vae_cfg.get("latent_channels", 4))
    in_channels = int(unet_cfg.get("in_channels", latent))
    task = TEXT_TO_IMAGE if in_channels == latent else INPAINTING if in_channels == 2 * latent + 1 else None
    if task is None:
        raise ModelDirError(f"{src / 'unet' / 'config.json'}: {in_channels} input channels for {latent} latent channels; "
                            "sdrt runs text-to-image and inpainting UNets")
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)

    rules = FAMILIES[family]
    encoders = list(rules.text_encoders)
    tokenizers = [_tokenizer_record(src, name.replace("text_encoder", "tokenizer"), out) for name in encoders]
    L = tokenizers[0]["max_length"]
    components = {}

    def record(name: str, inputs: list, outputs: list) -> dict:
        rel = f"{name}/model.onnx"
        data = src / name / "model.onnx_data"
        rec = {"file": rel, "external_data": f"{name}/model.onnx_data" if data.is_file() else None,
               "inputs": inputs, "outputs": outputs, "precision": "fp32", "sha256": None,
               "size_bytes": sum(f.stat().st_size for f in (src / name).iterdir() if f.is_file())}
        if (src / name / "config.json").is_file():
            rec["config"] = f"{name}/config.json"
        return rec

    for name in encoders:
        path = src / name / "model.onnx"
        ins, outs = _graph_io(path)
        in_names = ["input_ids"] + (["attention_mask"] if any(n == "attention_mask" for n, _, _ in ins) else [])
        cfg = te_cfg if name == "text_encoder" else _read(src / name / "config.json")
        layers = int(cfg.get("num_hidden_layers", sum(n.startswith("hidden_states.") for n, _, _ in outs) - 1))
        out_names = rules.text_encoder_outputs(name, layers)
        text_dims = ["batch", L]
        inputs = [dict(_spec(*next(r for r in ins if r[0] == n), text_dims), shape=["batch", L]) for n in in_names]
        outputs = _pick(path, outs, out_names, [], lambda n: ["batch", L, None] if n != "text_embeds" else ["batch"])
        components[name] = record(name, inputs, outputs)

    ins, outs = _graph_io(src / "unet" / "model.onnx")
    names = ["sample", "timestep", "encoder_hidden_states", *rules.unet_added_inputs]

    def unet_dims(n):
        return {"sample": _DIMS["unet"], "encoder_hidden_states": ["batch", "text_length"],
                "timestep": ["batch"]}.get(n, ["batch"])

    components["unet"] = record("unet", _pick(src / "unet" / "model.onnx", ins, names, [], unet_dims),
                                _pick(src / "unet" / "model.onnx", outs, ["out_sample"], _DIMS["unet"]))
    path = src / "vae_decoder" / "model.onnx"
    ins, outs = _graph_io(path)
    components["vae_decoder"] = record("vae_decoder", _pick(path, ins, ["latent_sample"], _DIMS["unet"]),
                                       _pick(path, outs, ["sample"], _DIMS["vae_decoder"]))
    path = src / "vae_encoder" / "model.onnx"
    if path.is_file():
        ins, outs = _graph_io(path)
        if any(n == "latent_parameters" for n, _, _ in outs):  # older exports sample inside the graph: left out
            components["vae_encoder"] = record("vae_encoder", _pick(path, ins, ["sample"], _DIMS["vae_decoder"]),
                                               _pick(path, outs, ["latent_parameters"], _DIMS["vae_encoder"]))

    manifest = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "task": task,
        "prediction_type": scheduler.get("prediction_type", "epsilon"),
        "latent_channels": latent,
        "unet_in_channels": in_channels,
        "vae_scale_factor": vae_scale,
        "vae_scaling_factor": float(vae_cfg.get("scaling_factor", 0.18215)),
        "vae_shift_factor": float(vae_cfg["shift_factor"]) if vae_cfg.get("shift_factor") is not None else None,
        "vae_scaling": "runtime",
        "native_resolution": int(unet_cfg.get("sample_size", 64)) * vae_scale,
        "scheduler_class": scheduler.get("_class_name"),
        **rules.import_facts(index, unet_cfg),
        "tokenizers": tokenizers,
        "components": components,
        "engines": {},
        "source": {"imported_from": str(src.absolute()), "layout": "optimum",
                   "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    check_manifest(manifest, src)
    return manifest


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdrt" / "imported"


def _key(src: Path) -> str:
    """Changes with the directory's path and with any of its files (size and modification time)."""
    h = hashlib.sha256(str(src.resolve()).encode())
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(src)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def imported_dir(src: str | os.PathLike) -> Path:
    """An sdrt model directory standing for the optimum-layout directory ``src``, in the user's cache: the
    derived sdrt.json and tokenizer.json files, and links to ``src``'s own folders. Made on first use."""
    src = Path(src).absolute()
    entry = cache_root() / _key(src)
    if (entry / MANIFEST_NAME).is_file():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        manifest = derive_manifest(src, work)
        for name in [*manifest["components"], "scheduler", INDEX_NAME]:
            os.symlink(src / name, work / name, target_is_directory=(src / name).is_dir())
        (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(work, entry)
        except OSError:  # another process made it first
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return entry


def import_model(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, log=print) -> dict:
    """Write the sdrt model directory ``out`` from the optimum-layout directory ``src`` (its files copied,
    sha256 recorded), atomically: assembled beside ``out`` and renamed into place at the end."""
    from .files import default_mode, sha256_file

    src, out = Path(src).absolute(), Path(out).absolute()
    if not src.is_dir():
        raise ModelDirError(f"{src} does not exist")
    if (src / MANIFEST_NAME).is_file():
        raise ModelDirError(f"{src} is already an sdrt model directory (it has {MANIFEST_NAME}); use it as it is")
    if not is_optimum_dir(src):
        raise ModelDirError(f"{src} is not in optimum's ONNX layout (model_index.json and unet/model.onnx); {_REIMPORT}")
    if out.exists() and not overwrite:
        raise ModelDirError(f"{out} already exists; pass --overwrite to replace it (it is kept until the new one is complete)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-{os.getpid()}-", dir=out.parent))
    os.chmod(work, default_mode(directory=True))
    try:
        manifest = derive_manifest(src, work)
        for name in [*manifest["components"], "scheduler"]:
            shutil.copytree(src / name, work / name)
        for t in manifest["tokenizers"]:  # the Hub files beside the tokenizer.json written above
            folder = t["file"].split("/")[0]
            for f in (src / folder).iterdir():
                if f.is_file() and not (work / folder / f.name).exists():
                    shutil.copy2(f, work / folder / f.name)
        shutil.copy2(src / INDEX_NAME, work / INDEX_NAME)
        for name, rec in manifest["components"].items():
            rec["sha256"] = sha256_file(work / rec["file"])
            if rec.get("external_data"):
                rec["external_data_sha256"] = sha256_file(work / rec["external_data"])
            log(f"  {name}: {rec['size_bytes'] / 2**20:.1f} MiB")
        (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest
