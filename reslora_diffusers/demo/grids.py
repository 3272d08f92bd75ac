"""Labelled image grids (PIL only)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def _wrap(text: str, font, max_width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in str(text).split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > max_width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines or [""]


def make_grid(
    images: list[list[Image.Image]],
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    cell_size: int | None = None,
    pad: int = 2,
    background=(255, 255, 255),
) -> Image.Image:
    """Arrange ``images[row][col]`` into a grid with row labels on the left and column labels on top.

    Cells are resized to ``cell_size`` (default: the first image's width, at least 96 px so that the
    labels stay readable). Labels use PIL's default font and are word-wrapped.
    """
    if not images or not images[0]:
        raise ValueError("images must be a non-empty list of non-empty rows")
    n_rows, n_cols = len(images), max(len(r) for r in images)
    row_labels = list(row_labels) if row_labels is not None else [""] * n_rows
    col_labels = list(col_labels) if col_labels is not None else [""] * n_cols
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise ValueError("need one row label per row and one column label per column")
    cell = cell_size or max(96, images[0][0].width)
    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = (font.getbbox("Ag")[3] - font.getbbox("Ag")[1]) + 4

    label_w = 0
    row_lines = [_wrap(t, font, 160, scratch) for t in row_labels]
    if any(row_labels):
        label_w = int(max(scratch.textlength(line, font=font) for lines in row_lines for line in lines)) + 8
    col_lines = [_wrap(t, font, cell - 4, scratch) for t in col_labels]
    label_h = (max(len(lines) for lines in col_lines) * line_h + 4) if any(col_labels) else 0

    width = label_w + n_cols * (cell + pad) + pad
    height = label_h + n_rows * (cell + pad) + pad
    grid = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(col_lines):
        x0 = label_w + pad + c * (cell + pad)
        for k, line in enumerate(lines):
            w = draw.textlength(line, font=font)
            draw.text((x0 + (cell - w) / 2, 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    for r, row in enumerate(images):
        y0 = label_h + pad + r * (cell + pad)
        lines = row_lines[r]
        ty = y0 + (cell - len(lines) * line_h) / 2
        for k, line in enumerate(lines):
            draw.text((4, ty + k * line_h), line, fill=(0, 0, 0), font=font)
        for c, im in enumerate(row):
            im = im.convert("RGB")
            if im.size != (cell, cell):
                im = im.resize((cell, cell), Image.NEAREST if im.width < cell else Image.LANCZOS)
            grid.paste(im, (label_w + pad + c * (cell + pad), y0))
    return grid
