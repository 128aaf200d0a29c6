"""Sample English input drawn with PIL (shapes, colours, text, bar charts) whose ground truth is known.

`make demo` and the tests run on it; three deliberately bad records (corrupt image, empty question,
over-long answer) show the quarantine path. Rows follow schemas/input.v2.yaml (a conversation of turns);
`multi_turn` adds conversations of several exchanges about one image.
"""

from __future__ import annotations

import io
import random

from babelsynth.schema import to_table

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("HELLO", "OPEN", "EXIT", "SALE", "STOP", "CAFE", "BOOKS", "TAXI")


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _canvas(size=(224, 224), bg=(250, 250, 250)):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, bg)
    return im, ImageDraw.Draw(im)


def _shape(draw, shape: str, colour, box):
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow
        return ImageFont.load_default()


def exchange(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def make_samples(n_per_task: int = 12, seed: int = 0, bad: bool = True, multi_turn: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []

    def add(task, q, a, images, source="babelsynth-sample", more=()):
        rows.append(
            {
                "source_id": f"{task}-{len(rows):04d}",
                "task_type": task,
                "conversation": exchange(q, a) + [t for qa in more for t in exchange(*qa)],
                "images": images,
                "source": source,
            }
        )

    for _ in range(n_per_task):  # captioning
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        im, d = _canvas()
        _shape(d, s, COLOURS[c], (50, 50, 174, 174))
        add("captioning", "Describe the image briefly.", f"A {c} {s} on a white background.", [_png(im)])
    for _ in range(n_per_task):  # vqa: counting
        k, c, s = rng.randint(1, 5), rng.choice(list(COLOURS)), rng.choice(SHAPES)
        im, d = _canvas()
        for i in range(k):
            x = 10 + i * 42
            _shape(d, s, COLOURS[c], (x, 90, x + 36, 126))
        add("vqa", f"How many {s}s are in the image?", str(k), [_png(im)])
    for _ in range(n_per_task):  # ocr
        w, c = rng.choice(WORDS), rng.choice(list(COLOURS))
        im, d = _canvas((224, 112))
        d.text((20, 30), w, fill=COLOURS[c], font=_font(40))
        add("ocr", "What word is written in the image?", w, [_png(im)])
    for _ in range(n_per_task):  # chart
        labels = rng.sample(["A", "B", "C", "D", "E"], 4)
        vals = [rng.randint(1, 9) for _ in labels]
        im, d = _canvas()
        for i, (lab, v) in enumerate(zip(labels, vals)):
            x = 20 + i * 50
            d.rectangle((x, 200 - v * 20, x + 30, 200), fill=COLOURS["blue"])
            d.text((x + 10, 205), lab, fill=(0, 0, 0), font=_font(14))
        top = labels[vals.index(max(vals))]
        add(
            "chart",
            "Which bar in the chart is the tallest?",
            top
            if vals.count(max(vals)) == 1
            else ", ".join(lab for lab, v in zip(labels, vals) if v == max(vals)),
            [_png(im)],
        )
    for _ in range(multi_turn):  # vqa over several exchanges about one image
        k, c, s = rng.randint(2, 5), rng.choice(list(COLOURS)), rng.choice(SHAPES)
        im, d = _canvas()
        for i in range(k):
            x = 10 + i * 42
            _shape(d, s, COLOURS[c], (x, 90, x + 36, 126))
        add(
            "vqa",
            f"How many {s}s are in the image?",
            str(k),
            [_png(im)],
            more=[("What colour are they?", c), ("What is the background colour?", "white")],
        )
    if bad:
        im, d = _canvas()
        add(
            "captioning",
            "Describe the image briefly.",
            "A blank image.",
            [b"\x89PNG\r\n\x1a\nnot really a png"],
        )
        add("vqa", "", "3", [_png(im)])
        add("captioning", "Describe the image briefly.", "word " * 5000, [_png(im)])
    return rows


def write_samples(
    uri: str, n_per_task: int = 12, seed: int = 0, bad: bool = True, multi_turn: int = 0
) -> int:
    import pyarrow.parquet as pq

    from babelsynth import storage

    rows = make_samples(n_per_task, seed, bad, multi_turn)
    buf = io.BytesIO()
    pq.write_table(to_table("input", rows), buf)
    storage.write_bytes(uri, buf.getvalue())
    return len(rows)
