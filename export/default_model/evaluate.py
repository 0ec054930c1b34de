"""Read a generated image back into the attributes a prompt asked for (numpy + Pillow only).

The pipeline, for an RGB image (uint8, or float in [0, 1], HWC; a PIL image works too):

1. background: the median RGB of a border ring (1/32 of the side, at least 2 px) and its nearest
   palette colour;
2. object mask: pixels farther than ``MASK_THRESHOLD`` (RGB Euclidean) from that median, after a
   3x3 median filter (``denoise``) that removes speckle;
3. connected components (8-connected, run-length union-find; no scipy), those below
   ``MIN_AREA`` (scaled to the image area) dropped, largest first;
4. per component: colour = nearest palette colour to the median RGB of its interior (the mask
   eroded by one pixel, pixels at least half as far from the background as its farthest ones, so
   anti-aliased or blurred edges do not vote); its mask is then redrawn at the half-way contour between
   background and that colour (contrast- and blur-independent outline); position = from its bbox
   centre: "centre" when it lies in the middle third on both axes, otherwise the axis with the larger
   offset from the image centre decides left/right or top/bottom; size = its bbox's longer side
   against ``data.SIZE_THRESHOLD`` (scaled to 128 px); shape = the best soft IoU between its mask,
   cropped to its bbox and resized to 32x32, and per-shape templates measured on the generator's own
   renders, sharp and blurred, small and large (``templates()``, built once, deterministic);
5. ``evaluate(image, prompt)`` takes as many components as the prompt names objects (the largest),
   assigns them to the named objects by the permutation that matches most colours and shapes (then
   positions), and reports per-attribute correctness (None where the prompt does not state it);
   ``accuracy(images, prompts)`` averages that over a batch, per attribute over the prompts that state it.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from . import data
from .data import PALETTE, SHAPES, Intent, parse_prompt

MASK_THRESHOLD = 48.0  # RGB distance from the background that makes a pixel part of an object
MIN_AREA = 30  # components smaller than this many pixels (at 128x128) are noise
TEMPLATE_SIDE = 32

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[c] for c in _NAMES], np.float32)


def to_uint8(image) -> np.ndarray:
    """An (H, W, 3) uint8 array from a PIL image, a uint8 array or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HWC RGB image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.asarray(arr, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return arr


def nearest_colour(rgb) -> str:
    d = ((_RGB - np.asarray(rgb, np.float32)) ** 2).sum(axis=1)
    return _NAMES[int(d.argmin())]


def estimate_background(img: np.ndarray) -> np.ndarray:
    """Median RGB of the image's border ring."""
    h, w = img.shape[:2]
    b = max(2, min(h, w) // 32)
    ring = np.concatenate(
        [img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[b:-b, :b].reshape(-1, 3), img[b:-b, -b:].reshape(-1, 3)]
    )
    return np.median(ring.astype(np.float32), axis=0)


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask: (int32 labels, 0 = background, 1..n; n)."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    ry, rs = np.nonzero(d == 1)
    _, re_ = np.nonzero(d == -1)  # same row-major order as the starts: one end per start
    n_runs = len(ry)
    labels = np.zeros((h, w), np.int32)
    if n_runs == 0:
        return labels, 0
    reach = 1 if connectivity == 8 else 0
    parent = list(range(n_runs))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_start = np.searchsorted(ry, np.arange(h + 1))
    ys, ss, es = ry.tolist(), rs.tolist(), re_.tolist()
    for y in range(1, h):
        i, i_end = int(row_start[y - 1]), int(row_start[y])
        j, j_end = i_end, int(row_start[y + 1])
        while i < i_end and j < j_end:
            if ss[j] < es[i] + reach and ss[i] < es[j] + reach:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if es[i] < es[j]:
                i += 1
            else:
                j += 1
    roots: dict[int, int] = {}
    for k in range(n_runs):
        r = find(k)
        lab = roots.setdefault(r, len(roots) + 1)
        labels[ys[k], ss[k] : es[k]] = lab
    return labels, len(roots)


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def normalized_mask(mask: np.ndarray, side: int = TEMPLATE_SIDE) -> np.ndarray:
    """A component's mask cropped to its bbox and resized to side x side (float32 in [0, 1])."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    return np.asarray(Image.fromarray(crop).resize((side, side), Image.BILINEAR), np.float32).clip(0, 1)


def classify_position(cx: float, cy: float, w: int, h: int) -> str:
    dx, dy = cx - w / 2, cy - h / 2
    if abs(dx) < w / 6 and abs(dy) < h / 6:
        return "centre"
    if abs(dx) * h >= abs(dy) * w:
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def classify_size(extent: float, w: int) -> str:
    return "small" if extent * data.SIZE / w < data.SIZE_THRESHOLD else "large"


TEMPLATE_BLURS = (0.0, 1.0, 2.0)  # Gaussian blur radii (px at 128) the templates are also measured at


@functools.lru_cache(maxsize=None)
def templates() -> dict[str, np.ndarray]:
    """Shape templates, (variants, 32, 32) per shape: mean normalized masks of the generator's own
    renders (through the same mask pipeline), one per (small | large) x blur in ``TEMPLATE_BLURS``, each
    averaged over five sizes in the range and sub-pixel offsets. The blurred variants keep a soft model
    output's rounded star (a pentagon-like blob) a star rather than a diamond or a circle."""
    out = {}
    for shape in SHAPES:
        variants = []
        for size in data.SIZES:
            lo, hi = data.SIZE_RANGE[size]
            for blur in TEMPLATE_BLURS:
                acc = []
                for k, r in enumerate(np.linspace(lo, hi, 5)):
                    off = 0.25 * (k % 4)
                    obj = data.SceneObject(shape, "black", size, "centre", (64.0 + off, 64.0 - off), float(r))
                    img = data.render(data.Scene((obj,), "white"))
                    if blur:
                        img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur)))
                    an = analyse(img, denoise=False, classify=False)
                    acc.append(normalized_mask(an.masks[0]))
                variants.append(np.mean(acc, axis=0))
        out[shape] = np.stack(variants)
    return out


def classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """(best shape, score per shape) for a component's boolean mask: the score is the best soft IoU
    (sum of minima over sum of maxima) against the shape's template variants."""
    m = normalized_mask(mask)
    scores = {
        s: float((np.minimum(m, t).sum(axis=(1, 2)) / np.maximum(np.maximum(m, t).sum(axis=(1, 2)), 1e-6)).max())
        for s, t in templates().items()
    }
    return max(scores, key=scores.get), scores


def _object_rgb(f: np.ndarray, dist: np.ndarray, m: np.ndarray) -> np.ndarray:
    """A component's colour: the median of its interior pixels that are at least half as far from
    the background as its farthest ones (blurred or anti-aliased edges do not vote)."""
    inner = _erode(m)
    if inner.sum() < 8:
        inner = m
    d = dist[inner]
    keep = d >= 0.5 * np.percentile(d, 95)
    return np.median(f[inner][keep], axis=0)


def _refine(f: np.ndarray, bg: np.ndarray, rgb: np.ndarray, m: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The component's half-way contour: pixels near it (2 px) that are closer to its colour than
    to the background along the background-to-object line, so the shape's outline neither grows
    nor shrinks with contrast or blur. Falls back to the coarse mask when the contrast is tiny."""
    axis = rgb - bg
    norm2 = float(axis @ axis)
    if norm2 < MASK_THRESHOLD**2:
        return m
    near = m.copy()
    for _ in range(2):
        p = np.pad(near, 1)
        near = near | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    near &= (labels == 0) | m  # never take over another component
    t = ((f - bg) @ axis) / norm2
    refined = near & (t > 0.5)
    return refined if refined.sum() >= 0.5 * m.sum() else m


@dataclass
class Component:
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    centre: tuple[float, float]  # bbox centre
    rgb: tuple[float, float, float]
    colour: str
    shape: str
    size: str
    position: str
    shape_scores: dict[str, float] = field(repr=False, default_factory=dict)


@dataclass
class Analysis:
    background: str
    background_rgb: tuple[float, float, float]
    components: list[Component]
    masks: list[np.ndarray] = field(repr=False, default_factory=list)  # per component, full-image booleans


def analyse(image, denoise: bool = True, classify: bool = True) -> Analysis:
    """Background colour and the image's objects (components, largest first)."""
    img = to_uint8(image)
    if denoise:
        img = np.asarray(Image.fromarray(img).filter(ImageFilter.MedianFilter(3)))
    h, w = img.shape[:2]
    bg = estimate_background(img)
    f = img.astype(np.float32)
    dist = np.sqrt(((f - bg) ** 2).sum(-1))
    labels, n = label_components(dist > MASK_THRESHOLD)
    min_area = MIN_AREA * h * w / data.SIZE**2
    comps, masks = [], []
    if n:
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for lab in np.argsort(-areas[1:], kind="stable") + 1:
            if areas[lab] < min_area:
                break
            m = labels == lab
            rgb = _object_rgb(f, dist, m)
            m = _refine(f, bg, rgb, m, labels)
            ys, xs = np.nonzero(m)
            x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            shape, scores = classify_shape(m) if classify else ("", {})
            masks.append(m)
            comps.append(
                Component(
                    area=int(areas[lab]),
                    bbox=(x0, y0, x1, y1),
                    centre=(cx, cy),
                    rgb=tuple(float(v) for v in rgb),
                    colour=nearest_colour(rgb),
                    shape=shape,
                    size=classify_size(max(x1 - x0, y1 - y0), w),
                    position=classify_position(cx, cy, w, h),
                    shape_scores=scores,
                )
            )
    return Analysis(nearest_colour(bg), tuple(float(v) for v in bg), comps, masks)


ATTRIBUTES = ("colour", "shape", "size", "position")


def _check(intent_obj, comp: Component | None) -> dict:
    out = {"found": comp is not None}
    for attr in ATTRIBUTES:
        want = getattr(intent_obj, attr)
        out[attr] = None if want is None else (comp is not None and getattr(comp, attr) == want)
    return out


def evaluate(image, prompt: str | Intent, denoise: bool = True) -> dict:
    """Per-attribute correctness of ``image`` against ``prompt`` (text or a parsed ``Intent``):
    {"objects": [{"found", "colour", "shape", "size", "position"}...], "background", "count",
    "all"}; an attribute the prompt does not state is None."""
    intent = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    an = analyse(image, denoise=denoise)
    want = list(intent.objects)
    cands = an.components[: len(want)]
    best, best_key = None, None
    for perm in itertools.permutations(range(len(want)), len(cands)):
        # perm[k] = which wanted object component k stands for
        key = [0, 0, 0]
        for k, wi in enumerate(perm):
            c, o = cands[k], want[wi]
            key[0] += (c.colour == o.colour) + (c.shape == o.shape)
            key[1] += o.position is not None and c.position == o.position
            key[2] += o.size is not None and c.size == o.size
        if best_key is None or key > best_key:
            best, best_key = perm, key
    assigned: list[Component | None] = [None] * len(want)
    for k, wi in enumerate(best or ()):
        assigned[wi] = cands[k]
    objects = [_check(o, c) for o, c in zip(want, assigned)]
    background = None if intent.background is None else an.background == intent.background
    count = len(an.components) == len(want)
    stated = [v for o in objects for a, v in o.items() if a != "found" and v is not None]
    all_ok = count and all(o["found"] for o in objects) and all(stated) and background is not False
    return {"objects": objects, "background": background, "count": count, "all": bool(all_ok), "analysis": an}


def accuracy(images, prompts, denoise: bool = True) -> dict:
    """Fractions correct over a batch: colour, shape, size, position (over the objects whose prompt
    states the attribute), background (over prompts that state one), found (objects located),
    count (prompts with exactly as many objects as named), all (prompts with everything right); n."""
    hits: dict[str, list[bool]] = {k: [] for k in ("colour", "shape", "size", "position", "found", "background", "count", "all")}
    n = 0
    for image, prompt in zip(images, prompts):
        r = evaluate(image, prompt, denoise=denoise)
        n += 1
        for o in r["objects"]:
            for k, v in o.items():
                if v is not None:
                    hits[k].append(bool(v))
        for k in ("background", "count", "all"):
            if r[k] is not None:
                hits[k].append(bool(r[k]))
    out = {k: (float(np.mean(v)) if v else float("nan")) for k, v in hits.items()}
    out["n"] = n
    return out
