"""LoRA without re-export: low-rank updates read from a safetensors file and added to the exported
graphs' weights at run time, with diffusers' verbs and meanings (load_lora_weights, set_adapters,
unload_lora_weights).

Each adapter's update of a module's weight W is ``scale · up · down`` with ``scale = alpha / rank``
(the file's alphas, kohya's ``.alpha`` keys or diffusers' adapter metadata; 1 without them), so
with adapters a, b active at weights w_a, w_b the engines run ``W + w_a·Δ_a + w_b·Δ_b``. The export
records which graph initializer holds each module's weight and where its bytes lie (export/weights.py,
``weights.json``); the base weight is read from the graph's external data, a block at a time, and the
merged weight handed to the engine (``Engine.set_weights``: on ONNX Runtime's CPU cache by address, into
buffers it gives; else its external-initializer override; OpenVINO's constants; TensorRT's refitter).
Unloading hands back the exported weights themselves.

Formats: diffusers/PEFT (``save_lora_weights``: ``unet.…lora_A.weight``, ``text_encoder.…``, the
older ``lora.down``/``lora_linear_layer.down`` forms) and kohya/AUTOMATIC1111 (``lora_unet_…``,
``lora_te_…``, ``lora_te1_…``/``lora_te2_…`` with ``.alpha``; SDXL ones in the original layout's names,
``lora_unet_input_blocks_4_1_…``, as kohya's sd-scripts write them), for the UNet and the text encoder(s).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelDirError, SdrtError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
PICKLED = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# diffusers' key prefixes and kohya's, to the model directory's components
PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
# components holding a copy of another's weights under the same module names, which that one's updates change too
COPIES = {"unet_controlnet": "unet"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# key suffixes -> the part of the update they hold
ROLES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",  # PEFT
    ".lora_down.weight": "down", ".lora_up.weight": "up",  # kohya
    ".lora.down.weight": "down", ".lora.up.weight": "up",  # diffusers' attention processors
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",  # diffusers' text encoder
    ".alpha": "alpha",
}
# diffusers' oldest form: attention processors' own layers (attn1.processor.to_q_lora.down.weight)
_PROCESSOR = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora\.")
UNSUPPORTED = {"lora_magnitude_vector": "DoRA", "lora_B.bias": "LoRA biases", "hada_": "LoHa", "lokr_": "LoKr",
               "lora_mid": "LoCon's Tucker decomposition"}


class LoraError(SdrtError, ValueError):
    """A LoRA file that cannot be read or does not fit the model; the adapters already loaded are kept."""


# -- the model's side: which initializer holds which module's weight --------------------------------


class WeightMap:
    """One component's weights.json: module name -> initializer, its layout and where its bytes lie."""

    def __init__(self, model_dir: Path, component: str, record: dict):
        self.component, self.dir = component, Path(model_dir) / component
        path = Path(model_dir) / record["weights"]
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            self.entries: dict[str, dict] = doc["weights"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelDirError(f"{path} cannot be read ({e}); re-export the model with `sdrt export --overwrite`") from e
        self.by_initializer = {e["initializer"]: e for e in self.entries.values()}
        outside = [e["file"] for e in self.entries.values() if Path(e["file"]).name != e["file"]]
        if outside:  # the data lies beside the graph, by its plain name
            raise ModelDirError(f"{path} names data file {outside[0]!r} outside {self.dir}; re-export the model")
        # modules the graph does not compute (their updates cannot change the output: skipped), and
        # modules it computes without a weight of their own (folded: refused)
        self.unused, self.unmapped = set(doc.get("unused", ())), set(doc.get("unmapped", ()))
        # kohya's names: the module path with underscores (text encoders' under transformers 4.x's text_model)
        self.kohya = {m.replace(".", "_"): m for m in [*self.entries, *self.unused, *self.unmapped]}
        if component != "unet":
            self.kohya.update({"text_model_" + k: m for k, m in list(self.kohya.items())})

    def knows(self, module: str) -> bool:
        return module in self.entries or module in self.unused or module in self.unmapped

    def exported(self, initializer: str) -> np.ndarray:
        """The exported value of ``initializer``, read from the graph's external data (a read, not a memory map:
        mapped pages would count in the process's resident memory as long as the map lives)."""
        e = self.by_initializer[initializer]
        out = np.empty(e["shape"], e["dtype"])
        with open(self.dir / e["file"], "rb", buffering=0) as f:
            f.seek(e["offset"])
            _read_into(f, out, self.dir / e["file"], initializer)
        return out

    def merged(self, initializer: str, updates: list[tuple[float, "Update"]], out: np.ndarray | None = None) -> np.ndarray:
        """The exported weight plus each ``weight · update``, in the initializer's dtype and layout (written
        into ``out`` when given). fp32 weights are read and updated a block of rows at a time, each block while
        it is in cache: the weight's memory is written once."""
        e = self.by_initializer[initializer]
        if e["dtype"] != "float32":
            w = self.exported(initializer).astype(np.float32)
            for weight, u in updates:
                u.add_to(w, e["transposed"], weight)
            if out is None:
                return w.astype(e["dtype"])
            out[...] = w
            return out
        if out is None:
            out = np.empty(e["shape"], np.float32)
        flat = out.reshape(out.shape[0], -1)
        factors = [u.factors(e["transposed"], weight) for weight, u in updates]
        rows, rows_added = (max(1, n // flat.shape[1]) for n in (_READ_FLOATS, _PRODUCT_FLOATS))
        product = np.empty((min(rows_added, flat.shape[0]), flat.shape[1]), np.float32)
        with open(self.dir / e["file"], "rb", buffering=0) as f:
            f.seek(e["offset"])
            for r in range(0, flat.shape[0], rows):
                _read_into(f, flat[r:r + rows], self.dir / e["file"], initializer)
                for q in range(r, min(r + rows, flat.shape[0]), rows_added):
                    block = flat[q:q + rows_added]
                    part = product[:len(block)]
                    for left, right in factors:
                        np.matmul(left[q:q + rows_added], right, out=part)
                        block += part
        return out


# A weight is read 512 KiB at a time and updated while that block is in cache; the product is formed 64 KiB
# at a time, in a buffer small enough to come from the heap (larger ones are fresh memory maps, and each
# page of those faults, 9 us a page on a virtual machine)
_READ_FLOATS, _PRODUCT_FLOATS = 1 << 17, 1 << 14


def _read_into(f, out: np.ndarray, path: Path, initializer: str) -> None:
    view, done = memoryview(out.reshape(-1)).cast("B"), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ModelDirError(f"{path} ends inside {initializer}; re-export the model")
        done += n


@dataclass(frozen=True)
class Merged:
    """One initializer's merged weight, made when an engine asks for it (``Engine.set_weights``' functions):
    into a buffer the engine gives (``out``: ONNX Runtime's session then reads it where it lies), or a new array."""

    wmap: WeightMap
    initializer: str
    updates: list

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.wmap.by_initializer[self.initializer]["shape"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.wmap.by_initializer[self.initializer]["dtype"])

    def __call__(self, out: np.ndarray | None = None) -> np.ndarray:
        return self.wmap.merged(self.initializer, self.updates, out)


def weight_maps(model_dir: Path, manifest: dict) -> dict[str, WeightMap]:
    """The weight maps of the components LoRA files address; a model exported before sdrt recorded
    them cannot take a LoRA."""
    comps = manifest["components"]
    found = {c: WeightMap(model_dir, c, comps[c]) for c in (*PREFIXES.values(), *COPIES)
             if c in comps and comps[c].get("weights")}
    if "unet" not in found:
        raise LoraError(f"{model_dir} was exported without a weight map, which LoRA needs; re-export it with this "
                        f"sdrt (`sdrt export CHECKPOINT --out {model_dir} --overwrite`)")
    return found


# -- the file's side ----------------------------------------------------------------------------------


@dataclass
class Update:
    """One module's low-rank update: ``scale · up @ down``."""

    down: np.ndarray  # (rank, in[, kh, kw])
    up: np.ndarray  # (out, rank[, 1, 1])
    scale: float

    def factors(self, transposed: bool, weight: float) -> tuple[np.ndarray, np.ndarray]:
        """(left, right), fp32, with ``left @ right = weight · scale · up @ down`` in the layout of the weight
        ((out, in·kh·kw), or (in, out) for a transposed MatMul weight); the scalars go on the rank-sized factor."""
        rank = self.down.shape[0]
        up = self.up.reshape(self.up.shape[0], rank).astype(np.float32) * np.float32(weight * self.scale)
        down = self.down.reshape(rank, -1).astype(np.float32)
        return (np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)) if transposed else (up, down)

    def add_to(self, w: np.ndarray, transposed: bool, weight: float) -> None:
        """``w += weight · scale · up @ down`` in place, in ``w``'s layout."""
        left, right = self.factors(transposed, weight)
        flat = w.reshape(w.shape[0], -1)  # a view: w is contiguous
        flat += left @ right


@dataclass
class Adapter:
    name: str
    source: str
    updates: dict[str, dict[str, Update]] = field(default_factory=dict)  # component -> module -> update


def read_file(path, weight_name: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and metadata of a LoRA safetensors file, or of the one in a folder (``weight_name``, else
    diffusers' pytorch_lora_weights.safetensors, else the folder's only .safetensors file)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = _file_in(path, weight_name)
    if path.suffix.lower() in PICKLED:
        raise LoraError(f"{path} is a pickled checkpoint, which sdrt does not load (unpickling runs code); convert it "
                        f"to safetensors (safetensors.torch.save_file(torch.load(path), 'lora.safetensors'))")
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise LoraError(f"{path} is not a safetensors file ({e})") from e


def _file_in(folder: Path, weight_name: str | None) -> Path:
    if weight_name:
        return folder / weight_name
    if (folder / WEIGHT_NAME).is_file():
        return folder / WEIGHT_NAME
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise LoraError(f"{folder} holds {len(files)} .safetensors files; name one with weight_name= (--lora FILE)")
    return files[0]


def parse(tensors: dict[str, np.ndarray], metadata: dict, maps: dict[str, WeightMap], name: str, source: str) -> Adapter:
    """The file's tensors as per-module updates of this model's components. Keys that match no weight
    of the model are an error naming the first few."""
    for key in tensors:
        for mark, what in UNSUPPORTED.items():
            if mark in key:
                raise LoraError(f"{source}: {what} ({key!r}) is not supported; only plain LoRA (down/up matrices) is")
    parts: dict[tuple[str, str], dict] = {}
    unknown = []
    for key, value in tensors.items():
        plain = _PROCESSOR.sub(lambda m: f".{m[1]}{'.0' if m[1] == 'to_out' else ''}.lora.", key)
        suffix = next((s for s in ROLES if plain.endswith(s)), None)
        found = _module(plain[: -len(suffix)], maps) if suffix else None
        if found is None:
            unknown.append(key)
            continue
        parts.setdefault(found, {})[ROLES[suffix]] = value
    if unknown:
        raise LoraError(
            f"{source}: {len(unknown)} of {len(tensors)} keys match no weight of this model, e.g. "
            f"{', '.join(repr(k) for k in unknown[:3])}; is it a LoRA for another family (SD 1.x, SD 2.x, SDXL)?"
        )
    scale_of = _metadata_scales(metadata)
    adapter = Adapter(name, source)
    for (component, module), p in parts.items():
        if module in maps[component].unmapped:
            raise LoraError(f"{source}: the exported {component} graph holds no separate weight for {module!r} "
                            f"(folded into another constant), so this LoRA cannot be applied to it without a re-export")
        if module in maps[component].unused:
            continue  # the graph never computes it: its update cannot change the output
        if "down" not in p or "up" not in p:
            raise LoraError(f"{source}: {component} module {module!r} has no {'up' if 'down' in p else 'down'} matrix")
        alpha = float(p["alpha"]) if "alpha" in p else None
        adapter.updates.setdefault(component, {})[module] = Update(p["down"], p["up"],
                                                                   scale_of(component, module, p["down"].shape[0], alpha))
    return adapter


def _module(stem: str, maps: dict[str, WeightMap]) -> tuple[str, str] | None:
    """(component, module name) a key stem names, in diffusers' dotted form or kohya's underscored one."""
    for prefix, component in KOHYA_PREFIXES.items():
        if stem.startswith(prefix) and component in maps:
            wmap, rest = maps[component], stem[len(prefix):]
            names = _sgm_to_diffusers(rest, wmap) if component == "unet" and _SGM_BLOCK.match(rest) else [rest]
            module = next((wmap.kohya[n] for n in names if n in wmap.kohya), None)
            return (component, module) if module else None
    head, _, rest = stem.partition(".")
    component = PREFIXES.get(head)
    if component is None or component not in maps:
        return None
    for candidate in (rest, rest.removeprefix("text_model.")):  # transformers 4.x names CLIP modules text_model.*
        if maps[component].knows(candidate):
            return component, candidate
    return None


# kohya's SDXL LoRAs name UNet modules after the original (SGM/LDM) layout: input_blocks_4_1_..., middle_block_1_...
_SGM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)_\d")
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}


def _sgm_to_diffusers(stem: str, wmap: WeightMap) -> list[str]:
    """Candidate diffusers names (underscored, as kohya's) for an SGM-layout UNet key, as diffusers'
    _maybe_map_sgm_blocks_to_diffusers: input block i > 0 is down block (i-1) // (n+1), layer (i-1) % (n+1)
    (layer n: the downsampler); output block i is up block i // (n+1), layer i % (n+1); middle 0, 1, 2 are
    resnet 0, attention 0, resnet 1; n the UNet's resnets per down block."""
    n = 1 + max((int(m.split(".")[3]) for m in wmap.entries if m.startswith("down_blocks.0.resnets.")), default=0)
    kind, _, rest = stem.partition("_blocks_") if not stem.startswith("middle_block_") else ("middle", "", stem[13:])
    idx, _, rest = rest.partition("_")
    i = int(idx)
    if kind == "middle":
        heads = [("mid_block_resnets_0", "mid_block_attentions_0", "mid_block_resnets_1")[i]] if i < 3 else []
    else:
        j, _, rest = rest.partition("_")
        if kind == "input":
            if i == 0:
                return ["conv_in"]
            block, layer = divmod(i - 1, n + 1)
            heads = ([f"down_blocks_{block}_downsamplers_0"] if layer == n else
                     [f"down_blocks_{block}_{'resnets' if j == '0' else 'attentions'}_{layer}"])
        else:
            block, layer = divmod(i, n + 1)
            heads = ([f"up_blocks_{block}_resnets_{layer}"] if j == "0" else
                     [f"up_blocks_{block}_attentions_{layer}", f"up_blocks_{block}_upsamplers_0"])
    if rest in ("op", "conv"):  # a down- or upsampler's convolution
        return [f"{h}_conv" for h in heads]
    rest = next((rest.replace(k, v, 1) for k, v in _SGM_RESNET.items() if rest.startswith(k)), rest)
    return [f"{h}_{rest}" for h in heads]


def _metadata_scales(metadata: dict):
    """scale(component, module, rank, alpha) = alpha / rank (alpha / sqrt(rank) under rsLoRA), with alpha
    from the file's own key, else diffusers' lora_adapter_metadata (PEFT LoraConfig fields under "unet.",
    "text_encoder." prefixes), else the rank itself (scale 1), as diffusers does."""
    try:
        meta = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        meta = {}

    def scale(component, module, rank, alpha):
        if alpha is None:
            pattern = meta.get(f"{component}.alpha_pattern") or {}
            alpha = next((float(v) for k, v in pattern.items() if module == k or module.endswith("." + k)), None)
        if alpha is None:
            alpha = float(meta.get(f"{component}.lora_alpha", rank))
        return alpha / (math.sqrt(rank) if meta.get(f"{component}.use_rslora") else rank)

    return scale


# -- the pipeline's verbs ---------------------------------------------------------------------------------


class LoraMixin:
    """diffusers' LoRA verbs on Pipeline. Every change re-weights only the engines whose weights it
    changes; the adapters' updates are kept (small), the merged weights live in the engines."""

    def _lora_state(self) -> dict[str, Adapter]:
        if not hasattr(self, "_adapters"):
            self._adapters: dict[str, Adapter] = {}
            self._active: list[tuple[str, float]] = []
            self._set: dict[str, set[str]] = {}  # component -> initializers the engines hold overridden
        return self._adapters

    def _weight_maps(self) -> dict[str, WeightMap]:
        if getattr(self, "_maps", None) is None:
            self._maps = weight_maps(self.model_dir, self.manifest)
        return self._maps

    def load_lora_weights(self, path, adapter_name: str | None = None, weight_name: str | None = None) -> str:
        """Load a LoRA (a safetensors file, or a folder holding one) as ``adapter_name`` (default
        ``default_{n}``) and make it the active adapter, at weight 1, as diffusers does. Returns its name."""
        name = self._read_adapter(path, adapter_name, weight_name)
        self.set_adapters([name])
        return name

    def use_loras(self, loras) -> list[str]:
        """Load several LoRAs, ``[(path, scale), ...]``, and make exactly them active at their scales, with
        one re-weighting of the engines (``sdrt generate --lora FILE[:SCALE]``). Returns their names."""
        names = []
        try:
            for path, _ in loras:
                names.append(self._read_adapter(path, None, None))
            self.set_adapters(names, [scale for _, scale in loras])
        except BaseException:
            for n in names:
                self._adapters.pop(n, None)
            raise
        return names

    def _read_adapter(self, path, adapter_name, weight_name) -> str:
        adapters = self._lora_state()
        name = adapter_name or f"default_{len(adapters)}"
        if name in adapters:
            raise LoraError(f"an adapter named {name!r} is already loaded; pick another adapter_name or delete_adapters({name!r})")
        tensors, metadata = read_file(path, weight_name)
        adapter = parse(tensors, metadata, self._weight_maps(), name, str(path))
        self._check_shapes(adapter)
        adapters[name] = adapter
        return name

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Make exactly these adapters active, each at its weight (default 1.0): diffusers' set_adapters."""
        adapters = self._lora_state()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in adapters]
        if missing:
            raise LoraError(f"no adapter named {missing[0]!r}; loaded: {', '.join(adapters) or 'none'}")
        if adapter_weights is None:
            adapter_weights = 1.0
        weights = [adapter_weights] * len(names) if isinstance(adapter_weights, (int, float)) else list(adapter_weights)
        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
        if bad:
            raise LoraError(f"adapter weights must be finite numbers, got {bad[0]!r}")
        if len(weights) != len(names):
            raise LoraError(f"{len(weights)} adapter weights for {len(names)} adapters; give one weight per adapter")
        self._active = [(n, float(w)) for n, w in zip(names, weights)]
        self._apply()

    def get_active_adapters(self) -> list[str]:
        self._lora_state()
        return [n for n, _ in self._active]

    def get_list_adapters(self) -> list[str]:
        return list(self._lora_state())

    def delete_adapters(self, adapter_names) -> None:
        adapters = self._lora_state()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            adapters.pop(n, None)
        self._active = [(n, w) for n, w in self._active if n in adapters]
        self._apply()

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the engines run the exported weights again."""
        self._lora_state().clear()
        self._active = []
        self._apply()

    def _check_shapes(self, adapter: Adapter) -> None:
        for component, updates in adapter.updates.items():
            entries = self._weight_maps()[component].entries
            for module, u in updates.items():
                try:
                    _check_delta_shape(u, entries[module])
                except ValueError as err:
                    raise LoraError(f"{adapter.source}: {component} module {module!r}: {err}; is it a LoRA for another model?") from None

    def _apply(self) -> None:
        """Hand each engine, as functions it calls once its old weights are released, the merged weights of
        what the active adapters touch; what they no longer touch takes its exported value again."""
        if not self._active and not any(self._set.values()):
            return  # nothing applied, nothing to apply
        for component, wmap in self._weight_maps().items():
            touched: dict[str, list] = {}
            for name, weight in self._active:
                for module, u in self._adapters[name].updates.get(COPIES.get(component, component), {}).items():
                    touched.setdefault(wmap.entries[module]["initializer"], []).append((weight, u))
            if touched or self._set.get(component):
                self.engines[component].set_weights({init: Merged(wmap, init, ups) for init, ups in touched.items()})
            self._set[component] = set(touched)


def _check_delta_shape(u: Update, entry: dict) -> None:
    """The update's (out, in·k·k) matches the weight without forming it."""
    out, rank = u.up.shape[0], u.down.shape[0]
    if u.up.reshape(out, -1).shape[1] != rank:
        raise ValueError(f"up matrix {u.up.shape} does not match down matrix {u.down.shape}")
    shape = tuple(entry["shape"])
    want = (shape[1], shape[0]) if entry["transposed"] else (shape[0], math.prod(shape[1:]))
    if (out, u.down.reshape(rank, -1).shape[1]) != want:
        raise ValueError(f"update of shape {(out, u.down.reshape(rank, -1).shape[1])} for a weight of shape {shape}")
