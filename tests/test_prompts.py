"""Prompts as users write them (sdrt.runtime.prompts): compel's and AUTOMATIC1111's weighting syntaxes, prompts
longer than the text encoder's 77 tokens, and diffusers' prompt_embeds, each against its reference:

- compel: diffusers' pipeline fed the embeddings of compel's own recipe (CompelForSD / CompelForSDXL on the
  diffusers pipeline of the same checkpoint), against sdrt reading the same text with prompt_syntax="compel";
- a1111: a reference written here from AUTOMATIC1111's documented rules (modules/prompt_parser.py,
  modules/sd_hijack_clip.py, EmphasisOriginal) on the torch text encoders, fed to diffusers as embeddings;
- prompt_embeds: diffusers and sdrt given the same arrays.

Images are compared as in test_parity (output_type "np", max abs difference of [0, 1] pixels), both sides
starting from the same latents with a deterministic scheduler.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
compel = pytest.importorskip("compel")

from test_parity import SIZE, TOL, reference, sdrt_pipeline, single_thread  # noqa: E402,F401  (fixtures)

from sdrt.runtime.errors import ConfigError, GenerationError  # noqa: E402
from sdrt.runtime.prompts import a1111_fragments, compel_fragments  # noqa: E402
from sdrt.runtime.tokenizer import PromptTruncatedWarning  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

FAMILIES = ("sd1", "sdxl")
STEPS, GUIDANCE, SCHEDULER = 3, 7.5, "euler"
SHORT = "a (red cat)1.3 sitting on a mat--, (blurry background)0.6, (highly detailed)++"
LONG = " ".join(
    f"a (very detailed)1.2 oil painting of a {colour} castle on a hill-- under a (stormy sky)0.7 at dusk, "
    f"with {animal}+ in the (foreground)1.1."
    for colour, animal in [("red", "horses"), ("blue", "dogs"), ("green", "birds"), ("gold", "deer"),
                           ("white", "wolves"), ("black", "cats"), ("grey", "foxes"), ("pink", "owls")]
)
A1111_LONG = (
    "masterpiece, (best quality:1.3), a ((castle)) on a [hill], \\(fortified\\) walls, " * 6
    + "BREAK (stormy sky:0.8), [[ravens]], (lightning:1.4)"
)


def _latents(family_pipe, batch: int) -> np.ndarray:
    m = family_pipe.manifest
    shape = (batch, m["latent_channels"], SIZE // m["vae_scale_factor"], SIZE // m["vae_scale_factor"])
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def _run_both(ref, ours, diffusers_call: dict, sdrt_call: dict, per_prompt: int = 1):
    """(sdrt's output, diffusers' images) of test_parity's Reference ``ref`` and sdrt's Pipeline ``ours`` from the
    same latents; asserts pixel parity."""
    pipe = ref.txt2img
    pipe.scheduler = ref.scheduler(SCHEDULER, {})
    batch = per_prompt * (len(sdrt_call["prompt"]) if isinstance(sdrt_call.get("prompt"), list) else 1)
    latents = _latents(ours, batch)
    common = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                  num_images_per_prompt=per_prompt, output_type="np")
    with torch.no_grad():
        expected = pipe(**diffusers_call, **common, latents=torch.from_numpy(latents)).images
    out = ours(**sdrt_call, **common, latents=latents, scheduler=SCHEDULER)
    assert out.images.shape == expected.shape
    err = float(np.abs(out.images - expected).max())
    assert err <= TOL, f"max abs pixel difference {err:.3g} > {TOL}"
    return out, expected


# ---------------------------------------------------------------------------------------------- compel


COMPEL_PROMPTS = [
    "a cat++ on (the mat)1.3, well-known", "(a (b c)0.5 d)1.2", "word-- x", "(cat) .attend(1.2) dog", "a,b",
    "(a=b) c", '"quoted text"1.2 e', "(1.5 stars)", "cat+dog x.y+ don't++", "hello(world)1.3", "(cat)(dog)1.2",
    "(a, b.)+ c", "\\(x\\) y", "(a - b)", "", "a (red)+. b", "((a)1.2 (b)0.8)-- c", "(x)0", "x.attend(1.3) y",
    "(nested (deeply (here)1.5)-)+", '"a" "b"1.1 "c"-', '(a "b c"1.3)', "one. two, three; four: five", SHORT,
]


@pytest.mark.parametrize("text", COMPEL_PROMPTS)
def test_compel_fragments_are_compels_own(text):
    """The same (text, weight) fragments as compel's pyparsing grammar (PromptParser, flattened)."""
    from compel.prompt_parser import PromptParser

    conjunction = PromptParser().parse_conjunction(text)
    expected = [(f.text, f.weight) for f in conjunction.prompts[0].children] if conjunction.prompts else [("", 1.0)]
    assert compel_fragments(text) == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt,negative", [(SHORT, None), (LONG, "ugly, (low quality)1.2, blurry-")],
                         ids=["short", "long-with-negative"])
def test_compel_matches_diffusers_fed_compels_embeddings(reference, sdrt_pipeline, family, prompt, negative):
    """compel's recipe: CompelForSD(pipe) / CompelForSDXL(pipe), its embeddings passed to diffusers."""
    ref = reference(family).txt2img
    recipe = compel.CompelForSDXL(ref) if family == "sdxl" else compel.CompelForSD(ref)
    with torch.no_grad():
        c = recipe(prompt, negative_prompt=negative)
    if prompt is LONG:
        assert len(sdrt_pipeline(family).tokenizers[0].tokens([prompt])[0]) > 200
        assert c.embeds.shape[1] >= 77 * 3 and c.negative_embeds.shape == c.embeds.shape  # negative padded
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    given = dict(zip(names, (c.embeds, c.negative_embeds, c.pooled_embeds, c.negative_pooled_embeds)))
    _run_both(reference(family), sdrt_pipeline(family), {k: v for k, v in given.items() if v is not None},
              dict(prompt=prompt, negative_prompt=negative, prompt_syntax="compel"))


# ---------------------------------------------------------------------------------------------- AUTOMATIC1111

# AUTOMATIC1111's own documented examples (parse_prompt_attention's docstring), the unbalanced one balanced
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
]


@pytest.mark.parametrize("text,expected", A1111_EXAMPLES)
def test_a1111_fragments_as_documented(text, expected):
    assert a1111_fragments(text) == expected


_A1111_TOKENS = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")


def a1111_reference(pipe, text: str, encoders: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AUTOMATIC1111's conditioning of ``text``, from its rules: ( ) multiply by 1.1, [ ] divide by 1.1,
    (x:w) by w, nested brackets multiply; BREAK starts a chunk; 75 tokens a chunk, one that would end within 20
    tokens after a comma ending at it; BOS + tokens + EOS, padded; per chunk z *= w, z *= mean(z) / mean(z w);
    chunks concatenated; SDXL's pooled embedding from the first chunk. ``encoders``: (tokenizer, encode)."""
    res, rounds, squares = [], [], []
    for m in _A1111_TOKENS.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece in ("(", "["):
            (rounds if piece == "(" else squares).append(len(res))
        elif piece in (")", "]") or weight is not None:
            start = (rounds if piece != "]" else squares).pop()
            factor = float(weight) if weight is not None else (1.1 if piece == ")" else 1 / 1.1)
            for item in res[start:]:
                item[1] *= factor
        else:
            for i, part in enumerate(re.split(r"\s*\bBREAK\b\s*", piece)):
                res += ([["BREAK", -1]] if i else []) + [[part, 1.0]]
    states, pooled = [], None
    for tok, encode in encoders:
        chunks, chunk, last_comma = [], [], -1

        def close():
            nonlocal chunk, last_comma
            chunks.append(chunk)
            chunk, last_comma = [], -1

        comma = tok.convert_tokens_to_ids(",</w>")
        for piece, weight in res:
            if (piece, weight) == ("BREAK", -1):
                close()
                continue
            for t in tok(piece, add_special_tokens=False).input_ids:
                if t == comma:
                    last_comma = len(chunk)
                elif len(chunk) == 75 and last_comma != -1 and len(chunk) - last_comma <= 20:
                    moved, chunk = chunk[last_comma + 1:], chunk[:last_comma + 1]
                    close()
                    chunk = moved
                if len(chunk) == 75:
                    close()
                chunk.append((t, weight))
        if chunk or not chunks:
            close()
        zs = []
        for i, c in enumerate(chunks):
            ids = [tok.bos_token_id] + [t for t, _ in c] + [tok.eos_token_id] * (76 - len(c))
            ids[len(c) + 2:] = [tok.pad_token_id] * (75 - len(c))  # after the first EOS: the model's padding
            w = torch.tensor([1.0] + [w for _, w in c] + [1.0] * (76 - len(c)))
            z, chunk_pooled = encode(torch.tensor([ids]))
            if i == 0:
                pooled = chunk_pooled if chunk_pooled is not None else pooled
            mean = z.mean()
            z = z * w[None, :, None]
            zs.append(z * (mean / z.mean()))
        states.append(torch.cat(zs, dim=1))
    return torch.cat(states, dim=-1), pooled


def _a1111_encoders(pipe, family):
    def last(encoder):
        return lambda ids: (encoder(ids).last_hidden_state, None)

    def penultimate(encoder, pooled):
        def run(ids):
            out = encoder(ids, output_hidden_states=True)
            return out.hidden_states[-2], out.text_embeds if pooled else None
        return run

    if family == "sdxl":
        return [(pipe.tokenizer, penultimate(pipe.text_encoder, False)), (pipe.tokenizer_2, penultimate(pipe.text_encoder_2, True))]
    return [(pipe.tokenizer, last(pipe.text_encoder))]


@pytest.fixture(scope="module")
def sd1_with_trained_norm(checkpoint, tmp_path_factory):
    """(Reference, Pipeline) of the sd1 checkpoint with a bias in its text encoder's final layer norm, as trained CLIP
    towers have. A freshly initialised one (bias 0) makes every token's hidden state average to 0, where the
    webui's rescaling to the unweighted mean divides rounding noise by rounding noise."""
    import shutil

    from test_parity import Reference
    from transformers import CLIPTextModel

    from sdrt.export.exporter import export_model
    from sdrt.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("sd1-trained-norm")
    shutil.copytree(checkpoint("sd1"), root / "checkpoint")
    te = CLIPTextModel.from_pretrained(root / "checkpoint" / "text_encoder")
    with torch.no_grad():
        norm = next(m for name, m in te.named_modules() if name.endswith("final_layer_norm"))
        norm.bias.normal_(0.3, 0.5, generator=torch.Generator().manual_seed(0))
    te.save_pretrained(root / "checkpoint" / "text_encoder")
    export_model(root / "checkpoint", root / "model", overwrite=True, log=lambda *_: None)
    pipe = Pipeline.load(root / "model", backend="ort-cpu", threads=1)
    yield Reference(root / "checkpoint"), pipe
    pipe.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_a1111_matches_a_reference_from_its_rules(request, reference, sdrt_pipeline, family):
    both = request.getfixturevalue("sd1_with_trained_norm") if family == "sd1" else (reference(family), sdrt_pipeline(family))
    ref = both[0].txt2img
    negative = "(blurry:1.2), [low quality]"
    with torch.no_grad():
        encoders = _a1111_encoders(ref, family)
        cond, pooled = a1111_reference(ref, A1111_LONG, encoders)
        uncond, negative_pooled = a1111_reference(ref, negative, encoders)
        empty, _ = a1111_reference(ref, "", encoders)
    assert cond.shape[1] == 77 * 3  # 2 chunks of text, the second moved back to a comma, and one after BREAK
    uncond = torch.cat([uncond] + [empty] * ((cond.shape[1] - uncond.shape[1]) // 77), dim=1)  # pad_cond_uncond
    given = dict(prompt_embeds=cond, negative_prompt_embeds=uncond)
    if family == "sdxl":
        given.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
    _run_both(*both, given, dict(prompt=A1111_LONG, negative_prompt=negative, prompt_syntax="a1111"))


# ---------------------------------------------------------------------------------------------- prompt_embeds


def _embeds(pipe, rows: int, length: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    unet = pipe.manifest["components"]["unet"]["inputs"]
    out = {"prompt_embeds": rng.standard_normal((rows, length, unet[2]["shape"][-1]), dtype=np.float32)}
    if len(unet) > 3:  # SDXL: text_embeds
        out["pooled_prompt_embeds"] = rng.standard_normal((rows, unet[3]["shape"][-1]), dtype=np.float32)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_embeds_match_diffusers(reference, sdrt_pipeline, family):
    """Two chunks of conditioning (154 tokens), negatives given, two images per prompt: as diffusers takes them."""
    pipe = sdrt_pipeline(family)
    given = {**_embeds(pipe, 1, 154, 1), **{f"negative_{k}": v for k, v in _embeds(pipe, 1, 154, 2).items()}}
    out, _ = _run_both(reference(family), pipe, {k: torch.from_numpy(v) for k, v in given.items()}, given, per_prompt=2)
    assert out.parameters["prompt"] is None and out.parameters["prompt_embeds"] == list(given["prompt_embeds"].shape)


def test_prompt_embeds_with_a_text_negative_prompt(reference, sdrt_pipeline):
    given = _embeds(sdrt_pipeline("sd1"), 1, 77, 3)
    _run_both(reference("sd1"), sdrt_pipeline("sd1"), dict(**{k: torch.from_numpy(v) for k, v in given.items()},
                                                            negative_prompt="blurry"), dict(**given, negative_prompt="blurry"))


# ---------------------------------------------------------------------------------------------- behaviour, errors


@pytest.mark.parametrize("family", FAMILIES)
def test_export_gives_the_unet_77k_tokens_and_the_text_encoders_an_attention_mask(model_dir, family):
    from sdrt.runtime.manifest import load_manifest

    m = load_manifest(model_dir(family))
    unet = m["components"]["unet"]
    assert unet["inputs"][2]["shape"][1] == "text_length"
    assert sorted(s["encoder_hidden_states"][1] for s in unet["validation"]["shapes"]) == [77, 154]  # both validated
    for name in ("text_encoder", "text_encoder_2")[: len(m["tokenizers"])]:
        assert [t["name"] for t in m["components"][name]["inputs"]] == ["input_ids", "attention_mask"]



def test_default_syntax_still_truncates_with_a_warning(sdrt_pipeline):
    with pytest.warns(PromptTruncatedWarning, match="were dropped"):
        out = sdrt_pipeline("sd1")("(word)1.3 " * 40, num_inference_steps=1, height=SIZE, width=SIZE, output_type="np")
    assert "prompt_syntax" not in out.parameters


def _call(pipe, **kw):
    return pipe(**{"num_inference_steps": 1, "height": SIZE, "width": SIZE, "output_type": "np", **kw})


@pytest.mark.parametrize(
    "syntax,text,match",
    [
        ("compel", "a (red cat", r"unbalanced '\(' at position 2"),
        ("compel", "a red cat)1.2", r"unbalanced '\)' at position 9"),
        ("a1111", "a [red cat", r"unbalanced '\[' at position 2"),
        ("a1111", "a (red cat))", r"unbalanced '\)' at position 11"),
        ("compel", "a (red cat)1.5x", r"weight '1.5x' is not a number at position 11"),
        ("compel", "a (red cat).attend(much)", r"weight in .attend\(\) is not a number"),
        ("a1111", "a (red cat:much)", r"weight 'much' is not a number at position 10"),
        ("a1111", "a (red cat:1.2.3)", r"weight '1.2.3' is not a number"),
        ("compel", "(a cat, a dog).blend(1, 1)", r"blend\(\) is not supported"),
    ],
)
def test_bad_prompt_syntax_is_an_error_naming_the_position(sdrt_pipeline, syntax, text, match):
    with pytest.raises(GenerationError, match=match):
        _call(sdrt_pipeline("sd1"), prompt=text, prompt_syntax=syntax)
    with pytest.raises(GenerationError, match=match):  # the negative prompt too
        _call(sdrt_pipeline("sd1"), prompt="a cat", negative_prompt=text, prompt_syntax=syntax)


def test_unknown_prompt_syntax(sdrt_pipeline):
    with pytest.raises(ConfigError, match="prompt_syntax 'comple' is not one sdrt reads; use one of none, compel, a1111"):
        _call(sdrt_pipeline("sd1"), prompt="a cat", prompt_syntax="comple")


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_embeds_are_errors_saying_what_was_expected(sdrt_pipeline, family):
    pipe = sdrt_pipeline(family)
    good = _embeds(pipe, 1, 77, 0)
    d = good["prompt_embeds"].shape[-1]
    with pytest.raises(GenerationError, match="both prompt and prompt_embeds were given"):
        _call(pipe, prompt="a cat", **good)
    with pytest.raises(GenerationError, match=rf"prompt_embeds has shape \(1, 77, {d + 1}\), expected \(N, N, {d}\)"):
        _call(pipe, **{**good, "prompt_embeds": np.zeros((1, 77, d + 1), np.float32)})
    with pytest.raises(GenerationError, match=rf"negative_prompt_embeds has shape \(1, 154, {d}\), expected \(1, 77, {d}\)"):
        _call(pipe, **good, **{f"negative_{k}": np.zeros((1, 154) + v.shape[2:], np.float32) if v.ndim == 3 else v
                               for k, v in good.items()})
    with pytest.raises(GenerationError, match="give a prompt"):
        _call(pipe)
    if family == "sdxl":
        with pytest.raises(GenerationError, match="prompt_embeds needs pooled_prompt_embeds too"):
            _call(pipe, prompt_embeds=good["prompt_embeds"])
        p = good["pooled_prompt_embeds"].shape[-1]
        with pytest.raises(GenerationError, match=rf"pooled_prompt_embeds has shape \(1, {p - 1}\), expected \(1, {p}\)"):
            _call(pipe, **{**good, "pooled_prompt_embeds": np.zeros((1, p - 1), np.float32)})
    else:
        with pytest.raises(GenerationError, match="pooled_prompt_embeds is for SDXL models"):
            _call(pipe, **good, pooled_prompt_embeds=np.zeros((1, 8), np.float32))


def test_a_unet_exported_with_77_tokens_refuses_a_long_prompt(sdrt_pipeline, monkeypatch):
    pipe = sdrt_pipeline("sd1")
    old = copy.deepcopy(pipe.manifest)
    old["components"]["unet"]["inputs"][2]["shape"][1] = 77  # as sdrt exported UNets before
    monkeypatch.setattr(pipe, "manifest", old)
    _call(pipe, prompt=SHORT, prompt_syntax="compel")  # one chunk: fine
    with pytest.raises(GenerationError, match="needs 231 tokens of text conditioning and this model's UNet takes 77; re-export"):
        _call(pipe, prompt=LONG, prompt_syntax="compel")


def test_down_weighting_needs_a_text_encoder_with_an_attention_mask(sdrt_pipeline, monkeypatch):
    pipe = sdrt_pipeline("sd1")
    old = copy.deepcopy(pipe.manifest)
    old["components"]["text_encoder"]["inputs"] = old["components"]["text_encoder"]["inputs"][:1]
    monkeypatch.setattr(pipe, "manifest", old)
    monkeypatch.setitem(pipe.engines, "text_encoder", _no_mask)
    with pytest.raises(GenerationError, match="takes no attention mask, which compel's down-weighting .* needs; re-export"):
        _call(pipe, prompt="a cat, (blurry)0.5", prompt_syntax="compel")


def _no_mask(**feed):
    raise AssertionError(f"the text encoder ran with {sorted(feed)}")


def test_cli_prompt_syntax(model_dir, tmp_path, capsys):
    from sdrt.cli import main
    from sdrt.runtime.images import read_parameters

    args = ["generate", "(a red circle)1.3 on a blue-- background", "--model", str(model_dir("sd1")), "--steps", "1",
            "--height", "64", "--width", "64", "--prompt-syntax"]
    assert main(args + ["compel", "--out", str(tmp_path / "c.png")]) == 0
    assert read_parameters(tmp_path / "c.png")["prompt_syntax"] == "compel"
    assert main(args[:1] + ["a (red circle", *args[2:], "a1111", "--out", str(tmp_path / "a.png")]) == 1
    assert "unbalanced '('" in capsys.readouterr().err
