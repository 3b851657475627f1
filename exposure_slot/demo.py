"""``exposure-slot demo``: the shipped demo weights on synthetic exposure errors.

A well-exposed photo (one of the held-out Kodak images kodim19-24 when the
project's shared data is present, else a photo given on the command line, else
the generated example scene) is re-exposed three ways: under (-1.5 EV), over
(+1.5 EV) and mixed (a smooth field from -2 to +2 EV). The demo model corrects
each on every available backend and as its ``optimize_for_inference`` copy (what
``enhance`` runs); the command prints PSNR/SSIM against the original and the time
per image, and writes one picture, a row per case:
input | output | ground truth | exposure-region masks.

It also holds the held-out benchmark behind the demo model card
(:func:`heldout_benchmark`, ``exposure-slot demo --benchmark``) and the classical
baseline it is compared with (:func:`auto_levels_gamma`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .data.synthesis import synthesize
from .metrics import psnr, ssim

HELDOUT = tuple(f"kodim{i:02d}.png" for i in range(19, 25))  # the demo model never saw these
DEFAULT_PHOTO = "kodim23.png"
# (label, EV or (low, high) range, mixed)
DEMO_CASES = (("under -1.5 EV", -1.5, False), ("over +1.5 EV", 1.5, False),
              ("mixed -2..+2 EV", (-2.0, 2.0), True))
BENCHMARK_EVS = (-2.0, -1.5, -1.0, 1.0, 1.5, 2.0)
MIXED_SEED = 0
TIMED_CALLS = 2  # the demo reports the best of these, after a warm-up call
# Mean luminance that the gamma baseline aims for: the average of kodim01-18 (0.416).
TARGET_MEAN_LUMINANCE = 0.416
_LUMA = (0.2126, 0.7152, 0.0722)  # Rec. 709 weights on the sRGB values


def shared_kodak() -> Path | None:
    """The project's ``shared/data/kodak`` folder (``$EXPOSURE_SLOT_SHARED`` or the
    ``shared`` folder beside the repository), or None when absent."""
    root = os.environ.get("EXPOSURE_SLOT_SHARED")
    shared = Path(root) if root else Path(__file__).resolve().parents[2] / "shared"
    folder = shared / "data" / "kodak"
    return folder if folder.is_dir() else None


def auto_levels_gamma(img: torch.Tensor, target_mean: float = TARGET_MEAN_LUMINANCE,
                      clip_percent: float = 0.5) -> torch.Tensor:
    """A classical global correction, the baseline of the model card.

    Auto-levels: the luminance's ``clip_percent`` and ``100 - clip_percent``
    percentiles are stretched to 0 and 1 (one linear map for all channels, so
    hues stay); then one gamma for all channels, found by bisection, brings the
    mean luminance to ``target_mean``. ``img``: ``[3,H,W]`` or ``[B,3,H,W]`` in [0,1].
    """
    batch = img if img.dim() == 4 else img[None]
    weights = torch.tensor(_LUMA, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    luma = (batch * weights).sum(dim=1).flatten(1)  # [B, HW]
    low = torch.quantile(luma, clip_percent / 100, dim=1).view(-1, 1, 1, 1)
    high = torch.quantile(luma, 1 - clip_percent / 100, dim=1).view(-1, 1, 1, 1)
    stretched = ((batch - low) / (high - low).clamp(min=1e-3)).clamp(1e-6, 1)

    def mean_luma(gamma):
        return ((stretched ** gamma) * weights).sum(dim=1).mean(dim=(1, 2)).view(-1, 1, 1, 1)

    # The mean luminance falls as gamma grows: bisect log(gamma) in [log 1/10, log 10].
    lo = torch.full_like(low, -2.302585)
    hi = torch.full_like(low, 2.302585)
    for _ in range(30):
        mid = (lo + hi) / 2
        too_bright = mean_luma(mid.exp()) > target_mean
        lo, hi = torch.where(too_bright, mid, lo), torch.where(too_bright, hi, mid)
    out = stretched ** ((lo + hi) / 2).exp()
    return out if img.dim() == 4 else out[0]


def _correct(model, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrected image ``[3,H,W]`` (clipped) and top-level masks ``[K,h,w]``."""
    weight = next(model.parameters())
    with torch.inference_mode():
        out = model(image[None].to(weight), return_aux=True)
    return out.image[0].clamp(0, 1).cpu().float(), out.masks[0][0].cpu().float()


# --------------------------------------------------------------------------
# Held-out benchmark


class BenchmarkRow(NamedTuple):
    condition: str  # "EV -2", ..., "mixed"
    method: str  # "no-op", "auto-levels+gamma", "demo model"
    psnr: float  # mean over the photos
    ssim: float


def benchmark_conditions(seed: int = MIXED_SEED):
    """(label, ev, mixed, seed) of each benchmark condition."""
    return [(f"EV {ev:+g}", ev, False, None) for ev in BENCHMARK_EVS] + [
        ("mixed -2..+2", (-2.0, 2.0), True, seed)]


def heldout_benchmark(model, photos: Sequence[torch.Tensor], *, seed: int = MIXED_SEED,
                      progress: bool = False) -> list[BenchmarkRow]:
    """Mean PSNR/SSIM over ``photos`` (well-exposed ``[3,H,W]``) for each condition of
    :func:`benchmark_conditions` and each method: the input unchanged, the
    auto-levels+gamma baseline, and ``model``. Photo ``i``'s mixed field uses seed
    ``seed + i``."""
    from tqdm import tqdm

    methods = {"no-op": lambda x: x, "auto-levels+gamma": auto_levels_gamma,
               "demo model": lambda x: _correct(model, x)[0]}
    rows = []
    conditions = benchmark_conditions(seed)
    bar = tqdm(total=len(conditions) * len(photos), disable=not progress, file=sys.stderr,
               desc="benchmark", unit="image")
    for label, ev, mixed, base_seed in conditions:
        scores = {name: [] for name in methods}
        for index, photo in enumerate(photos):
            source = synthesize(photo, ev, mixed=mixed,
                                seed=None if base_seed is None else base_seed + index)
            for name, method in methods.items():
                output = method(source)
                scores[name].append((psnr(output, photo), ssim(output, photo)))
            bar.update(1)
        for name, values in scores.items():
            rows.append(BenchmarkRow(label, name, sum(v[0] for v in values) / len(values),
                                     sum(v[1] for v in values) / len(values)))
    bar.close()
    return rows


def format_benchmark(rows: Sequence[BenchmarkRow]) -> str:
    """A Markdown table: one row per condition plus the mean, PSNR / SSIM per method."""
    methods = list(dict.fromkeys(row.method for row in rows))
    conditions = list(dict.fromkeys(row.condition for row in rows))
    table = {(row.condition, row.method): row for row in rows}
    lines = ["| condition | " + " | ".join(f"{m} PSNR / SSIM" for m in methods) + " |",
             "| --- |" + " --- |" * len(methods)]
    for condition in conditions + ["mean"]:
        cells = []
        for method in methods:
            if condition == "mean":
                picked = [table[c, method] for c in conditions]
                value = (sum(r.psnr for r in picked) / len(picked), sum(r.ssim for r in picked) / len(picked))
            else:
                value = (table[condition, method].psnr, table[condition, method].ssim)
            cells.append(f"{value[0]:.2f} / {value[1]:.3f}")
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The demo picture


def demo_picture(rows: Sequence[Sequence[torch.Tensor]], gap: int = 4) -> torch.Tensor:
    """Tile equally sized ``[3,H,W]`` images into a grid with white gaps."""
    height, width = rows[0][0].shape[-2:]
    columns = max(len(r) for r in rows)
    canvas = torch.ones(3, len(rows) * height + (len(rows) - 1) * gap,
                        columns * width + (columns - 1) * gap)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            top, left = i * (height + gap), j * (width + gap)
            canvas[:, top:top + height, left:left + width] = tile
    return canvas


def fit_longest_side(image: torch.Tensor, longest: int | None) -> torch.Tensor:
    """Downscale ``[3,H,W]`` so its longest side is at most ``longest`` (antialiased)."""
    height, width = image.shape[-2:]
    if not longest or max(height, width) <= longest:
        return image
    scale = longest / max(height, width)
    size = (max(8, round(height * scale)), max(8, round(width * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)


# --------------------------------------------------------------------------
# Command line


_DEMO_DESCRIPTION = """\
Show the shipped demo model at work: take a well-exposed photo, make under-,
over- and mixed-exposed versions of it, correct them, and write a picture with
one row per case (input | output | ground truth | exposure regions in colour).
Prints PSNR/SSIM (input and output against the original) and the time per
image on every available backend.

The demo model is a level-2 network trained for 2,400 steps on
synthetic exposure errors of 18 Kodak photos (see the README's model card); it
is a demonstration, not the authors' weights. With no PHOTO, the held-out Kodak
image kodim23 is used when the project's shared data is present, otherwise a
generated scene.
"""

_DEMO_EPILOG = """\
examples:
  exposure-slot demo                            # writes demo.png
  exposure-slot demo my_photo.jpg -o my_demo.png --size 640
  exposure-slot demo --benchmark                # the model card's held-out table
"""


def add_demo_command(commands) -> None:
    """Register ``exposure-slot demo`` on the CLI's subparsers."""
    parser = commands.add_parser("demo", help="correct synthetic exposure errors with the demo model",
                                 description=_DEMO_DESCRIPTION, epilog=_DEMO_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photo", nargs="?", type=Path, metavar="PHOTO",
                        help="a well-exposed photo (default: held-out kodim23, else a generated scene)")
    parser.add_argument("-o", "--output", type=Path, default=Path("demo.png"), metavar="OUT.png",
                        help="the side-by-side picture to write (default demo.png)")
    parser.add_argument("--size", type=int, default=768, metavar="N",
                        help="downscale the photo so its longest side is at most N (default 768)")
    parser.add_argument("--weights", type=Path, metavar="PATH",
                        help="a weights.pt from 'exposure-slot train' instead of the demo weights")
    parser.add_argument("--benchmark", action="store_true",
                        help="instead: the held-out benchmark of the model card (kodim19-24, "
                             "EV -2..+2 and mixed; no-op, auto-levels+gamma and the model)")
    parser.set_defaults(func=_cmd_demo)


def _load_model(args):
    from .checkpoint import CheckpointError
    from .cli import _UsageError
    from .pretrained import load_pretrained, load_weights

    try:
        return load_weights(args.weights) if args.weights else load_pretrained("demo")
    except CheckpointError as exc:
        raise _UsageError(" ".join(str(exc).split())) from None


def _pick_photo(args) -> tuple[torch.Tensor, str]:
    from .cli import _UsageError, make_example_image
    from .images import ImageReadError, read_image

    if args.photo is not None:
        try:
            return read_image(args.photo).tensor[0], str(args.photo)
        except ImageReadError as exc:
            raise _UsageError(f"cannot read {args.photo}: {exc}") from None
    kodak = shared_kodak()
    if kodak is not None and (kodak / DEFAULT_PHOTO).is_file():
        return read_image(kodak / DEFAULT_PHOTO).tensor[0], f"{kodak / DEFAULT_PHOTO} (held out)"
    scene = torch.from_numpy(make_example_image(512, 384)).permute(2, 0, 1).contiguous()
    return scene, "the generated example scene (no photo given and no shared Kodak data)"


class CaseResult(NamedTuple):
    label: str
    input_scores: tuple[float, float]  # PSNR, SSIM of the synthetic input
    output_scores: tuple[float, float]  # PSNR, SSIM of the corrected image (fastest run)
    seconds: dict[str, float]  # "backend" or "backend/device" -> time per image


def backend_runs() -> list[tuple[str, torch.device, bool]]:
    """Every (available backend, device it can compute on, False): the model as it is;
    then per device ("auto", device, True): its ``optimize_for_inference`` copy, the
    model ``enhance`` runs. CPU first, then CUDA."""
    from .backends import available_backends, resolve_backend

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    runs = []
    for device in devices:
        for backend in available_backends():
            try:
                resolve_backend(backend, device)
            except ValueError:  # a backend for another device
                continue
            runs.append((backend, device, False))
        runs.append(("auto", device, True))
    return runs


def run_demo(model, photo: torch.Tensor, runs: Sequence[tuple[str, torch.device, bool]]
             ) -> tuple[torch.Tensor, list[CaseResult]]:
    """Re-expose ``photo`` (``[3,H,W]``) as in ``DEMO_CASES``, correct each case with
    every (backend, device, optimized) of ``runs`` (best of ``TIMED_CALLS`` after a
    warm-up; ``optimized``: the model's ``optimize_for_inference`` copy), and return the
    demo picture (a row per case: input | output of the fastest run | ground truth |
    exposure regions) and the scores."""
    from .images import colorize_masks
    from .inference import optimize_for_inference

    height, width = photo.shape[-2:]
    several_devices = len({device.type for _, device, _ in runs}) > 1
    runners = []  # (label, backend, device, the optimized copy or None)
    for backend, device, optimized in runs:
        label = "optimized" if optimized else backend
        if optimized:
            model.to(device).backend = backend
        runners.append((f"{label}/{device.type}" if several_devices else label, backend, device,
                        optimize_for_inference(model) if optimized else None))
    picture_rows, results = [], []
    for label, ev, mixed in DEMO_CASES:
        source = synthesize(photo, ev, mixed=mixed, seed=MIXED_SEED if mixed else None)
        seconds, fastest = {}, None
        for name, backend, device, optimized in runners:
            runner = optimized
            if runner is None:
                runner = model.to(device)
                runner.backend = backend
            _correct(runner, source)  # warm-up: first calls allocate and pick kernels
            elapsed = float("inf")
            for _ in range(TIMED_CALLS):
                start = time.perf_counter()
                output, masks = _correct(runner, source)  # returns CPU tensors: the GPU is done
                elapsed = min(elapsed, time.perf_counter() - start)
            seconds[name] = elapsed
            if fastest is None or elapsed < fastest[0]:
                fastest = (elapsed, output, masks)
        _, output, masks = fastest
        results.append(CaseResult(label, (psnr(source, photo), ssim(source, photo)),
                                  (psnr(output, photo), ssim(output, photo)), seconds))
        regions = colorize_masks(masks, (height, width), padded=model.size_policy == "pad")
        picture_rows.append([source, output, photo, regions])
    return demo_picture(picture_rows), results


def _cmd_demo(args) -> int:
    from .cli import EXIT_OK, _UsageError
    from .images import save_image

    model = _load_model(args)
    if args.benchmark:
        return _run_benchmark(model)
    if args.output.suffix.lower() != ".png":
        raise _UsageError(f"the demo picture is a PNG: OUT must end in .png, got {args.output.name!r}")
    if not args.output.parent.is_dir():
        raise _UsageError(f"directory {args.output.parent} does not exist")
    if args.size < 8:
        raise _UsageError(f"--size must be at least 8, got {args.size}")
    photo, source = _pick_photo(args)
    photo = fit_longest_side(photo, args.size)
    print(f"photo: {source}, {photo.shape[-1]}x{photo.shape[-2]}")
    name = "demo weights" if args.weights is None else str(args.weights)
    print(f"model: {name} ({model.metadata.get('steps', '?')} steps; "
          f"{model.metadata.get('data', 'unknown data')})")
    picture, results = run_demo(model, photo, backend_runs())
    print(f"{'case':<18}{'input PSNR/SSIM':>18}{'output PSNR/SSIM':>19}   time per image")
    for result in results:
        times = ", ".join(f"{backend} {seconds:.2f} s" for backend, seconds in result.seconds.items())
        print(f"{result.label:<18}{result.input_scores[0]:>9.2f} / {result.input_scores[1]:.3f}"
              f"{result.output_scores[0]:>10.2f} / {result.output_scores[1]:.3f}   {times}")
    save_image(args.output, picture, format="PNG")
    print(f"wrote {args.output}: rows {', '.join(c[0] for c in DEMO_CASES)}; "
          "columns input | output | ground truth | exposure regions (blue, orange, green)")
    return EXIT_OK


def _run_benchmark(model) -> int:
    from .cli import EXIT_OK, _UsageError
    from .images import read_image

    kodak = shared_kodak()
    if kodak is None or not all((kodak / name).is_file() for name in HELDOUT):
        raise _UsageError("the benchmark needs the held-out Kodak photos kodim19-24 in "
                          "shared/data/kodak (set EXPOSURE_SLOT_SHARED to the shared folder)")
    photos = [read_image(kodak / name).tensor[0] for name in HELDOUT]
    if torch.cuda.is_available():
        model.to("cuda")
    else:  # the fast CPU path: the same outputs within about 1e-7
        from .inference import optimize_for_inference
        model = optimize_for_inference(model)
    start = time.perf_counter()
    rows = heldout_benchmark(model, photos, progress=True)
    print(format_benchmark(rows))
    print(f"(kodim19-24 at full size; mean over the 6 photos; {time.perf_counter() - start:.0f} s)")
    return EXIT_OK
