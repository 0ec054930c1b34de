"""Prompts as users write them: compel's and AUTOMATIC1111's weighting syntaxes, and prompts longer than
the text encoder's 77 tokens, encoded in 77-token chunks whose hidden states are concatenated.

    tokens = tokenize(texts, "compel", tokenizers)    # "none": diffusers' own truncation, no weighting
    cond = tokens.encode(family, engines, manifest)    # (B, 77·k, D), padded to the longest prompt

``compel`` reproduces compel 2.x as its recipes for diffusers set it up (``CompelForSD(pipe)``,
``CompelForSDXL(pipe)``: compel/convenience_wrappers.py): its grammar (compel/prompt_parser.py) for
``word+``, ``word--``, ``(several words)1.3``, ``"quoted words"0.8``, ``(words).attend(1.2)``, nested; no
truncation, so 75 tokens a chunk, split at the last sentence end (else phrase end, else word end) that fits;
each weighted token moved from the empty prompt's embedding z_0 by its weight, z_0 + (z - z_0)·w; and every
fragment weighted below 1 also masked out of the text encoder's attention in a second embedding, towards
which the result is lerped by tan((1 - w)·π/2) (compel's DownweightMode.MASK, its default). SDXL's pooled
embedding is that of the whole prompt text, truncated (EmbeddingsProvider.get_pooled_embeddings).

``a1111`` reproduces AUTOMATIC1111's webui (modules/prompt_parser.py parse_prompt_attention,
modules/sd_hijack_clip.py, sd_emphasis.EmphasisOriginal): ``(words)`` ×1.1, ``[words]`` ÷1.1, ``(words:1.3)``,
nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` escapes, ``BREAK`` starts a new chunk; 75 tokens a chunk
(a chunk that would end within 20 tokens after a comma ends at the comma instead), each wrapped as
BOS, tokens, EOS, padding; each chunk's hidden states multiplied by their tokens' weights, then rescaled so
their mean is the unweighted mean; SDXL's pooled embedding is the first chunk's. Unlike the webui, brackets
that do not pair up are an error here, not text.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, GenerationError
from .families import Conditioning

SYNTAXES = ("none", "compel", "a1111")
CHUNK = 75  # tokens a chunk holds between its BOS and EOS


def syntax_name(name: str | None) -> str:
    if name is None:
        return "none"
    if name not in SYNTAXES:
        raise ConfigError(f"prompt_syntax {name!r} is not one sdrt reads; use one of {', '.join(SYNTAXES)}")
    return name


def _error(text: str, pos: int, what: str, todo: str) -> GenerationError:
    return GenerationError(f"prompt {text!r}: {what} at position {pos} ({text[pos:pos + 12]!r}...); {todo}")


def check_brackets(text: str, pairs: str, escapable: str) -> None:
    """Each opening bracket of ``pairs`` ("()" or "()[]") closed in order; ``\\`` escapes those of ``escapable``."""
    stack, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in escapable:
            i += 2
            continue
        if c in pairs[0::2]:
            stack.append(i)
        elif c in pairs[1::2]:
            opener = pairs[pairs.index(c) - 1]
            if not stack or text[stack[-1]] != opener:
                raise _error(text, i, f"unbalanced {c!r}", f"remove it, open it with {opener!r}, or escape it as '\\{c}'")
            stack.pop()
        i += 1
    if stack:
        c = text[stack[-1]]
        close = pairs[pairs.index(c) + 1]
        raise _error(text, stack[-1], f"unbalanced {c!r}", f"close it with {close!r} or escape it as '\\{c}'")


# ---------------------------------------------------------------------------------------------- compel's grammar

_SYNTAX = '()",.+-='  # compel's syntactic characters; \-escaped they are text
_ESCAPES = tuple("\\" + c for c in _SYNTAX)
_WHITE = " \t\r\n"  # pyparsing's whitespace
_PLUSES, _MINUSES = re.compile(r"\++"), re.compile(r"-+")
_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)|-?\d+")
_QUOTED = re.compile(r'"((?:\\"|[^"\n\r])*)"')
_UNSUPPORTED = re.compile(r'[)"]\s*\.(blend|and|add|swap)\s*\(|\b(use|with)Lora\s*\(')


@dataclass
class _Weighted:
    weight: float
    nodes: list


class _CompelParser:
    """compel's grammar (compel/prompt_parser.py build_parser_syntax) read by recursive descent, as far as
    weighting goes. A node is a text fragment (str), a group (list of nodes) or a _Weighted group. Where
    compel's grammar reads no syntax, the text stays text, as there: at the top level a word that is not
    weighted runs to the next whitespace, brackets and all."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def peek(self, chars: str) -> bool:
        return self.i < len(self.s) and self.s[self.i] in chars

    def skip_white(self) -> None:
        while self.peek(_WHITE):
            self.i += 1

    def first(self, *rules):
        """The first rule that matches here (pyparsing's MatchFirst), or None with the position kept."""
        start = self.i
        for rule in rules:
            node = rule()
            if node is not None:
                return node
            self.i = start
        return None

    def prompt(self) -> list:
        nodes = []
        while self.i < len(self.s):
            if self.s[self.i].isspace():
                self.i += 1
            else:
                nodes.append(self.first(self.attention, self.group, self.free_word))
        return nodes

    def inner(self) -> list:
        """What a group holds: words, commas and full stops, groups; whitespace between."""
        nodes = []
        while True:
            self.skip_white()
            node = self.first(self.attention, self.group, self.word, self.punctuation)
            if node is None:
                return nodes
            nodes.append(node)

    def attention(self) -> _Weighted | None:
        """``target.attend(w)``; ``(group)w`` or ``"group"w`` with w a run of + or -, or a number; ``word+``."""
        start = self.i
        target = self.first(self.group, self.word)
        weight = self.attend_call() if target is not None else None
        if weight is not None:
            return _Weighted(weight, target if isinstance(target, list) else [target])
        self.i = start
        group = self.group()
        if group is not None and not self.peek(_WHITE):
            weight = self.weight(numbers=True)
            if weight is not None:
                return _Weighted(weight, group)
        self.i = start
        word = self.word()
        if word is not None and not self.peek(_WHITE):
            weight = self.weight(numbers=False)
            if weight is not None:
                return _Weighted(weight, [word])
        return None

    def attend_call(self):
        self.skip_white()
        if not self.s.startswith(".attend", self.i):
            return None
        at = self.i
        self.i += len(".attend")
        self.skip_white()
        if self.peek("("):
            self.i += 1
            self.skip_white()
            weight = self.weight(numbers=True)
            self.skip_white()
            if weight is not None and self.peek(")"):
                self.i += 1
                return weight
        raise _error(self.s, at, "the weight in .attend() is not a number", "write .attend(1.2), .attend(+) or .attend(--)")

    def weight(self, numbers: bool) -> float | None:
        """A run of + (1.1 each) or - (0.9 each), or with ``numbers`` a number, right here."""
        for pattern, base in ((_PLUSES, 1.1), (_MINUSES, 0.9), (_NUMBER, None)):
            m = pattern.match(self.s, self.i)
            if m and (base is not None or numbers):
                self.i = m.end()
                if _runs_on(self.s[self.i:self.i + 2], number=base is None):
                    written = re.match(r"[^\s(),\"]+", self.s[m.start():]).group()
                    raise _error(self.s, m.start(), f"the weight {written!r} is not a number",
                                 "write a run of + or -, or a number such as 1.3 or 0.7, then a space")
                return pow(base, len(m.group())) if base is not None else float(m.group())
        return None

    def group(self) -> list | None:
        if self.peek("("):
            self.i += 1
            nodes = self.inner()
            self.skip_white()
            if self.peek(")"):
                self.i += 1
                return nodes
            return None
        m = _QUOTED.match(self.s, self.i) if self.peek('"') else None
        if m is None:
            return None
        self.i = m.end()
        if not m.group(1).strip():
            return [""]
        sub = _CompelParser(m.group(1))
        nodes = sub.inner()
        sub.skip_white()
        return nodes if sub.i == len(sub.s) else None

    def word(self) -> str | None:
        """A word with no syntax in it (escaped syntax characters, and + or - inside a word, allowed)."""
        start, s = self.i, self.s
        while self.i < len(s):
            if s.startswith(_ESCAPES, self.i):
                self.i += 2
            elif s[self.i] in "+-" and self.i + 1 < len(s) and s[self.i + 1] not in _WHITE + _SYNTAX:
                self.i += 1
            elif s[self.i] in string.whitespace + _SYNTAX:
                break
            else:
                self.i += 1
        return s[start:self.i] or None

    def punctuation(self) -> str | None:
        if self.peek(",."):
            self.i += 1
            return self.s[self.i - 1]
        return None

    def free_word(self) -> str:
        start = self.i
        while self.i < len(self.s) and not self.s[self.i].isspace():
            self.i += 1
        return self.s[start:self.i]


def _runs_on(after: str, number: bool) -> bool:
    """Whether the characters right after a weight show it was meant to go on (``1.2.3``, ``1.5x``, ``-0.5``,
    ``+-``), where compel would quietly read the rest as text; a full stop ending a sentence is fine."""
    c = after[:1]
    return (c.isalnum() if number else c.isdigit()) or (c != "" and c in "+-") or (c == "." and after[1:2].isdigit())


def _unescape(text: str) -> str:
    """compel's Fragment: \\( \\) \\" become the characters themselves (other escapes stay as written)."""
    return text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')


def _flatten(nodes: list, scale: float = 1.0) -> list[tuple[str, float]]:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append((_unescape(node), 1.0 * scale))
        elif isinstance(node, _Weighted):
            out += _flatten(node.nodes, scale * node.weight)
        else:
            out += _flatten(node, scale)
    return out


def compel_fragments(text: str) -> list[tuple[str, float]]:
    """(text, weight) fragments of a prompt in compel's syntax, neighbours of equal weight joined with a space
    (compel's PromptParser.parse_conjunction and flatten)."""
    check_brackets(text, "()", "()")
    m = _UNSUPPORTED.search(text)
    if m:
        raise _error(text, m.start(), f"compel's {m.group(1) or m.group(2) + 'Lora'}() is not supported",
                     "sdrt reads compel's weighting only")
    text = re.sub(r",(\S)", r", \1", text)  # compel makes every comma followed by a space
    frags: list[tuple[str, float]] = []
    for piece, weight in _flatten(_CompelParser(text).prompt()) if text.strip() else []:
        if frags and frags[-1][1] == weight:
            frags[-1] = (_unescape(frags[-1][0] + " " + piece), weight)
        else:
            frags.append((piece, weight))
    return frags or [("", 1.0)]


# ---------------------------------------------------------------------------------------------- A1111's grammar

_ATTENTION = re.compile(r"""\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:""")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_WORD_WEIGHT = re.compile(r":\s*([^\s()\[\]:]+)\s*\)")
BREAK = ("BREAK", -1.0)


def a1111_fragments(text: str) -> list[tuple[str, float]]:
    """(text, weight) fragments of a prompt in AUTOMATIC1111's syntax, neighbours of equal weight joined, with
    BREAK as ("BREAK", -1) (modules/prompt_parser.py parse_prompt_attention)."""
    check_brackets(text, "()[]", "()[]\\")
    res: list[list] = []
    round_open, square_open = [], []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece in "([":
            (round_open if piece == "(" else square_open).append(len(res))
        elif weight is not None and round_open:
            try:
                multiply(round_open.pop(), float(weight))
            except ValueError:
                raise _error(text, m.start(), f"the weight {weight!r} is not a number", "write (text:1.3)") from None
        elif piece == ")":
            multiply(round_open.pop(), 1.1)
        elif piece == "]":
            multiply(square_open.pop(), 1 / 1.1)
        elif piece == ":" and round_open and _WORD_WEIGHT.match(text, m.start()):
            raise _error(text, m.start(), f"the weight {_WORD_WEIGHT.match(text, m.start()).group(1)!r} is not a number",
                         "write (text:1.3); a colon right before the closing bracket is read as a weight")
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    merged: list[list] = []
    for item in res or [["", 1.0]]:
        if merged and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


# ---------------------------------------------------------------------------------------------- chunks


@dataclass
class Plan:
    """How one prompt becomes hidden states through one tokenizer's text encoder: its 77-token chunks, a weight
    per token, and the attention masks of the embeddings blended into the result (compel's down-weighting; one
    all-ones mask otherwise) with their blend weights."""

    ids: np.ndarray  # (k, 77) int32
    weights: np.ndarray  # (k, 77) float32, 1 on BOS, EOS and padding
    masks: np.ndarray  # (V, k, 77) int32; masks[0] all ones
    blend: np.ndarray  # (V,) float32, summing to 1
    pooled_row: np.ndarray | None = None  # (77,) ids whose pooled embedding is the prompt's; None: the first chunk's


def _rows(tok, chunks: list[list[int]], weights: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Chunks of at most 75 tokens -> (k, 77) ids as BOS, tokens, EOS, padding, and their (k, 77) weights."""
    ids = np.stack([tok.chunk(c) for c in chunks])
    w = np.ones(ids.shape, dtype=np.float32)
    for row, ws in zip(w, weights):
        row[1:len(ws) + 1] = ws
    return ids, w


def _compel_split(tok, ids: list[int]) -> int:
    """Tokens that go into the next chunk: all that fit, else up to the last sentence end that fits, else phrase
    end, else word end (compel's SplitLongTextMode.SENTENCES, _find_next_best_split_point)."""
    if len(ids) <= CHUNK:
        return CHUNK
    strings = tok.token_strings(ids[:CHUNK])
    for ends in (lambda t: t == ".</w>", lambda t: t in (".</w>", ",</w>", ";</w>", ":</w>"), lambda t: t.endswith("</w>")):
        for i in reversed(range(len(strings))):
            if ends(strings[i]):
                return i + 1
    return CHUNK


def _fragment_spans(tok, flat: list[int], pieces: list[list[int]]) -> list[tuple[int, int] | None]:
    """Where each fragment's tokens lie in the chunked ids, first and last index (compel's
    _get_token_ranges_for_fragments: the search steps over BOS, EOS and padding at chunk boundaries)."""
    boundary = {tok.bos_id, tok.eos_id, tok.pad_id}
    spans, start = [], 0
    for piece in pieces:
        if not piece:
            spans.append(None)
            continue
        while start < len(flat) - 1 and flat[start] != piece[0]:
            start += 1
        end, j = start, 0
        while end < len(flat) - 1:
            if flat[end] == piece[j]:
                j += 1
                if j == len(piece):
                    break
            elif flat[end] not in boundary:
                break
            end += 1
        if j < len(piece):
            raise GenerationError(f"could not find the tokens of the prompt fragment {tok.token_strings(piece)} in its chunks")
        spans.append((start, end))
        start = end + 1
    return spans


def compel_plan(tok, text: str, with_pooled: bool) -> Plan:
    """compel's EmbeddingsProvider.get_token_ids_and_expand_weights and _chunk_and_pad_token_ids (no
    truncation), with one masked embedding per fragment weighted below 1."""
    frags = compel_fragments(text)
    pieces = tok.tokens([t for t, _ in frags])
    ids = [i for p in pieces for i in p]
    weights = [w for p, (_, w) in zip(pieces, frags) for _ in p]
    chunks, chunk_weights = [], []
    while True:
        n = _compel_split(tok, ids)
        chunks.append(ids[:n])
        chunk_weights.append(weights[:n])
        ids, weights = ids[n:], weights[n:]
        if not ids:
            break
    rows, w = _rows(tok, chunks, chunk_weights)
    masks, blend = [np.ones(rows.shape, dtype=np.int32)], [1.0]
    low = [i for i, (_, weight) in enumerate(frags) if weight < 1]
    spans = _fragment_spans(tok, rows.ravel().tolist(), pieces) if low else []
    for i in low:
        if spans[i] is None:
            continue
        mask = np.ones(rows.size, dtype=np.int32)
        mask[spans[i][0]:spans[i][1] + 1] = 0
        mask[0::tok.max_length] = mask[tok.max_length - 1::tok.max_length] = 1  # chunk boundaries stay
        masks.append(mask.reshape(rows.shape))
        blend.append(math.tan((1.0 - max(1e-5, frags[i][1])) * math.pi / 2))
    blend = np.array(blend, dtype=np.float32)
    pooled_row = tok([text], warn=False)[0] if with_pooled else None  # the whole text, syntax and all, truncated
    return Plan(rows, w, np.stack(masks), blend / blend.sum(), pooled_row)


def compel_weighting(z: np.ndarray, plan: Plan, empty: np.ndarray) -> np.ndarray:
    """z (V, k, 77, D) -> (77·k, D): each token moved from the empty prompt's embedding by its weight,
    z_0 + (z - z_0)·w (tokens of weight 1 kept exactly), then the masked embeddings blended in (compel's
    build_weighted_embedding_tensor and get_embeddings_for_weighted_prompt_fragments)."""
    w = plan.weights[..., None]  # (k, 77, 1)
    weighted = np.where(w == 1, z, empty + (z - empty) * w)
    blended = (weighted * plan.blend[:, None, None, None]).sum(axis=0)
    return blended.reshape(-1, z.shape[-1])


def a1111_plan(tok, text: str, with_pooled: bool) -> Plan:
    """The webui's TextConditionalModel.tokenize_line: 75-token chunks, a chunk that would end within 20 tokens
    after a comma ending at the comma instead (comma_padding_backtrack), BREAK closing the chunk."""
    frags = a1111_fragments(text)
    comma = tok.token_id(",</w>")
    chunks, chunk_weights = [], []
    chunk, weights, last_comma = [], [], -1

    def close():
        nonlocal chunk, weights, last_comma
        chunks.append(chunk)
        chunk_weights.append(weights)
        chunk, weights, last_comma = [], [], -1

    for (piece, weight), ids in zip(frags, tok.tokens([t for t, _ in frags])):
        if (piece, weight) == BREAK:
            close()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(chunk)
            elif len(chunk) == CHUNK and last_comma != -1 and len(chunk) - last_comma <= 20:
                moved, moved_weights = chunk[last_comma + 1:], weights[last_comma + 1:]
                chunk, weights = chunk[:last_comma + 1], weights[:last_comma + 1]
                close()
                chunk, weights = moved, moved_weights
            if len(chunk) == CHUNK:
                close()
            chunk.append(token)
            weights.append(weight)
    if chunk or not chunks:
        close()
    rows, w = _rows(tok, chunks, chunk_weights)
    return Plan(rows, w, np.ones((1,) + rows.shape, dtype=np.int32), np.ones(1, dtype=np.float32))


def a1111_weighting(z: np.ndarray, plan: Plan, empty: np.ndarray) -> np.ndarray:
    """z (1, k, 77, D) -> (77·k, D): each chunk's states times their tokens' weights, rescaled to the unweighted
    mean (the webui's EmphasisOriginal: z *= w; z *= original_mean / new_mean), per prompt."""
    z = z[0]
    weighted = z * plan.weights[..., None]
    weighted = weighted * (z.mean(axis=(1, 2), keepdims=True) / weighted.mean(axis=(1, 2), keepdims=True))
    return weighted.reshape(-1, z.shape[-1])


_RULES = {"compel": (compel_plan, compel_weighting), "a1111": (a1111_plan, a1111_weighting)}


# ---------------------------------------------------------------------------------------------- encoding


def pad_to_length(hidden: np.ndarray, length: int, empty: np.ndarray) -> np.ndarray:
    """(B, L, D) -> (B, length, D), the empty prompt's (77, D) chunk appended as often as needed (compel's
    pad_conditioning_tensors_to_same_length; the webui's pad_cond_uncond)."""
    missing = length - hidden.shape[1]
    if missing % len(empty):
        raise GenerationError(f"conditioning of {hidden.shape[1]} tokens cannot be padded to {length} with "
                              f"{len(empty)}-token chunks; give prompt and negative embeddings of the same length")
    pad = np.broadcast_to(np.tile(empty, (missing // len(empty), 1)), (len(hidden), missing, empty.shape[-1]))
    return np.concatenate([hidden, pad], axis=1)


def empty_row(tokenizers) -> list[np.ndarray]:
    """The empty prompt's (1, 77) ids per tokenizer: BOS, EOS, padding."""
    return [tok.chunk([])[None] for tok in tokenizers]


@dataclass
class Plain:
    """Prompts tokenized as diffusers does (77 tokens, truncated with a warning, no weighting)."""

    ids: list[np.ndarray]  # (B, 77) per tokenizer

    def encode(self, family, engines, manifest) -> Conditioning:
        return family.encode_text(engines, manifest, self.ids)


@dataclass
class Weighted:
    """Prompts planned under a weighting syntax: plans[prompt][tokenizer]."""

    syntax: str
    plans: list[list[Plan]]
    empty: list[np.ndarray]  # (1, 77) per tokenizer

    def encode(self, family, engines, manifest) -> Conditioning:
        """One text encoder call per encoder for the whole batch: the empty prompt, then per prompt its
        pooled row (where it has one) and its chunks under every mask."""
        ids, masks, layout, n = [[e] for e in self.empty], [[np.ones_like(e)] for e in self.empty], [], 1
        for plans in self.plans:
            V, k, L = plans[0].masks.shape
            pooled_at = n if plans[0].pooled_row is not None else None
            n += pooled_at is not None
            layout.append((pooled_at, n))
            n += V * k
            for t, plan in enumerate(plans):
                if plan.pooled_row is not None:
                    ids[t].append(plan.pooled_row[None])
                    masks[t].append(np.ones((1, L), dtype=np.int32))
                ids[t].append(np.tile(plan.ids, (V, 1)))
                masks[t].append(plan.masks.reshape(V * k, L))
        states, pooled = family.text_states(engines, manifest, [np.concatenate(x) for x in ids],
                                            [np.concatenate(x) for x in masks])
        weighting = _RULES[self.syntax][1]
        hidden = []
        for (_, first), plans in zip(layout, self.plans):
            V, k, L = plans[0].masks.shape
            hidden.append(family.combine([weighting(s[first:first + V * k].reshape(V, k, L, -1), plan, s[0])
                                          for s, plan in zip(states, plans)]))
        empty = family.combine([s[0] for s in states])
        longest = max(len(h) for h in hidden)
        hidden = np.concatenate([pad_to_length(h[None], longest, empty) for h in hidden])
        if pooled is not None:
            pooled = pooled[[first if at is None else at for at, first in layout]]
        return Conditioning(hidden, pooled)


def tokenize(texts: list[str], syntax: str, tokenizers, with_pooled: bool = False) -> Plain | Weighted:
    """``texts`` read in ``syntax`` ("none", "compel", "a1111"), ready to encode. ``with_pooled``: the family
    conditions on a pooled embedding (compel takes it from the whole text, an extra row)."""
    if syntax == "none":
        return Plain([tok(texts) for tok in tokenizers])
    plan = _RULES[syntax][0]
    plans = [[plan(tok, text, with_pooled) for tok in tokenizers] for text in texts]
    for text, per_tok in zip(texts, plans):
        if len({p.masks.shape for p in per_tok}) > 1:
            raise GenerationError(f"the text encoders' tokenizers split the prompt {text!r} differently")
    return Weighted(syntax, plans, empty_row(tokenizers))
