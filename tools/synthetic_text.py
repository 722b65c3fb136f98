"""Text categories of the synthetic set (``make_synthetic --text-categories N``): book covers told apart only
by their printed title.

The N text categories share one look (the same cover style and colours, one level-2 family of the tree)
and differ only in the title, drawn from per-category French vocabularies that overlap: each word belongs
to two or three categories, so a category is told by which words appear together, never by one word. The
titles carry accents (é è ê à ç ô œ ...) on about half of the words; they are printed in Pillow's built-in
font (FreeType, Pillow >= 10.1: no system font needed) at 12 to 24 px, at varied places on the cover.

Everything here is a pure function of its arguments (vocabularies of ``n`` only, titles of the random
generator handed in), so ``make_synthetic`` stays byte-identical for the same arguments.
"""
from __future__ import annotations

import functools
import unicodedata
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dali_pipes.ocr_files import normalize_word

SIZE = 180
TEXT_LEVEL1, TEXT_LEVEL2 = "LIBRAIRIE", "LITTERATURE"  # the family of the text categories
WORDS_PER_CATEGORY = 8
FONT_PX = (12, 24)  # smallest and largest font size, inclusive
TITLES_FILE = "image_titles.csv"  # beside test_answers.csv: the title printed on each picture
TITLES_HEADER = ["_id", "image_index", "split", "title"]
_VOCAB_SEED = 20170915  # fixed: the vocabularies depend only on the number of text categories

# Half with accents outside PP-OCRv4's alphabet, half plain ASCII, so their costs can be told apart.
WORDS = (
    "château", "fenêtre", "leçon", "héros", "cœur", "forêt", "garçon", "île", "rêve", "côté", "mère",
    "élève", "été", "hôtel", "théâtre", "église", "pâte", "tête", "fête", "bête", "crème", "frère",
    "père", "poème", "siècle", "lumière", "rivière", "prière", "première", "dernière", "écume", "étoile",
    "épée", "énigme", "océan", "âme", "hôpital", "diplôme", "façade", "reçu", "français", "maçon",
    "sœur", "œuvre", "vœu", "nœud", "bœuf", "œil", "à", "là", "déjà", "voilà", "où", "goût", "août",
    "fraîche", "maître", "chaîne", "naïf", "noël", "aïeul", "génie", "vérité", "liberté",
    "jardin", "maison", "soleil", "nuit", "ville", "monde", "temps", "amour", "livre", "histoire",
    "voyage", "musique", "guerre", "paix", "chemin", "montagne", "mer", "vent", "pluie", "neige",
    "homme", "femme", "enfant", "roi", "reine", "prince", "secret", "silence", "ombre", "sang", "feu",
    "terre", "ciel", "cheval", "loup", "chat", "oiseau", "fleur", "arbre", "pierre", "or", "argent",
    "nord", "sud", "est", "ouest", "matin", "soir", "hiver", "printemps", "automne", "jour", "demain",
    "hier", "vie", "mort", "retour", "fin", "mystère", "poison", "miroir", "jeu", "masque", "porte",
    "train", "route", "port", "phare", "marin", "soldat", "docteur", "juge", "ange", "diable", "dragon",
)
MAX_TEXT_CATEGORIES = 40  # each word in 2-3 categories: 40 categories of 8 words use about 130 words


def has_accent(word: str) -> bool:
    """A word with a letter outside a-z (é, œ, ...): PP-OCRv4's alphabet has none of them."""
    return normalize_word(word) != word.lower()


@functools.lru_cache(maxsize=None)
def vocabularies(n: int) -> Tuple[Tuple[str, ...], ...]:
    """The words of each of ``n`` text categories: about ``WORDS_PER_CATEGORY`` each, every word in two or
    three categories (never in all of them: in one with ``n <= 2``, two with ``n == 3``), the overlaps
    spread so that few word pairs belong to two categories."""
    if not 1 <= n <= MAX_TEXT_CATEGORIES:
        raise ValueError(f"text categories must be 1..{MAX_TEXT_CATEGORIES}, not {n}")
    rng = np.random.default_rng(_VOCAB_SEED)
    words = [WORDS[i] for i in rng.permutation(len(WORDS))]
    sizes = np.zeros(n, np.int64)
    shared = np.zeros((n, n), np.int64)  # words two categories have in common
    tie = rng.random(n)
    vocab: List[List[str]] = [[] for _ in range(n)]
    for w in words:
        if sizes.min() >= WORDS_PER_CATEGORY:
            break
        k = min(n - 1 or 1, int(rng.integers(2, 4)))  # fewer than all: a word in every category tells none
        chosen: List[int] = []
        for _ in range(k):
            cost = sizes * 1000.0 + shared[:, chosen].sum(1) * 10.0 + tie
            cost[chosen] = np.inf
            c = int(np.argmin(cost))
            chosen.append(c)
        for c in chosen:
            vocab[c].append(w)
            sizes[c] += 1
            shared[c, chosen] += 1
    if sizes.min() < WORDS_PER_CATEGORY:  # a bug: MAX_TEXT_CATEGORIES is too large for WORDS
        raise AssertionError(f"{len(WORDS)} words are too few for {n} text categories")
    return tuple(tuple(v) for v in vocab)


def draw_titles(rng: np.random.Generator, text_labels: np.ndarray, vocab: Sequence[Sequence[str]]) -> List[str]:
    """One title per product of text category ``text_labels[i]`` (0-based among the text categories): two or
    three distinct words of its vocabulary, in random order."""
    titles = []
    for t in text_labels.tolist():
        words = vocab[t]
        k = min(len(words), int(rng.integers(2, 4)))
        titles.append(" ".join(words[j] for j in rng.choice(len(words), size=k, replace=False)))
    return titles


def draw_layouts(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per picture: font size (px), horizontal and vertical place of the title (fractions of the free room)."""
    out = np.empty((n, 3), np.float64)
    out[:, 0] = rng.integers(FONT_PX[0], FONT_PX[1] + 1, n)
    out[:, 1:] = rng.random((n, 2))
    return out


@functools.lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


# Pillow's built-in font has no accented letters (they come out as empty boxes) but has the spacing accents
# ´ ` ^: an accented letter is drawn as its base letter with the accent (or cedilla, diaeresis) set on it.
_MARKS = {"\u0301": "´", "\u0300": "`", "\u0302": "^"}


def _glyphs(text: str) -> List[Tuple[str, str]]:
    """``(base letters, mark)`` per printed letter: é -> ("e", "´"), œ -> ("oe", ""), ç -> ("c", "cedilla")."""
    out = []
    for ch in text:
        if ch in "œæ":
            out.append(({"œ": "oe", "æ": "ae"}[ch], ""))
            continue
        parts = unicodedata.normalize("NFD", ch)
        mark = parts[1:2]
        out.append((parts[0], {"\u0327": "cedilla", "\u0308": "diaeresis"}.get(mark, _MARKS.get(mark, ""))))
    return out


def text_width(text: str, font: ImageFont.FreeTypeFont) -> float:
    return sum(font.getlength(base) for base, _ in _glyphs(text))


def draw_text(d: ImageDraw.ImageDraw, xy: Tuple[int, int], text: str, font: ImageFont.FreeTypeFont, fill) -> None:
    """``d.text`` for French words: accented letters composed from their base letter and their accent."""
    x, y = xy
    px = font.size
    for base, mark in _glyphs(text):
        w = font.getlength(base)
        d.text((x, y), base, fill=fill, font=font)
        if mark == "cedilla":  # a small hook under the c
            cx, by = x + w / 2, y + font.getbbox("c")[3]
            d.line([(cx, by), (cx + px * 0.12, by + px * 0.12), (cx - px * 0.08, by + px * 0.22)], fill=fill,
                   width=max(1, px // 12))
        elif mark == "diaeresis":
            r, top = max(1.0, px * 0.06), y + font.getbbox("x")[1] - px * 0.2
            for dx in (-px * 0.14, px * 0.14):
                d.ellipse([x + w / 2 + dx - r, top - r, x + w / 2 + dx + r, top + r], fill=fill)
        elif mark:
            mw = font.getlength(mark)
            lift = font.getbbox(mark)[1] - font.getbbox("x")[1] + px * 0.28  # its top just above the x-height
            d.text((x + (w - mw) / 2, y - lift), mark, fill=fill, font=font)
        x += w


def _layout(title: str, px: int, width: int) -> Tuple[ImageFont.FreeTypeFont, List[str]]:
    """The title on one line if it fits ``width``, else one word a line; the font shrinks until every line
    fits (down to the smallest size)."""
    while True:
        font = _font(px)
        lines = [title] if text_width(title, font) <= width else title.split(" ")
        if px <= FONT_PX[0] or all(text_width(ln, font) <= width for ln in lines):
            return font, lines
        px -= 1


def render_cover(p: Sequence[float], title: str, layout: Sequence[float]) -> Image.Image:
    """A book cover on the picture's background: the category's colours (``r g b``, accent ``ar ag ab``),
    a light title panel and the title, at the picture's place and size (``cx cy scale``)."""
    cx, cy, scale = p[1], p[2], p[3]
    r, g, b, ar, ag, ab, bg = p[7], p[8], p[9], p[10], p[11], p[12], p[18]
    px, fx, fy = int(layout[0]), layout[1], layout[2]
    im = Image.new("RGB", (SIZE, SIZE), (int(bg),) * 3)
    d = ImageDraw.Draw(im)
    w, h = min(2.7 * scale, 172.0), min(3.0 * scale, 174.0)
    x0, y0 = int(np.clip(cx - w / 2, 2, SIZE - 2 - w)), int(np.clip(cy - h / 2, 2, SIZE - 2 - h))
    x1, y1 = x0 + int(w), y0 + int(h)
    main = np.clip([r, g, b], 0, 255)
    shade = tuple(int(v) for v in main * 0.65)
    d.rectangle([x0 + 3, y0 + 3, x1 + 3, y1 + 3], fill=(int(bg * 0.86),) * 3)  # shadow
    d.rectangle([x0, y0, x1, y1], fill=tuple(int(v) for v in main))
    d.rectangle([x0, y0, x0 + 6, y1], fill=shade)  # spine
    d.rectangle([x0 + 7, y1 - 12, x1, y1 - 6], fill=tuple(int(v) for v in np.clip([ar, ag, ab], 0, 255)))
    inner = x1 - x0 - 18
    font, lines = _layout(title, px, inner)
    asc, desc = font.getmetrics()
    line_h = asc + desc + 2
    text_w = int(max(text_width(ln, font) for ln in lines))
    text_h = line_h * len(lines)
    tx = x0 + 11 + int(fx * max(inner - text_w, 0))
    ty = y0 + 6 + int(fy * max(y1 - y0 - 26 - text_h, 0))
    d.rectangle([tx - 3, ty - 2, tx + text_w + 3, ty + text_h + 1], fill=tuple(int(v) for v in main * 0.12 + 222))
    ink = tuple(int(v) for v in main * 0.25)
    for i, ln in enumerate(lines):
        draw_text(d, (tx, ty + i * line_h), ln, font, ink)
    return im
