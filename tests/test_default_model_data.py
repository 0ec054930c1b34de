"""The default model's synthetic data (export/default_model/data.py) and the evaluator that reads
generated images back (export/default_model/evaluate.py), checked on the generator's ground truth.
Neither needs torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdrt.export.default_model import data as D
from sdrt.export.default_model import evaluate as E


def _scenes(n: int, seed: int, allow: str = "all", n_objects: int | None = None) -> list[D.Scene]:
    rng = np.random.default_rng(seed)
    return [D.sample_scene(rng, allow=allow, n_objects=n_objects) for _ in range(n)]


@pytest.fixture(scope="module")
def ground_truth():
    scenes = _scenes(250, 11, n_objects=1) + _scenes(250, 12, n_objects=2)
    return [D.render(s) for s in scenes], scenes


# --- generator --------------------------------------------------------------------------------


def test_generator_is_deterministic_for_a_seed():
    a_img, a_cap, a_sc = D.make_dataset(12, seed=3)
    b_img, b_cap, b_sc = D.make_dataset(12, seed=3)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_sc == b_sc
    c_img, c_cap, _ = D.make_dataset(12, seed=4)
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap
    p_img, p_cap, _ = D.make_dataset(5, seed=3)  # the i-th sample depends on (seed, i) only
    assert np.array_equal(p_img, a_img[:5]) and p_cap == a_cap[:5]
    assert a_img.dtype == np.uint8 and a_img.shape == (12, D.SIZE, D.SIZE, 3)
    assert D.held_out_prompts(6, seed=1) == D.held_out_prompts(6, seed=1)
    assert D.held_out_prompts(6, seed=1) != D.held_out_prompts(6, seed=2)


def test_scenes_respect_their_invariants():
    seen = Counter()
    for s in _scenes(2000, 5, allow="train"):
        assert 1 <= len(s.objects) <= 2
        assert s.background not in {o.colour for o in s.objects}
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            assert D.MARGIN - 0.1 <= min(x0, y0) and max(x1, y1) <= D.SIZE - D.MARGIN + 0.1  # centre, r rounded to 0.01
            assert E.classify_position((x0 + x1) / 2, (y0 + y1) / 2, D.SIZE, D.SIZE) == o.position
            assert (max(x1 - x0, y1 - y0) < D.SIZE_THRESHOLD) == (o.size == "small")
            seen.update([("shape", o.shape), ("colour", o.colour), ("size", o.size), ("position", o.position)])
        seen[("background", s.background)] += 1
        if len(s.objects) == 2:
            a, b = s.objects
            assert D._apart(a, b) and (a.colour, a.shape) != (b.colour, b.shape)
            assert {a.position, b.position} in ({"left", "right"}, {"top", "bottom"})
    for kind, values in (("shape", D.SHAPES), ("colour", D.COLOURS), ("size", D.SIZES), ("position", D.POSITIONS)):
        assert all(seen[(kind, v)] > 0 for v in values), kind
    assert all(seen[("background", c)] > 0 for c in D.COLOURS)
    assert len(D.SHAPES) >= 6 and len(D.PALETTE) >= 8


def test_render_draws_the_palette_colours():
    obj = D.SceneObject("square", "red", "large", "centre", (64.0, 64.0), 25.0)
    img = D.render(D.Scene((obj,), "blue"))
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert tuple(img[64, 64]) == D.PALETTE["red"] and tuple(img[2, 2]) == D.PALETTE["blue"]


def test_held_out_combinations_never_reach_the_training_sampler():
    for s in _scenes(4000, 21, allow="train"):
        assert not D.is_held_out(s)
        for o in s.objects:
            assert (o.colour, o.shape) not in D.HELD_OUT_COLOUR_SHAPE
            assert (o.shape, o.position) not in D.HELD_OUT_SHAPE_POSITION
    held = D.held_out_scenes(600, seed=0)
    assert all(D.is_held_out(s) for s in held)
    combos = {(o.colour, o.shape) for s in held for o in s.objects} | {(o.shape, o.position) for s in held for o in s.objects}
    assert D.HELD_OUT_COLOUR_SHAPE <= combos and D.HELD_OUT_SHAPE_POSITION <= combos
    # the prompts name the reserved combination, fully specified
    for text in D.held_out_prompts(200, seed=0):
        intent = D.parse_prompt(text)
        assert intent.background is not None
        assert all(None not in o for o in intent.objects)
        assert any(D.object_held_out(o.colour, o.shape, o.position) for o in intent.objects), text
    # every reserved pairing's parts are still trained, with other partners
    trained = Counter((o.colour, o.shape, o.position) for s in _scenes(3000, 22, allow="train") for o in s.objects)
    for colour, shape in D.HELD_OUT_COLOUR_SHAPE:
        assert any(c == colour for c, _, _ in trained) and any(sh == shape for _, sh, _ in trained)
    # the example prompt of the README is a training combination
    (red_circle,) = D.parse_prompt(D.DEFAULT_PROMPT).objects
    assert (red_circle.colour, red_circle.shape) not in D.HELD_OUT_COLOUR_SHAPE


# --- prompt parsing ---------------------------------------------------------------------------


def test_parse_prompt_round_trips_captions():
    rng = np.random.default_rng(9)
    templates_seen = set()
    for s in _scenes(1500, 8, allow="all"):
        text = D.caption(s, rng)
        intent = D.parse_prompt(text)
        assert len(intent.objects) == len(s.objects), text
        assert intent.background in (None, s.background), text
        for want in intent.objects:  # the caption may list the objects in either order
            matches = [
                o for o in s.objects
                if (o.colour, o.shape) == (want.colour, want.shape)
                and want.size in (None, o.size)
                and want.position in (None, o.position)
            ]
            assert matches, (text, s)
        if len(s.objects) == 2:
            assert all(o.position is not None for o in intent.objects), text
        templates_seen.add((len(s.objects), "background" in text, text.split()[1] in D.COLOURS and "background" in text.split()[:4]))
        assert D.parse_prompt(D.full_caption(s)) == D.scene_intent(s)
    assert len(templates_seen) >= 5


@pytest.mark.parametrize(
    "text, objects, background",
    [
        ("a red circle on a blue background", [("red", "circle", None, None)], "blue"),
        ("a small green triangle above a red circle", [("green", "triangle", "small", "top"), ("red", "circle", None, "bottom")], None),
        (
            "a red circle on the left and a blue star on the right",
            [("red", "circle", None, "left"), ("blue", "star", None, "right")],
            None,
        ),
        ("A Large ORANGE square in the center, white background", [("orange", "square", "large", "centre")], "white"),
        ("a black background with a tiny pink cross at the bottom", [("pink", "cross", "small", "bottom")], "black"),
        ("a big yellow diamond to the right of a purple star", [("yellow", "diamond", "large", "right"), ("purple", "star", None, "left")], None),
        ("a brown star below a white square", [("brown", "star", None, "bottom"), ("white", "square", None, "top")], None),
        ("a photograph of a cat", [], None),
    ],
)
def test_parse_prompt_examples(text, objects, background):
    intent = D.parse_prompt(text)
    assert [tuple(o) for o in intent.objects] == objects
    assert intent.background == background


def test_captions_use_the_right_article():
    obj = D.SceneObject("circle", "orange", "small", "left", (32.0, 64.0), 12.0)
    caps = {D.caption(D.Scene((obj,), "white"), np.random.default_rng(i)) for i in range(40)}
    assert any(c.startswith("an orange circle") for c in caps) and not any(" a orange" in c or c.startswith("a orange") for c in caps)


# --- evaluator --------------------------------------------------------------------------------


def test_label_components_matches_connectivity():
    m = np.zeros((8, 10), bool)
    m[1:3, 1:3] = True  # a square
    m[3, 3] = True  # touches it only diagonally
    m[5:7, 6:9] = True
    m[0, 9] = True
    labels, n = E.label_components(m, connectivity=8)
    assert n == 3 and labels[1, 1] == labels[3, 3] and len(np.unique(labels[m])) == 3
    labels4, n4 = E.label_components(m, connectivity=4)
    assert n4 == 4 and labels4[1, 1] != labels4[3, 3]
    assert ((labels > 0) == m).all() and E.label_components(np.zeros((4, 4), bool))[1] == 0
    # a U shape joins through its bottom row
    u = np.zeros((6, 7), bool)
    u[0:5, 1] = u[0:5, 5] = u[4, 1:6] = True
    assert E.label_components(u)[1] == 1


def test_evaluator_recovers_ground_truth(ground_truth):
    images, scenes = ground_truth
    acc = E.accuracy(images, [D.scene_intent(s) for s in scenes])
    assert acc["n"] == len(scenes)
    assert acc["colour"] >= 0.98 and acc["shape"] >= 0.95 and acc["position"] >= 0.98, acc
    assert acc["size"] >= 0.98 and acc["background"] >= 0.98 and acc["count"] >= 0.98, acc
    for k in (1, 2):  # single and two-object scenes separately
        idx = [i for i, s in enumerate(scenes) if len(s.objects) == k]
        sub = E.accuracy([images[i] for i in idx], [D.scene_intent(scenes[i]) for i in idx])
        assert sub["shape"] >= 0.95 and sub["colour"] >= 0.98 and sub["position"] >= 0.98, (k, sub)


def test_evaluator_per_shape_and_from_captions(ground_truth):
    images, scenes = ground_truth
    per_shape = Counter()
    wrong = Counter()
    for img, s in zip(images[::2], scenes[::2]):
        r = E.evaluate(img, D.scene_intent(s))
        for o, ro in zip(s.objects, r["objects"]):
            per_shape[o.shape] += 1
            wrong[o.shape] += not ro["shape"]
    for shape in D.SHAPES:
        assert per_shape[shape] >= 10 and wrong[shape] <= 0.05 * per_shape[shape], (shape, wrong)
    rng = np.random.default_rng(0)
    captions = [D.caption(s, rng) for s in scenes[1::4]]
    acc = E.accuracy(images[1::4], captions)
    assert acc["colour"] >= 0.98 and acc["shape"] >= 0.95 and acc["position"] >= 0.98 and acc["all"] >= 0.95, acc


def test_evaluator_accepts_float_and_pil_images(ground_truth):
    images, scenes = ground_truth
    for img, s in zip(images[:6], scenes[:6]):
        intent = D.scene_intent(s)
        ref = E.evaluate(img, intent)["all"]
        assert ref
        assert E.evaluate(img.astype(np.float32) / 255.0, intent)["all"] == ref
        assert E.evaluate(Image.fromarray(img), intent)["all"] == ref
    with pytest.raises(ValueError):
        E.to_uint8(np.zeros((3, 8, 8)))


def test_evaluator_tolerates_blur_noise_and_upsampling(ground_truth):
    """A model's output is softer than the renders: blur, noise and 2x upsampling cost little."""
    images, scenes = ground_truth
    rng = np.random.default_rng(1)
    soft = []
    for img in images[::3]:
        p = Image.fromarray(img).resize((64, 64), Image.BILINEAR).resize((128, 128), Image.BICUBIC)
        a = np.asarray(p.filter(ImageFilter.GaussianBlur(1.0)), np.float32) + rng.normal(0, 10, img.shape)
        soft.append(np.clip(a, 0, 255).astype(np.uint8))
    acc = E.accuracy(soft, [D.scene_intent(s) for s in scenes[::3]])
    assert acc["colour"] >= 0.97 and acc["shape"] >= 0.9 and acc["position"] >= 0.97, acc


def test_evaluator_rejects_wrong_prompts(ground_truth):
    """Negative control: images scored against other scenes' prompts are mostly wrong."""
    images, scenes = ground_truth
    single = [(img, s) for img, s in zip(images, scenes) if len(s.objects) == 1][:120]
    imgs = [img for img, _ in single]
    shifted = [D.scene_intent(s) for _, s in single[1:] + single[:1]]
    acc = E.accuracy(imgs, shifted)
    assert acc["colour"] < 0.3 and acc["shape"] < 0.4 and acc["all"] < 0.05, acc
    blank = np.full((128, 128, 3), D.PALETTE["blue"], np.uint8)
    r = E.evaluate(blank, D.DEFAULT_PROMPT)
    assert r["background"] is True and r["objects"][0]["found"] is False and not r["all"]


def test_evaluator_runs_without_torch():
    code = textwrap.dedent(
        """
        import sys
        for name in ("torch", "diffusers", "transformers", "scipy"):
            sys.modules[name] = None  # importing any of them now raises
        from sdrt.export.default_model import data, evaluate
        scene = data.sample_scene(__import__("numpy").random.default_rng(0))
        assert evaluate.evaluate(data.render(scene), data.full_caption(scene))["all"]
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
