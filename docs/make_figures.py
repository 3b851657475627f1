"""Regenerate the README's pictures (run from the repository root, with the
project's shared/ folder beside it):

    python docs/make_figures.py

* docs/synthesis.jpg: one held-out Kodak photo and its synthetic exposure errors
  (exposure_slot.data.synthesize): original, EV -2, -1, +1, +2, mixed -2..+2.
* docs/demo.jpg: what 'exposure-slot demo' draws, at a small size.
"""

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from exposure_slot import load_pretrained
from exposure_slot.data import synthesize
from exposure_slot.demo import (DEFAULT_PHOTO, MIXED_SEED, demo_picture, fit_longest_side, run_demo,
                                shared_kodak)
from exposure_slot.images import atomic_write, read_image

DOCS = Path(__file__).resolve().parent
TILE = 320  # longest side of each picture in the grids


def _labelled(picture: torch.Tensor, labels, columns: int, tile_size) -> Image.Image:
    """The grid as a Pillow image with a caption in each tile's corner."""
    array = (picture.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array)
    draw = ImageDraw.Draw(image)
    height, width = tile_size
    for index, text in enumerate(labels):
        row, column = divmod(index, columns)
        x, y = column * (width + 4) + 6, row * (height + 4) + 6
        box = draw.textbbox((x, y), text)
        draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 255))
    return image


def _save_jpeg(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: image.save(f, format="JPEG", quality=88))
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    kodak = shared_kodak()
    if kodak is None:
        raise SystemExit("shared/data/kodak not found (set EXPOSURE_SLOT_SHARED)")
    photo = fit_longest_side(read_image(kodak / DEFAULT_PHOTO).tensor[0], TILE)
    size = tuple(photo.shape[-2:])

    cases = [("original", None), ("EV -2", -2.0), ("EV -1", -1.0), ("EV +1", 1.0), ("EV +2", 2.0),
             ("mixed -2..+2 EV", (-2.0, 2.0))]
    tiles = [photo if ev is None else synthesize(photo, ev, mixed=isinstance(ev, tuple), seed=MIXED_SEED)
             for _, ev in cases]
    grid = demo_picture([tiles[:3], tiles[3:]])
    _save_jpeg(_labelled(grid, [label for label, _ in cases], 3, size), DOCS / "synthesis.jpg")

    model = load_pretrained("demo")
    picture, results = run_demo(model, photo, [("reference", torch.device("cpu"), False)])
    labels = []
    for result in results:
        labels += [f"{result.label}: {result.input_scores[0]:.1f} dB",
                   f"corrected: {result.output_scores[0]:.1f} dB", "ground truth", "exposure regions"]
    _save_jpeg(_labelled(picture, labels, 4, size), DOCS / "demo.jpg")


if __name__ == "__main__":
    main()
