"""Labelled image grids (epochs × weights × prompts) that stay readable on a phone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]  # left, top, right, bottom


@dataclass
class Grid:
    image: Image.Image
    parameters: str  # A1111's parameters text of the first cell
    cells: list[list[Box]]
    row_labels: list[Box]
    col_labels: list[Box]


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    parameters: str = "",
    max_width: int = 2048,
) -> Grid:
    """Cells in rows under column labels, row labels on the left, on white; at most ``max_width`` wide.

    Cells are scaled down (never up) to fit; the font grows with the cells (an eighth of a cell's
    width, 16-64 px) so labels keep their size relative to the images when a phone shrinks the grid.
    """
    if (
        not rows
        or not rows[0]
        or len(rows) != len(row_labels)
        or any(len(r) != len(col_labels) for r in rows)
    ):
        raise ValueError("a grid needs one label per row and per column, and rows of equal length")
    cell_w, cell_h = rows[0][0].size
    font = ImageFont.load_default(size=max(16, min(64, cell_w // 8)))
    pad = font.size // 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.multiline_textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label_w = max(text_size(t)[0] for t in row_labels) + 2 * pad
    cols = len(col_labels)
    scale = min(1.0, (max_width - label_w) / (cols * cell_w))
    if scale <= 0:
        raise ValueError(f"row labels are too wide for a {max_width} px grid")
    cw, ch = max(1, int(cell_w * scale)), max(1, int(cell_h * scale))
    head_h = max(text_size(t)[1] for t in col_labels) + 2 * pad
    width, height = label_w + cols * cw, head_h + len(rows) * ch
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    col_boxes: list[Box] = []
    for c, text in enumerate(col_labels):
        box = (label_w + c * cw, 0, label_w + (c + 1) * cw, head_h)
        draw.multiline_text(
            ((box[0] + box[2]) // 2, head_h // 2), text, fill="black", font=font, anchor="mm", align="center"
        )
        col_boxes.append(box)
    cells, row_boxes = [], []
    for r, (row, text) in enumerate(zip(rows, row_labels, strict=True)):
        top = head_h + r * ch
        row_boxes.append((0, top, label_w, top + ch))
        draw.multiline_text((pad, top + ch // 2), text, fill="black", font=font, anchor="lm")
        boxes = []
        for c, img in enumerate(row):
            box = (label_w + c * cw, top, label_w + (c + 1) * cw, top + ch)
            canvas.paste(img.convert("RGB").resize((cw, ch), Image.Resampling.LANCZOS), box[:2])
            boxes.append(box)
        cells.append(boxes)
    return Grid(canvas, parameters, cells, row_boxes, col_boxes)
