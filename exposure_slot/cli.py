"""The ``exposure-slot`` command line tool.

    exposure-slot enhance IMAGE... -o OUTDIR --checkpoint MSEC_level2.pth
    exposure-slot enhance IMAGE... -o OUTDIR --random-weights     # pipeline test only
    exposure-slot example-image scene.png --size 640x480

Exit codes: 0 all inputs enhanced; 1 at least one input failed (the others are
still written); 2 a usage or setup error (bad option, missing or corrupt
checkpoint, unusable output directory), in which case nothing is written;
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from .enhance import Enhancer, expand_inputs, one_line
from .host_memory import keep_freed_memory

CLI_KEPT_BLOCK = 64 << 20

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_DESCRIPTION = """\
Exposure-slot (CVPR 2025): correct under- and over-exposed regions of photos.
Run 'exposure-slot COMMAND --help' for the options of a command.
"""

_EPILOG = """\
quick start, with nothing downloaded:
  exposure-slot demo                  # the shipped demo model on synthetic exposure errors
  exposure-slot example-image scene.png
  exposure-slot enhance scene.png -o out --random-weights --save-masks   # pipeline only
with the authors' trained weights:
  exposure-slot enhance photo.jpg -o out --checkpoint MSEC_level2.pth
"""

_ENHANCE_DESCRIPTION = """\
Correct the exposure of each IMAGE and write the result to OUTDIR under the
same file name stem: JPEG inputs give JPEG outputs (quality 95), PNG and other
inputs give PNG outputs; 16-bit PNGs give 16-bit PNGs. EXIF orientation is
applied; grayscale and palette images are converted to RGB; an alpha channel
is passed through unchanged. Existing files in OUTDIR with the same names are
replaced. Files are written atomically, so OUTDIR never holds a partial file.

Weights: either --checkpoint with one of the authors' released checkpoints
(e.g. MSEC_level2.pth, SICE_level3.pth, LCDP_level2.pth; the level is read
from the file), or --random-weights to test the pipeline with a randomly
initialised network (its outputs are NOT meaningful corrections).

A file that cannot be read or processed is reported and skipped; the exit code
is then 1. Setup errors (bad checkpoint, bad options) exit with code 2 before
anything is written.

Folders are replaced by the photos and videos in them (not recursively). Photos
of the most common size (when two or more share it) and every frame of a video
go through a fixed-shape engine in batches (--batch-size): on a GPU it replays
one CUDA graph per batch, bfloat16 by default (--precision); decoding and
encoding run in worker threads (--workers), with pinned memory and asynchronous
copies between them and the GPU. Other photos run one by one, tiled when they
need it.

Videos (.mp4, .m4v, .mov, .mkv, .avi, .webm; the optional extra 'video', PyAV)
are written to OUTDIR under the same name: H.264 (VP9 for .webm) at visually
lossless settings, 8-bit, at the input's average frame rate; audio is not carried
over. A video is written to a hidden temporary file renamed at the end, so an
interrupted or failed run leaves no partial video. A video whose frame size
changes midway fails at the first frame of another size.
"""

_ENHANCE_EPILOG = """\
examples:
  exposure-slot enhance photo.jpg -o corrected/ --checkpoint MSEC_level2.pth
  exposure-slot enhance shots/*.png -o out/ --checkpoint SICE_level3.pth --save-masks
  exposure-slot enhance scene.png -o out/ --random-weights --level 3
  exposure-slot enhance pano.jpg -o out/ --checkpoint MSEC_level2.pth --max-memory 3G
  exposure-slot enhance shots/ -o out/ --checkpoint MSEC_level2.pth        # a folder
  exposure-slot enhance clip.mp4 -o out/ --checkpoint MSEC_level2.pth --batch-size 4
"""

_EXAMPLE_DESCRIPTION = """\
Write a generated, photo-like test scene (sky, sun, hills, a house and a few
shapes) whose left part is strongly under-exposed and whose right part is
over-exposed. The picture is the same on every machine, so the tool can be
tried with nothing downloaded. The format follows OUT's extension: .png or
.jpg/.jpeg.
"""


PRECISIONS = ("auto", "float32", "bfloat16", "float16")


class _UsageError(Exception):
    """A setup problem: reported as one line, exit code 2."""


# --------------------------------------------------------------------------
# Argument parsing


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}")
    try:
        width, height = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}") from None
    if not (8 <= width <= 16384 and 8 <= height <= 16384):
        raise argparse.ArgumentTypeError(f"width and height must be between 8 and 16384, got {text!r}")
    return width, height


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose and place the network (read by ``_build_model``),
    shared by the commands that run one: --checkpoint | --random-weights, --level,
    --seed, --backend, --device, --size-policy."""
    from . import available_backends

    model = parser.add_argument_group("model")
    weights = model.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", metavar="PATH", type=Path,
                         help="the authors' released checkpoint (.pth), e.g. MSEC_level2.pth, "
                              "or a {'model': state_dict} checkpoint of ours")
    weights.add_argument("--random-weights", action="store_true",
                         help="use a randomly initialised network (seeded); only for testing "
                              "the tool, the outputs are NOT real corrections")
    model.add_argument("--level", type=int, choices=(2, 3), default=None,
                       help="network level for --random-weights (default 2); with "
                            "--checkpoint it is read from the file and this only checks it")
    model.add_argument("--seed", type=int, default=0,
                       help="random seed for --random-weights (default 0)")
    model.add_argument("--backend", default="auto", metavar="NAME",
                       help="implementation of the slot attention: 'auto' (default) takes "
                            "the fastest one available; 'reference' is plain PyTorch. "
                            f"Available here: auto, {', '.join(available_backends())}")
    model.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where to compute: 'auto' (default) uses a CUDA GPU if there is one")
    model.add_argument("--size-policy", choices=("pad", "resize"), default="pad",
                       help="for sides that are not a multiple of 4: 'pad' (default) "
                            "reflect-pads the bottom/right edge and crops the result, as the "
                            "authors evaluate; 'resize' scales to the multiple of 4 below "
                            "and back, as the authors' training code does")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exposure-slot",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    enhance = commands.add_parser(
        "enhance",
        help="correct the exposure of photos",
        description=_ENHANCE_DESCRIPTION,
        epilog=_ENHANCE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    enhance.add_argument("images", nargs="+", metavar="INPUT",
                         help="input photos (JPEG or PNG, 8 or 16 bits per channel), folders "
                              "of them, or videos (.mp4, .m4v, .mov, .mkv, .avi, .webm; "
                              "needs the 'video' extra)")
    enhance.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR", type=Path,
                         help="directory for the results (created if missing)")
    add_model_options(enhance)
    enhance.add_argument("--save-masks", action="store_true",
                         help="also write <stem>_masks.png, a picture of the three top-level "
                              "exposure regions the network found, one colour per region "
                              "(blue, orange, green; soft borders mix the colours)")
    enhance.add_argument("--max-memory", metavar="SIZE", default=None,
                         help="memory the network may use per image, e.g. 4G or 800M "
                              "(default: half of the memory available, or of the free GPU "
                              "memory). Images that do not fit in one pass are processed in "
                              "tiles, with exactly the same result")
    enhance.add_argument("--tile", type=int, default=None, metavar="PIXELS",
                         help="always process in tiles of this side (rounded up to a "
                              "multiple of 4); default: tiles only when needed, as large "
                              "as the memory allows")
    speed = enhance.add_argument_group("speed")
    speed.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="what the convolutions compute in: 'auto' (default) is bfloat16 "
                            "on a GPU and float32 on a CPU; the slot attention and the "
                            "images stay float32 (float16: GPUs only)")
    speed.add_argument("--batch-size", type=int, default=None, metavar="N",
                       help="video frames, or photos of one size, per network call "
                            "(default: 4 on a GPU, 1 on a CPU; fewer when the memory "
                            "budget needs it)")
    speed.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                       help="threads that decode and encode files (default: up to 4)")
    enhance.set_defaults(func=_cmd_enhance)

    example = commands.add_parser(
        "example-image",
        help="write a generated test photo (no download needed)",
        description=_EXAMPLE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    example.add_argument("output", metavar="OUT", type=Path, help="file to write (.png, .jpg or .jpeg)")
    example.add_argument("--size", type=_parse_size, default=(512, 384), metavar="WxH",
                         help="width x height in pixels (default 512x384)")
    example.set_defaults(func=_cmd_example_image)

    from .evaluate import add_eval_command

    add_eval_command(commands)

    from .training import add_train_command

    add_train_command(commands)

    from .demo import add_demo_command

    add_demo_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    # Every command runs many CPU forwards or training steps in this one process.
    # Blocks of up to 64 MiB: larger ones kept would grow the heap with photos of
    # mixed sizes and break a --max-memory budget (exposure_slot/host_memory.py).
    keep_freed_memory(CLI_KEPT_BLOCK)
    try:
        return args.func(args)
    except _UsageError as exc:
        print(f"exposure-slot: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("exposure-slot: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# --------------------------------------------------------------------------
# enhance


def _pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def _build_model(args, precision: str | None = None):
    """The network, ready for inference, or a _UsageError. ``precision`` (a
    ``PRECISIONS`` name): the compute dtype of ``optimize_for_inference``'s frozen
    copy, on any device; None: that copy in float32 on CPUs, the network as it is
    on GPUs."""
    import torch

    from . import CheckpointError, ExposureSlot, load_official
    from .backends import validate_backend
    from .inference import optimize_for_inference

    try:
        validate_backend(args.backend)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    device = _pick_device(args.device)
    if args.random_weights:
        torch.manual_seed(args.seed)
        try:
            model = ExposureSlot(level=args.level or 2, backend=args.backend,
                                 size_policy=args.size_policy)
        except ValueError as exc:
            raise _UsageError(str(exc)) from None
        print(f"WARNING: --random-weights: the network is randomly initialised (level "
              f"{model.level}, seed {args.seed}); its outputs are NOT meaningful exposure "
              f"corrections. Use --checkpoint with trained weights for real results.",
              file=sys.stderr)
    else:
        path: Path = args.checkpoint
        if not path.exists():
            raise _UsageError(f"checkpoint not found: {path}")
        if path.is_dir():
            raise _UsageError(f"checkpoint is a directory, not a file: {path}")
        try:
            model = load_official(str(path), backend=args.backend, level=args.level)
        except CheckpointError as exc:
            raise _UsageError(f"cannot use checkpoint {path}: {one_line(exc)}") from None
        except Exception as exc:  # anything else the loader trips over
            raise _UsageError(f"cannot load checkpoint {path}: {type(exc).__name__}: "
                              f"{one_line(exc)}") from None
        model.size_policy = args.size_policy
    model = model.to(device).eval()
    try:
        backend = _resolved_backend(model, device)
    except ValueError as exc:  # e.g. a GPU backend on a CPU device
        raise _UsageError(one_line(exc)) from None
    if precision is not None:
        from .engine import default_dtype

        dtype = default_dtype(device) if precision == "auto" else getattr(torch, precision)
        try:
            model = optimize_for_inference(model, dtype)
        except ValueError as exc:  # e.g. float16 on a CPU
            raise _UsageError(f"--precision {precision}: {one_line(exc)}") from None
    elif device.type == "cpu":
        # Folded, fused, channels-last convolutions: same outputs within 1e-7 in float32.
        model = optimize_for_inference(model)
    return model, device, backend


def _resolved_backend(model, device) -> str:
    """What actually runs, e.g. "auto -> cpu"."""
    from .backends import resolve_backend

    name = model.backend
    concrete = resolve_backend(name, device)
    return f"auto -> {concrete}" if name == "auto" else concrete


def _cmd_enhance(args) -> int:
    from .images import is_video
    from .tiling import default_memory_budget, parse_memory_size

    if args.tile is not None and args.tile < 1:
        raise _UsageError(f"--tile must be a positive number of pixels, got {args.tile}")
    for option, value in (("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value is not None and value < 1:
            raise _UsageError(f"{option} must be at least 1, got {value}")
    try:
        budget = None if args.max_memory is None else parse_memory_size(args.max_memory)
    except ValueError as exc:
        raise _UsageError(f"--max-memory: {exc}") from None
    inputs = expand_inputs(args.images)
    videos = [path for path in inputs if is_video(path)]
    if videos:
        try:
            import av  # noqa: F401
        except ImportError:
            raise _UsageError(f"{videos[0]} is a video, and videos need PyAV, the optional extra "
                              "'video': pip install 'exposure-slot[video]'") from None
    model, device, backend = _build_model(args, precision=args.precision)
    if budget is None:
        budget = default_memory_budget(device)

    outdir: Path = args.output_dir
    if outdir.exists() and not outdir.is_dir():
        raise _UsageError(f"output directory {outdir} exists and is not a directory")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _UsageError(f"cannot create output directory {outdir}: {exc.strerror or exc}") from None

    run = Enhancer(args, model, device, backend, budget, outdir, total=len(inputs))
    images = [path for path in inputs if not is_video(path)]
    run.images(images)
    for number, path in enumerate(videos, len(images) + 1):
        run.video(path, number)

    summary = f"{run.done} enhanced, {run.failed} failed"
    print(summary, file=sys.stderr if run.failed else sys.stdout)
    if args.random_weights and run.done:
        print("(random weights: the outputs are not meaningful corrections)", file=sys.stderr)
    return EXIT_SOME_FAILED if run.failed else EXIT_OK


def make_example_image(width: int = 512, height: int = 384):
    """A deterministic photo-like RGB scene, float32 ``[H, W, 3]`` in ``[0, 1]``.

    Built from smooth gradients and simple shapes in normalised coordinates; the
    left part is about 3 stops under-exposed and the right part about 1.5
    stops over-exposed (clipped highlights), with smooth transitions.
    """
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u = (x + 0.5) / width  # 0..1 left to right
    v = (y + 0.5) / height  # 0..1 top to bottom
    aspect = width / height

    def smooth(edge0, edge1, t):
        s = np.clip((t - edge0) / (edge1 - edge0), 0.0, 1.0)
        return s * s * (3 - 2 * s)

    def mix(base, color, weight):
        return base * (1 - weight[..., None]) + np.asarray(color) * weight[..., None]

    # Sky: deep blue at the top to a pale haze at the horizon.
    sky_t = smooth(0.0, 0.6, v)
    img = mix(np.broadcast_to(np.array([0.18, 0.36, 0.72]), (height, width, 3)).copy(),
              [0.80, 0.86, 0.92], sky_t)
    # Sun with a glow.
    d_sun = np.hypot((u - 0.72) * aspect, v - 0.18)
    img = mix(img, [1.0, 0.93, 0.70], np.exp(-(d_sun / 0.18) ** 2) * 0.6)
    img = mix(img, [1.0, 0.97, 0.85], 1 - smooth(0.055, 0.065, d_sun))
    # Far hills (blue-green), then near hills (green) with a vertical gradient.
    far = 0.55 + 0.05 * np.sin(u * 9.0 + 1.0) + 0.03 * np.sin(u * 23.0)
    img = mix(img, [0.32, 0.48, 0.45], smooth(-0.004, 0.004, v - far))
    near = 0.66 + 0.06 * np.sin(u * 5.0 + 2.5) + 0.02 * np.sin(u * 17.0 + 0.3)
    grass = np.stack([0.20 + 0.15 * v, 0.50 - 0.20 * v, 0.15 + 0.0 * v], axis=-1)
    w_near = smooth(-0.004, 0.004, v - near)
    img = img * (1 - w_near[..., None]) + grass * w_near[..., None]
    # A house: walls, roof, door and a window.
    in_box = lambda x0, x1, y0, y1: (smooth(x0 - 0.003, x0 + 0.003, u) * (1 - smooth(x1 - 0.003, x1 + 0.003, u))
                                     * smooth(y0 - 0.003, y0 + 0.003, v) * (1 - smooth(y1 - 0.003, y1 + 0.003, v)))
    img = mix(img, [0.85, 0.78, 0.62], in_box(0.40, 0.58, 0.56, 0.76))
    roof = smooth(-0.004, 0.004, v - (0.56 - 0.10 * (1 - np.abs(u - 0.49) / 0.11))) * \
        (1 - smooth(0.555, 0.565, v)) * (1 - smooth(0.105, 0.115, np.abs(u - 0.49)))
    img = mix(img, [0.60, 0.20, 0.15], roof)
    img = mix(img, [0.35, 0.22, 0.12], in_box(0.475, 0.515, 0.66, 0.76))
    img = mix(img, [0.95, 0.90, 0.55], in_box(0.42, 0.46, 0.60, 0.65))
    # A red ball and a checkered box in the foreground, a white sail on the right.
    d_ball = np.hypot((u - 0.22) * aspect, v - 0.84)
    shade = 0.55 + 0.45 * np.clip(1 - np.hypot((u - 0.205) * aspect, v - 0.82) / 0.09, 0, 1)
    ball = 1 - smooth(0.075, 0.082, d_ball)
    img = img * (1 - ball[..., None]) + (np.array([0.85, 0.12, 0.10]) * shade[..., None]) * ball[..., None]
    checks = ((np.floor(u * 60) + np.floor(v * 45)) % 2)[..., None]
    box = in_box(0.05, 0.15, 0.72, 0.90)
    img = img * (1 - box[..., None]) + (0.25 + 0.5 * checks) * np.array([0.9, 0.8, 0.6]) * box[..., None]
    # A white sail: a triangle with its vertical edge at u = 0.84.
    sail = (smooth(0.835, 0.845, u) * (1 - smooth(0.795, 0.805, v))
            * smooth(-0.004, 0.004, v - (0.42 + 4.0 * (u - 0.84))))
    img = mix(img, [0.97, 0.97, 0.95], sail)

    # Texture: a deterministic integer hash (identical on every platform).
    xi, yi = x.astype(np.uint32), y.astype(np.uint32)
    h = (xi * np.uint32(73856093)) ^ (yi * np.uint32(19349663))
    h = (h ^ (h >> np.uint32(13))) * np.uint32(1274126177)
    h = h ^ (h >> np.uint32(16))
    grain = (h & np.uint32(0xFFFF)).astype(np.float64) / 65535.0 - 0.5
    img = np.clip(img + 0.02 * grain[..., None], 0.0, 1.0)

    # Exposure: in (approximately) linear light, -3 EV on the left, +1.5 EV on the right.
    ev = -3.0 * (1 - smooth(0.22, 0.40, u)) + 1.5 * smooth(0.62, 0.80, u)
    linear = img ** 2.2 * (2.0 ** ev)[..., None]
    out = np.clip(linear, 0.0, 1.0) ** (1 / 2.2)
    return out.astype(np.float32)


def _cmd_example_image(args) -> int:
    from .images import save_image

    out: Path = args.output
    suffix = out.suffix.lower()
    if suffix == ".png":
        fmt = "PNG"
    elif suffix in (".jpg", ".jpeg"):
        fmt = "JPEG"
    else:
        raise _UsageError(f"OUT must end in .png, .jpg or .jpeg, got {out.name!r}")
    if not out.parent.is_dir():
        raise _UsageError(f"directory {out.parent} does not exist")
    width, height = args.size
    save_image(out, make_example_image(width, height), format=fmt, bit_depth=8)
    print(f"wrote {out} ({width}x{height}, under-exposed left, over-exposed right)")
    return EXIT_OK
