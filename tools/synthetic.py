"""Synthetic data in the Cdiscount competition format.

``make_dataset`` writes ``train.bson``, ``test.bson``, ``category_names.csv`` and ``test_answers.csv``:
180x180 RGB JPEG "product shots" (an object on a white background) whose category is visible in the
picture (shape x colour x texture x accent colour), 1-4 images per product in the real mix, uneven
category sizes, increasing non-contiguous ids, test ids interleaved with train ids.

Determinism: every random draw comes from ``numpy.random.Generator`` objects seeded from ``seed``;
images are rendered from drawn parameters by a pure function and encoded by PIL at a fixed quality,
so the same arguments give byte-identical files (whatever ``workers`` is). The category taxonomy
(ids, names, looks) does not depend on ``seed`` and is prefix-stable: category ``i`` has the same id,
names and style for any ``categories >= i + 1``, so sets made with different seeds share classes.
There are 1,620 distinct looks; with more categories the looks repeat (names and ids stay unique).

Speed: about 2,000 images/s on one core (PIL drawing + palette expansion + PIL JPEG encode);
``workers > 1`` renders chunks in a process pool.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

import bson

from dali_pipes.fileio import atomic_open
from tools import synthetic_text

SIZE = 180
JPEG_QUALITY = 88
IMAGE_COUNT_P = (0.62, 0.16, 0.08, 0.14)  # products with 1, 2, 3, 4 images (the real mix)
TAXONOMY_SEED = 20170914  # fixed: the taxonomy does not depend on --seed
_CHUNK = 256  # products per render chunk

# ---- category looks -----------------------------------------------------------------------------
COLOURS = np.array(
    [
        (200, 30, 35),  # red
        (40, 150, 60),  # green
        (35, 70, 190),  # blue
        (235, 200, 30),  # yellow
        (240, 120, 20),  # orange
        (120, 50, 160),  # purple
        (30, 170, 190),  # cyan
        (230, 110, 170),  # pink
        (120, 75, 40),  # brown
        (55, 55, 60),  # charcoal
    ],
    dtype=np.float32,
)
TEXTURES = ("plain", "stripes", "checker")

# Part ids of the drawn part map: 0 background, 1 main colour, 2 main colour shaded, 3 accent colour,
# 4 dark glass, 5 light face, 7 cast shadow. Texture darkens parts 1 and 2 (palette groups 6 and 8).


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _circle(r, n=40, sy=1.0):
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return list(zip(r * np.cos(a), r * sy * np.sin(a)))


# Shapes in unit coordinates (y down, extent about [-1, 1]), drawn in order: (part id, polygon).
# The last item says whether the object stands upright (rotation small, cast shadow).
_SHAPE_DEFS = {
    "bottle": (
        [
            (1, [(-0.15, -0.72), (0.15, -0.72), (0.42, -0.42), (0.42, 0.95), (-0.42, 0.95), (-0.42, -0.42)]),
            (1, _rect(-0.14, -0.95, 0.14, -0.7)),
            (2, _rect(-0.17, -1.08, 0.17, -0.9)),
            (3, _rect(-0.42, 0.02, 0.42, 0.55)),
        ],
        True,
    ),
    "box": (
        [
            (1, [(-0.72, -0.4), (0.42, -0.4), (0.42, 0.95), (-0.72, 0.95)]),
            (5, [(-0.72, -0.4), (-0.42, -0.8), (0.72, -0.8), (0.42, -0.4)]),
            (2, [(0.42, -0.4), (0.72, -0.8), (0.72, 0.6), (0.42, 0.95)]),
            (3, _rect(-0.72, 0.3, 0.42, 0.5)),
        ],
        True,
    ),
    "disc": (
        [(1, _circle(0.95)), (3, _circle(0.42)), (0, _circle(0.12, 16))],
        False,
    ),
    "shirt": (
        [
            (
                1,
                [(-0.25, -0.9), (-0.62, -0.8), (-1.0, -0.3), (-0.76, -0.12), (-0.5, -0.35), (-0.5, 0.95),
                 (0.5, 0.95), (0.5, -0.35), (0.76, -0.12), (1.0, -0.3), (0.62, -0.8), (0.25, -0.9), (0.0, -0.72)],
            ),
            (3, [(-0.25, -0.9), (0.0, -0.72), (0.25, -0.9), (0.0, -0.62)]),
            (3, [(-1.0, -0.3), (-0.76, -0.12), (-0.82, -0.06), (-1.06, -0.24)]),
            (3, [(1.0, -0.3), (0.76, -0.12), (0.82, -0.06), (1.06, -0.24)]),
        ],
        False,
    ),
    "phone": (
        [
            (1, [(-0.42, -0.95), (0.42, -0.95), (0.5, -0.87), (0.5, 0.87), (0.42, 0.95), (-0.42, 0.95),
                 (-0.5, 0.87), (-0.5, -0.87)]),
            (4, _rect(-0.42, -0.78, 0.42, 0.72)),
            (3, _rect(-0.12, 0.78, 0.12, 0.88)),
            (3, _rect(-0.15, -0.88, 0.15, -0.84)),
        ],
        True,
    ),
    "lamp": (
        [
            (1, [(-0.35, -0.95), (0.35, -0.95), (0.78, 0.1), (-0.78, 0.1)]),
            (2, _rect(-0.78, 0.02, 0.78, 0.1)),
            (4, _rect(-0.06, 0.1, 0.06, 0.8)),
            (3, [(-0.3, 0.8), (0.3, 0.8), (0.45, 0.95), (-0.45, 0.95)]),
        ],
        True,
    ),
}
SHAPES = tuple(_SHAPE_DEFS)
_SHAPE_VERTS = []  # per shape: (all vertices (n, 2) float32, [(part, start, stop)], upright)
for _name in SHAPES:
    _polys, _upright = _SHAPE_DEFS[_name]
    _segs, _pts, _i = [], [], 0
    for _pid, _poly in _polys:
        _segs.append((_pid, _i, _i + len(_poly)))
        _pts.extend(_poly)
        _i += len(_poly)
    _SHAPE_VERTS.append((np.asarray(_pts, dtype=np.float32), _segs, _upright))

_STYLE_CACHE: List[Tuple[int, int, int, int]] = []


def category_styles(categories: int) -> np.ndarray:
    """Looks of the first ``categories`` categories: rows (shape, colour, texture, accent colour).

    Greedy max-min distance over all combinations (shape and colour weigh most), ties broken by a fixed
    random order, so the list is prefix-stable. Beyond all combinations the looks repeat (cyclically).
    """
    nS, nC, nT = len(SHAPES), len(COLOURS), len(TEXTURES)
    need = min(categories, nS * nC * nT * (nC - 1))
    if len(_STYLE_CACHE) < need:
        grid = np.stack(np.meshgrid(np.arange(nS), np.arange(nC), np.arange(nT), np.arange(nC), indexing="ij"), -1)
        cand = grid.reshape(-1, 4)
        cand = cand[cand[:, 1] != cand[:, 3]]  # accent differs from the main colour
        cand = cand[np.random.default_rng(TAXONOMY_SEED).permutation(len(cand))]
        w = np.array([3.0, 3.0, 2.0, 1.0], dtype=np.float32)
        mind = np.full(len(cand), np.inf, dtype=np.float32)
        used = np.zeros(len(cand), dtype=bool)
        _STYLE_CACHE.clear()
        for _ in range(min(categories, len(cand))):
            score = np.where(used, -1.0, mind)
            k = int(np.argmax(score))  # first max: ties follow the fixed random order
            used[k] = True
            _STYLE_CACHE.append(tuple(int(v) for v in cand[k]))
            mind = np.minimum(mind, ((cand != cand[k]) * w).sum(1))
    n = len(_STYLE_CACHE)
    return np.array([_STYLE_CACHE[i % n] for i in range(categories)], dtype=np.int64).reshape(-1, 4)


# ---- taxonomy -----------------------------------------------------------------------------------
_TREE = {
    "INFORMATIQUE": ["CONSOMMABLE INFORMATIQUE", "PERIPHERIQUE - ACCESSOIRE", "STOCKAGE - MEMOIRE"],
    "TELEPHONIE - GPS": ["ACCESSOIRE TELEPHONE", "TELEPHONE - COMMUNICATION", "GPS"],
    "AUTO - MOTO": ["PIECES", "ENTRETIEN - NETTOYAGE", "EQUIPEMENT MOTO"],
    "DECO - LINGE - LUMINAIRE": ["LUMINAIRE INTERIEUR", "LINGE DE MAISON", "DECORATION"],
    "HYGIENE - BEAUTE - PARFUM": ["SOIN DU CORPS", "PARFUM", "MAQUILLAGE"],
    "SPORT": ["TEXTILE SPORT", "CYCLE", "FITNESS - MUSCULATION"],
    "MUSIQUE": ["CD", "VINYLE", "INSTRUMENT DE MUSIQUE"],
    "LIBRAIRIE": ["AUTRES LIVRES", "LITTERATURE", "BD - MANGA"],
    "BIJOUX - LUNETTES - MONTRES": ["MONTRE", "BIJOUX", "LUNETTES"],
    "ELECTROMENAGER": ["PETIT ELECTROMENAGER", "CUISSON", "FROID"],
    "JEUX - JOUETS": ["JEUX DE SOCIETE", "POUPEE - PELUCHE", "JEUX EXTERIEURS"],
    "BRICOLAGE - OUTILLAGE - QUINCAILLERIE": ["OUTIL A MAIN", "QUINCAILLERIE", "ELECTRICITE"],
}
_NOUNS = [
    "COQUE", "CABLE", "BATTERIE", "CHARGEUR", "HOUSSE", "ETUI", "LAMPE", "T-SHIRT", "POLO", "FLACON",
    "COFFRET", "DISQUE", "CARTOUCHE", "FILTRE", "SUPPORT", "ADAPTATEUR", "MONTRE", "SAC", "BOUTEILLE",
    "BOITE", "ABAT-JOUR", "GOURDE", "VASE", "BOUGIE", "MUG", "ENCEINTE", "CASQUE", "CLAVIER", "SOURIS",
    "PLAID", "COUSSIN", "TAPIS", "PEIGNOIR", "JOUET", "FIGURINE", "PUZZLE", "LIVRE", "VINYLE", "GANT",
]
_QUALIFIERS = [
    "", " - BUMPER", " DE PROTECTION", ", ADAPTATEUR", " CONNECTEUR", " - ACCESSOIRE", ", SUPPORT",
    " DECORATIF", " ELECTRIQUE", " - RECHARGE", " ENFANT", " DE VOYAGE", " LUMINEUX", ", DIVERS",
]
CATEGORY_HEADER = ["category_id", "category_level1", "category_level2", "category_level3"]


def category_table(categories: int) -> List[Tuple[int, str, str, str]]:
    """``(category_id, level1, level2, level3)`` for each category, in category-index order.

    Ids are 10-digit, increasing, not contiguous (like 1000010653); level3 names are unique.
    """
    if categories < 1:
        raise ValueError("categories must be >= 1")
    rng = np.random.default_rng(TAXONOMY_SEED + 1)
    l1s = list(_TREE)
    rows, seen, cid = [], set(), 1000000000
    # fixed draws per category and choices that depend only on i keep the table prefix-stable
    for i in range(categories):
        gap, a, b, n, q = rng.integers(1, 2000), rng.random(), rng.random(), rng.integers(1 << 30), rng.integers(1 << 30)
        cid += int(gap)
        n_l1 = min(len(l1s), 2 + i // 4)  # the tree widens slowly: few level1 names for few categories
        l1 = l1s[i] if i < 2 else l1s[min(int(a * n_l1), n_l1 - 1)]
        l2 = _TREE[l1][min(int(b * 3), 2)]
        base = _NOUNS[int(n) % len(_NOUNS)] + _QUALIFIERS[int(q) % len(_QUALIFIERS)]
        l3, k = base, 2
        while l3 in seen:
            l3, k = f"{base} {k}", k + 1
        seen.add(l3)
        rows.append((cid, l1, l2, l3))
    return rows


# ---- rendering ----------------------------------------------------------------------------------
# Precomputed banks (fixed content, built once per process): the per-image work is cropping them at
# random offsets and a few uint8 operations. Shading is quantized to _LEVELS levels per palette group.
_LEVELS = 28  # shade levels per palette group
_F_LO, _F_STEP = 0.55, 0.025  # shade factor of level 0 and per level (0.55 .. 1.225)
_SHADES = (_F_LO + _F_STEP * np.arange(_LEVELS, dtype=np.float32))[None, :, None]
_GRAD_DIRS, _GRAD_STRENGTHS = 32, (0.1, 0.18, 0.26, 0.34)  # shading gradient: change of factor per 80 px
_TEX_ANGLES, _TEX_WIDTHS = 64, (6.0, 7.0, 8.0)  # stripe banks over [0, pi)
_MAX_SHIFT = 16  # object centre within 90 +- _MAX_SHIFT
_BANK = 256
_BANKS: Dict[str, np.ndarray] = {}


def _banks() -> Dict[str, np.ndarray]:
    if not _BANKS:
        g = SIZE + 2 * _MAX_SHIFT
        yy, xx = np.mgrid[0:g, 0:g].astype(np.float32) - g // 2
        grads = np.empty((_GRAD_DIRS, len(_GRAD_STRENGTHS), g, g), dtype=np.uint8)
        for d in range(_GRAD_DIRS):
            a = 2 * np.pi * d / _GRAD_DIRS
            lin = (xx * np.cos(a) + yy * np.sin(a)) / (80.0 * _F_STEP)
            for k, st in enumerate(_GRAD_STRENGTHS):  # level of factor 1.0 at the centre, kept in [3, 27]
                grads[d, k] = np.clip(lin * st + (1.0 - _F_LO) / _F_STEP + 0.5, 3, _LEVELS - 1)
        yy, xx = np.mgrid[0:_BANK, 0:_BANK].astype(np.float32)
        stripes = np.empty((_TEX_ANGLES, len(_TEX_WIDTHS), _BANK, _BANK), dtype=np.uint8)
        for t in range(_TEX_ANGLES):
            a = np.pi * t / _TEX_ANGLES
            u = xx * np.cos(a) + yy * np.sin(a) + 1024.0
            for k, w in enumerate(_TEX_WIDTHS):
                stripes[t, k] = (u / w).astype(np.int32) & 1
        rng = np.random.default_rng(TAXONOMY_SEED + 2)  # luminance noise in levels, in [-3, 3] (two's complement)
        noise = np.clip(np.rint(rng.normal(0.0, 1.1, (_BANK, _BANK))), -3, 3).astype(np.int8).view(np.uint8)
        _BANKS.update(grads=grads, stripes=stripes, noise=noise)
    return _BANKS


# Per-image parameters, one row each (float64): drawn in bulk by ``_draw_params``.
_P = [
    "label", "cx", "cy", "scale", "aspect", "rot", "mirror", "r", "g", "b", "ar", "ag", "ab", "gdir", "gstr",
    "tex_w", "tx", "ty", "bg", "nx", "ny", "shadow",
]
_PI = {k: i for i, k in enumerate(_P)}


def _draw_params(rng: np.random.Generator, labels: np.ndarray, counts: np.ndarray, styles: np.ndarray) -> np.ndarray:
    """Parameters of every image of the products (product-level looks + per-image view changes)."""
    n_p, n_i = len(labels), int(counts.sum())
    prod = np.repeat(np.arange(n_p), counts)
    P = np.zeros((n_i, len(_P)), dtype=np.float64)
    # product level: colour jitter, size
    col_j = rng.normal(0.0, 10.0, (n_p, 3)) + rng.normal(0.0, 8.0, (n_p, 1))
    acc_j = rng.normal(0.0, 10.0, (n_p, 3))
    size_j = rng.uniform(0.85, 1.1, n_p)
    st = styles[labels]
    P[:, _PI["label"]] = labels[prod]
    P[:, _PI["r"]:_PI["b"] + 1] = (COLOURS[st[:, 1]] + col_j)[prod]
    P[:, _PI["ar"]:_PI["ab"] + 1] = (COLOURS[st[:, 3]] + acc_j)[prod]
    # image level: placement, rotation, shading, texture phase, noise
    upright = np.array([_SHAPE_VERTS[s][2] for s in range(len(SHAPES))])[st[:, 0]][prod]
    P[:, _PI["cx"]] = 90 + np.clip(np.rint(rng.normal(0.0, 6.0, n_i)), -_MAX_SHIFT, _MAX_SHIFT)
    P[:, _PI["cy"]] = 90 + np.clip(np.rint(rng.normal(0.0, 6.0, n_i)), -_MAX_SHIFT, _MAX_SHIFT)
    P[:, _PI["scale"]] = 62.0 * size_j[prod] * rng.uniform(0.9, 1.08, n_i)
    P[:, _PI["aspect"]] = rng.uniform(0.9, 1.1, n_i)
    rot_small = np.clip(rng.normal(0.0, 0.12, n_i), -0.3, 0.3)
    rot_any = rng.uniform(-np.pi, np.pi, n_i)
    P[:, _PI["rot"]] = np.where(upright, rot_small, np.where(rng.random(n_i) < 0.5, rot_small * 2, rot_any))
    P[:, _PI["mirror"]] = rng.random(n_i) < 0.5
    P[:, _PI["gdir"]] = rng.integers(0, _GRAD_DIRS, n_i)
    P[:, _PI["gstr"]] = rng.integers(0, len(_GRAD_STRENGTHS), n_i)
    P[:, _PI["tex_w"]] = rng.integers(0, len(_TEX_WIDTHS), n_i)
    P[:, _PI["tx"]] = rng.integers(0, _BANK - SIZE + 1, n_i)
    P[:, _PI["ty"]] = rng.integers(0, _BANK - SIZE + 1, n_i)
    P[:, _PI["bg"]] = np.where(rng.random(n_i) < 0.8, 255.0, rng.uniform(238.0, 255.0, n_i))
    P[:, _PI["nx"]] = rng.integers(0, _BANK - SIZE + 1, n_i)
    P[:, _PI["ny"]] = rng.integers(0, _BANK - SIZE + 1, n_i)
    P[:, _PI["shadow"]] = upright & (rng.random(n_i) < 0.7)
    return P


def _render(p: Sequence[float], style: Sequence[int]) -> Image.Image:
    """One RGB image from its parameter row and its category style.

    The object is drawn as a part map (PIL); a shade level (gradient + noise, from the banks) and the
    part group (parts, texture-darkened parts) index a 252-colour palette that PIL expands to RGB.
    """
    (_, cx, cy, scale, aspect, rot, mirror, r, g, b, ar, ag, ab, gdir, gstr, tex_w, tx, ty, bg, nx, ny,
     shadow) = p
    shape, _, texture, _ = style
    banks = _banks()
    verts, segs, _ = _SHAPE_VERTS[shape]
    c, s = math.cos(rot), math.sin(rot)
    sx = scale * aspect * (-1.0 if mirror else 1.0)
    m = np.array([[sx * c, sx * s], [-scale * s, scale * c]], dtype=np.float32)
    flat = (verts @ m + np.array([cx, cy], dtype=np.float32)).ravel().tolist()
    im = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(im)
    if shadow:
        hy = cy + 0.95 * scale
        draw.ellipse([cx - 0.8 * scale, hy - 0.1 * scale, cx + 0.8 * scale, hy + 0.1 * scale], fill=7)
    for pid, a, z in segs:
        draw.polygon(flat[2 * a:2 * z], fill=pid)
    gid = np.asarray(im)

    ox, oy = _MAX_SHIFT + 90 - int(cx), _MAX_SHIFT + 90 - int(cy)
    nx, ny, tx, ty = int(nx), int(ny), int(tx), int(ty)
    idx = banks["grads"][int(gdir), int(gstr), oy:oy + SIZE, ox:ox + SIZE] + banks["noise"][ny:ny + SIZE, nx:nx + SIZE]
    np.minimum(idx, _LEVELS - 1, out=idx)
    if texture:  # stripes / checker in the object's frame darken parts 1 and 2 (groups 6 and 8)
        t = int(round((rot % math.pi) * _TEX_ANGLES / math.pi)) % _TEX_ANGLES
        band = banks["stripes"][t, int(tex_w), ty:ty + SIZE, tx:tx + SIZE].copy()
        if texture == 2:
            band ^= banks["stripes"][(t + _TEX_ANGLES // 2) % _TEX_ANGLES, int(tex_w), ty:ty + SIZE, tx:tx + SIZE]
        band *= (gid - 1) < 2
        band *= gid + 4
        gid = gid + band  # 1 -> 6, 2 -> 8
    idx += gid * _LEVELS  # gid <= 8: 9 * 28 = 252 colours

    main = np.array([r, g, b], dtype=np.float32)
    table = np.empty((9, 3), dtype=np.float32)
    table[0] = bg
    table[1] = main
    table[2] = main * 0.65
    table[3] = (ar, ag, ab)
    table[4] = main * 0.15 + 30.0
    table[5] = main * 0.55 + 110.0
    table[6] = main * 0.55
    table[7] = bg * 0.86
    table[8] = main * (0.65 * 0.55)
    pal = table[:, None, :] * _SHADES  # (9, LEVELS, 3)
    pal[0] = bg  # background and shadow are flat
    pal[7] = bg * 0.86
    np.clip(pal, 0, 255, out=pal)
    pimg = Image.frombytes("P", (SIZE, SIZE), idx.tobytes())
    pimg.putpalette(pal.astype(np.uint8).tobytes())
    return pimg.convert("RGB")


def encode_jpeg(
    img: Union[Image.Image, np.ndarray], quality: int = JPEG_QUALITY, progressive: bool = False, mode: str = "RGB"
) -> bytes:
    """JPEG bytes (PIL) of an image or (H, W, 3) uint8 array, converted to ``mode`` (RGB, L, CMYK) first."""
    im = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    if im.mode != mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, progressive=progressive)
    return buf.getvalue()


def make_jpeg(
    category: int = 0,
    seed: int = 0,
    size: Union[int, Tuple[int, int]] = SIZE,
    mode: str = "RGB",
    quality: int = JPEG_QUALITY,
    progressive: bool = False,
) -> bytes:
    """One synthetic product JPEG of category index ``category`` (for tests crafting their own inputs).

    ``size`` (side or (width, height)) other than 180 resizes; ``mode`` "L" or "CMYK" gives grayscale or
    CMYK JPEGs; truncate or mangle the returned bytes for broken inputs.
    """
    rng = np.random.default_rng([seed, category])
    styles = category_styles(category + 1)
    p = _draw_params(rng, np.array([category]), np.array([1]), styles)[0]
    im = _render(p.tolist(), styles[category].tolist())
    w, h = (size, size) if isinstance(size, int) else size
    if (w, h) != (SIZE, SIZE):
        im = im.resize((w, h), Image.BILINEAR)
    return encode_jpeg(im, quality=quality, progressive=progressive, mode=mode)


def _render_chunk(args: Tuple) -> List[bytes]:
    """JPEGs of a chunk: ``(params, styles, quality)``, and with text categories a 4th item, the
    ``{image row: (title, layout)}`` of the chunk's covers."""
    params, styles, quality = args[:3]
    covers = args[3] if len(args) > 3 else {}
    out = []
    for i, p in enumerate(params.tolist()):
        cover = covers.get(i)
        im = _render(p, styles[int(p[0])].tolist()) if cover is None else synthetic_text.render_cover(p, *cover)
        out.append(encode_jpeg(im, quality=quality))
    return out


class _TextSpec:
    """The text categories of a set (the last ``n`` of ``categories``): draws each chunk's titles and
    layouts from a stream of its own (so the other pictures are the same with or without text categories)
    and records the title of each product (``titles``: id -> (title, images))."""

    def __init__(self, categories: int, n: int, rng: np.random.Generator):
        self.first, self.rng = categories - n, rng
        self.vocab = synthetic_text.vocabularies(n)
        self.titles: Dict[int, Tuple[str, int]] = {}

    def draw(self, ids: np.ndarray, labels: np.ndarray, n_imgs: np.ndarray) -> Dict[int, tuple]:
        rows = np.concatenate([[0], np.cumsum(n_imgs)])
        which = np.flatnonzero(labels >= self.first)
        titles = synthetic_text.draw_titles(self.rng, labels[which] - self.first, self.vocab)
        layouts = synthetic_text.draw_layouts(self.rng, int(n_imgs[which].sum()))
        covers, k = {}, 0
        for j, title in zip(which.tolist(), titles):
            self.titles[int(ids[j])] = (title, int(n_imgs[j]))
            for row in range(int(rows[j]), int(rows[j + 1])):
                covers[row] = (title, layouts[k].tolist())
                k += 1
        return covers


# ---- file writing -------------------------------------------------------------------------------
def write_bson(path: str, docs: Iterable[dict]) -> Tuple[int, int]:
    """Write documents as a MongoDB dump (concatenated BSON), atomically. Returns (documents, bytes)."""
    n = nbytes = 0
    with atomic_open(path, "wb") as fh:
        for doc in docs:
            data = bson.encode(doc)
            fh.write(data)
            n += 1
            nbytes += len(data)
    return n, nbytes


def write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence]) -> int:
    """Write a CSV (csv module quoting) atomically. Returns the number of data rows."""
    n = 0
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow(row)
            n += 1
    return n


# ---- dataset ------------------------------------------------------------------------------------
def category_weights(categories: int, rng: np.random.Generator) -> np.ndarray:
    """Uneven (Zipf-like) category probabilities, randomly assigned to categories."""
    w = 1.0 / np.arange(1, categories + 1, dtype=np.float64) ** 0.9
    w = w[rng.permutation(categories)]
    return w / w.sum()


def _split_products(rng, products, test_products, categories):
    """ids, labels and image counts of the train and test products."""
    w = category_weights(categories, rng)
    floor = min(3, products // categories)  # every category gets a few products when there are enough
    counts = np.full(categories, floor, dtype=np.int64)
    counts += rng.multinomial(products - floor * categories, w)
    train_labels = rng.permutation(np.repeat(np.arange(categories), counts))
    test_labels = rng.choice(categories, size=test_products, p=w) if test_products else np.zeros(0, np.int64)
    total = products + test_products
    gaps = rng.geometric(0.75, size=total)  # mostly 1, sometimes 2 or more, like the real ids
    ids = np.cumsum(gaps) - gaps[0] if total else np.zeros(0, np.int64)
    is_test = np.zeros(total, dtype=bool)
    is_test[rng.permutation(total)[:test_products]] = True
    n_img_train = rng.choice(4, size=products, p=IMAGE_COUNT_P) + 1
    n_img_test = rng.choice(4, size=test_products, p=IMAGE_COUNT_P) + 1
    return (ids[~is_test], train_labels, n_img_train), (ids[is_test], test_labels, n_img_test)


def _product_docs(ids, labels, n_imgs, cat_ids, rng, styles, with_category, quality, pool, stats, doc_labels=None,
                  text=None):
    """Yield BSON documents, rendering images chunk by chunk (in a pool when given, order kept).

    Images show ``labels``; the documents' ``category_id`` is that of ``doc_labels`` (default ``labels``).
    ``text`` (a ``_TextSpec``) prints titles on the products of the text categories and records them."""
    doc_labels = labels if doc_labels is None else doc_labels

    def jobs():
        for a in range(0, len(ids), _CHUNK):
            z = min(a + _CHUNK, len(ids))
            params = _draw_params(rng, labels[a:z], n_imgs[a:z], styles)
            if text is None:
                yield params, styles, quality
            else:
                yield params, styles, quality, text.draw(ids[a:z], labels[a:z], n_imgs[a:z])

    results = pool.imap(_render_chunk, jobs()) if pool is not None else map(_render_chunk, jobs())
    for a, jpegs in zip(range(0, len(ids), _CHUNK), results):
        k = 0
        for i in range(a, min(a + _CHUNK, len(ids))):
            n = int(n_imgs[i])
            doc = {"_id": int(ids[i])}
            if with_category:
                doc["category_id"] = int(cat_ids[doc_labels[i]])
            doc["imgs"] = [{"picture": jpegs[k + j]} for j in range(n)]
            stats["images"] += n
            stats["jpeg_bytes"] += sum(len(x) for x in jpegs[k:k + n])
            k += n
            yield doc


LABEL_NOISE_FILE = "train_label_noise.csv"
LABEL_NOISE_HEADER = ["_id", "category_id", "true_category_id"]


def noisy_labels(labels: np.ndarray, categories: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices of the products relabelled and their new labels: ``round(fraction * n)`` products drawn at
    random, each given a category drawn uniformly among the other ones (from a stream of its own, so the
    rest of the set is the same with or without noise)."""
    n = len(labels)
    k = int(round(fraction * n)) if categories > 1 else 0
    rng = np.random.default_rng([seed, 0x4E015E])
    which = np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, np.int64)
    shift = rng.integers(1, categories, size=k) if k else np.zeros(0, np.int64)  # never the true class
    return which, (labels[which] + shift) % categories


DUPLICATES_FILE = "test_duplicates.csv"
DUPLICATES_HEADER = ["_id", "train_id"]


def duplicate_sources(train_labels: np.ndarray, test_labels: np.ndarray, fraction: float,
                      seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Test products that copy a train product's images, and the train product each copies:
    ``round(fraction * n)`` test products drawn at random, each given a random train product of its own
    category (of any category when its category has none). A stream of its own: the rest of the set is the
    same with or without duplicates."""
    n = len(test_labels)
    k = int(round(fraction * n)) if len(train_labels) else 0
    rng = np.random.default_rng([seed, 0xD0B1])
    which = np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, np.int64)
    by_label: Dict[int, np.ndarray] = {}
    src = np.zeros(k, np.int64)
    for j, lab in enumerate(test_labels[which].tolist()):
        pool = by_label.get(lab)
        if pool is None:
            pool = by_label[lab] = np.flatnonzero(train_labels == lab)
        if not len(pool):
            pool = np.arange(len(train_labels))
        src[j] = pool[rng.integers(len(pool))]
    return which, src


def _keep_images(docs: Iterable[dict], keep: set, store: Dict[int, list]):
    """Pass the documents on, keeping the image lists of the ids in ``keep``."""
    for d in docs:
        if d["_id"] in keep:
            store[d["_id"]] = d["imgs"]
        yield d


def _copy_images(docs: Iterable[dict], copy_from: Dict[int, int], store: Dict[int, list], stats: dict):
    """Pass the documents on, the ids in ``copy_from`` with the images kept for their train product."""
    for d in docs:
        src = copy_from.get(d["_id"])
        if src is not None:
            imgs = store[src]
            stats["images"] += len(imgs) - len(d["imgs"])
            stats["jpeg_bytes"] += sum(len(x["picture"]) for x in imgs) - sum(len(x["picture"]) for x in d["imgs"])
            d["imgs"] = imgs
        yield d


def _with_text_categories(table, styles, n: int):
    """The category table and looks with the last ``n`` categories made text categories: one family
    (``LIBRAIRIE > LITTERATURE``) and one look (a blue cover, yellow accent); ids and the rest unchanged."""
    table, styles = list(table), styles.copy()
    first = len(table) - n
    for k in range(n):
        table[first + k] = (table[first + k][0], synthetic_text.TEXT_LEVEL1, synthetic_text.TEXT_LEVEL2,
                            f"ROMAN - SERIE {k + 1}")
    styles[first:] = (SHAPES.index("box"), 2, 0, 3)
    return table, styles


def _title_rows(texts, copy_from: Dict[int, int]):
    """``image_titles.csv`` rows: train pictures, then test ones (a copied test product shows its train
    product's pictures, so its title)."""
    train, test = texts[0].titles, texts[1].titles
    for split, titles in (("train", train), ("test", test)):
        for pid in sorted(titles):
            title, n = titles[pid]
            if split == "test" and pid in copy_from:
                if copy_from[pid] not in train:
                    continue  # the copy shows a picture of another category: no title
                title, n = train[copy_from[pid]]
            for j in range(n):
                yield pid, j, split, title


ORDERS = ("shuffled", "sorted")  # of the train documents in train.bson


def make_dataset(
    out: str,
    products: int = 2000,
    test_products: int = 300,
    categories: int = 20,
    seed: int = 0,
    quality: int = JPEG_QUALITY,
    workers: int = 1,
    label_noise: float = 0.0,
    duplicates: float = 0.0,
    order: str = "shuffled",
    text_categories: int = 0,
) -> Dict[str, object]:
    """Write a synthetic Cdiscount-format set into ``out``; returns paths and counts.

    Keys: train_bson, test_bson, category_names, test_answers (paths); train_products, test_products,
    train_images, test_images, categories, bytes (all files), mean_jpeg_bytes, seconds.

    ``label_noise`` P > 0: a share P of the train products get a wrong ``category_id`` in train.bson (their
    images still show the true category), listed in ``train_label_noise.csv`` (``_id``, the ``category_id``
    written, ``true_category_id``; key ``label_noise`` of the result, with ``noisy_products``).

    ``duplicates`` F > 0: a share F of the test products carry the images (byte for byte) of a train product
    of their category, listed in ``test_duplicates.csv`` (``_id``, ``train_id``; key ``duplicates`` of the
    result, with ``duplicate_products``).

    ``order`` "sorted": train.bson holds the same documents, byte for byte, sorted by the ``category_id``
    written (ties in generated order), as a catalogue export sorted by category is: the worst case for a
    loader that reads in file order. The train documents are then held in memory until written (about the
    size of train.bson).

    ``text_categories`` N > 0: the last N categories are book covers of one look in one level-2 family
    (``synthetic_text``), told apart only by their printed titles; ``image_titles.csv`` (key ``titles``)
    lists the title of every picture of them (``_id``, ``image_index``, ``split``, ``title``). The other
    categories, and every file with N = 0, are the same as without the option.
    """
    if products < 0 or test_products < 0:
        raise ValueError("product counts must be >= 0")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], not {label_noise}")
    if not 0.0 <= duplicates <= 1.0:
        raise ValueError(f"duplicates must be in [0, 1], not {duplicates}")
    if categories < 1:
        raise ValueError("categories must be >= 1")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    if not 0 <= text_categories <= min(categories, synthetic_text.MAX_TEXT_CATEGORIES):
        raise ValueError(f"text_categories must be in [0, {min(categories, synthetic_text.MAX_TEXT_CATEGORIES)}] "
                         f"(at most the number of categories and {synthetic_text.MAX_TEXT_CATEGORIES}), "
                         f"not {text_categories}")
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    meta_rng, train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    table = category_table(categories)
    cat_ids = np.array([r[0] for r in table], dtype=np.int64)
    styles = category_styles(categories)
    texts = [None, None]
    if text_categories:
        table, styles = _with_text_categories(table, styles, text_categories)
        texts = [_TextSpec(categories, text_categories, np.random.default_rng([seed, 0x7E47, part]))
                 for part in (0, 1)]
    (tr_ids, tr_lab, tr_n), (te_ids, te_lab, te_n) = _split_products(meta_rng, products, test_products, categories)
    tr_doc_lab = tr_lab
    if label_noise > 0:
        which, new = noisy_labels(tr_lab, categories, label_noise, seed)
        tr_doc_lab = tr_lab.copy()
        tr_doc_lab[which] = new
    dup_test, dup_train = duplicate_sources(tr_lab, te_lab, duplicates, seed)
    te_lab = te_lab.copy()
    te_lab[dup_test] = tr_lab[dup_train]  # the same category unless the test product's had no train product
    copy_from = {int(te_ids[i]): int(tr_ids[j]) for i, j in zip(dup_test, dup_train)}
    kept: Dict[int, list] = {}

    paths = {
        "train_bson": os.path.join(out, "train.bson"),
        "test_bson": os.path.join(out, "test.bson"),
        "category_names": os.path.join(out, "category_names.csv"),
        "test_answers": os.path.join(out, "test_answers.csv"),
    }
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn" if os.name == "nt" else "fork").Pool(workers)
    try:
        tr_stats = {"images": 0, "jpeg_bytes": 0}
        te_stats = {"images": 0, "jpeg_bytes": 0}
        train_docs = _keep_images(
            _product_docs(tr_ids, tr_lab, tr_n, cat_ids, train_rng, styles, True, quality, pool, tr_stats,
                          tr_doc_lab, texts[0]), set(copy_from.values()), kept)
        if order == "sorted":
            train_docs = sorted(train_docs, key=lambda d: d["category_id"])
        write_bson(paths["train_bson"], train_docs)
        write_bson(paths["test_bson"], _copy_images(
            _product_docs(te_ids, te_lab, te_n, cat_ids, test_rng, styles, False, quality, pool, te_stats,
                          text=texts[1]),
            copy_from, kept, te_stats))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    write_csv(paths["category_names"], CATEGORY_HEADER, table)
    write_csv(paths["test_answers"], ["_id", "category_id"],
              ((int(i), int(cat_ids[l])) for i, l in zip(te_ids, te_lab)))
    if label_noise > 0:
        paths["label_noise"] = os.path.join(out, LABEL_NOISE_FILE)
        write_csv(paths["label_noise"], LABEL_NOISE_HEADER,
                  ((int(tr_ids[i]), int(cat_ids[tr_doc_lab[i]]), int(cat_ids[tr_lab[i]])) for i in which))
    if duplicates > 0:
        paths["duplicates"] = os.path.join(out, DUPLICATES_FILE)
        write_csv(paths["duplicates"], DUPLICATES_HEADER, sorted(copy_from.items()))
    if text_categories:
        paths["titles"] = os.path.join(out, synthetic_text.TITLES_FILE)
        write_csv(paths["titles"], synthetic_text.TITLES_HEADER, _title_rows(texts, copy_from))
    n_img = tr_stats["images"] + te_stats["images"]
    result: Dict[str, object] = dict(paths)
    result.update(
        train_products=len(tr_ids),
        test_products=len(te_ids),
        train_images=tr_stats["images"],
        test_images=te_stats["images"],
        categories=categories,
        bytes=sum(os.path.getsize(p) for p in paths.values()),
        mean_jpeg_bytes=(tr_stats["jpeg_bytes"] + te_stats["jpeg_bytes"]) / n_img if n_img else 0.0,
        seconds=time.perf_counter() - t0,
        noisy_products=int(np.count_nonzero(tr_doc_lab != tr_lab)),
        duplicate_products=len(copy_from),
    )
    return result
