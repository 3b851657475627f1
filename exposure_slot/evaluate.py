"""Benchmark evaluation as the authors report it: PSNR and SSIM per image, and their
means over the under-exposed, the over-exposed and all images (SPEC section 5).

Python::

    from exposure_slot import load_official
    from exposure_slot.data import ExposureDataset, read_split
    from exposure_slot.evaluate import evaluate

    model = load_official("MSEC_level2.pth")
    result = evaluate(model, ExposureDataset(read_split("MSEC_Test.txt", root="/data/MSEC")),
                      workers=2)
    print(result.format_table())
    result.write_csv("msec_per_image.csv")

Command line: ``exposure-slot eval`` (see :func:`add_eval_command`).

The protocol: every image at its own size (batch 1), reflect-padded at the bottom
and right to a multiple of 4 and the output cropped back (the model's "pad" size
policy, the authors' evaluation script), the prediction clipped to [0, 1], metrics
from :mod:`exposure_slot.metrics` against the ground truth as read. Group means
are image-weighted: "all" is the mean over every image (for MSEC and SICE the
image-weighted mean of the "under" and "over" means).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import cli
from .data.datasets import (
    EXPOSURE_NAMES,
    OVER,
    UNDER,
    DatasetError,
    ExposureDataset,
    ImagePair,
    folder_pairs,
    read_split,
)
from .images import atomic_write, save_image
from .metrics import psnr, ssim

__all__ = ["ImageScore", "GroupScore", "EvaluationResult", "evaluate", "output_path", "add_eval_command"]

CSV_COLUMNS = ("name", "exposure", "label", "psnr", "ssim", "seconds")


@dataclasses.dataclass(frozen=True)
class ImageScore:
    """One image's result; ``seconds`` is the network's forward pass only."""

    name: str
    exposure: int
    label: float | None
    psnr: float
    ssim: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class GroupScore:
    """Means over a group of images (NaN when the group is empty)."""

    group: str
    images: int
    psnr: float
    ssim: float


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


@dataclasses.dataclass
class EvaluationResult:
    """Per-image scores and how they were obtained."""

    images: list[ImageScore]
    backend: str
    device: str
    size_policy: str

    def groups(self) -> list[GroupScore]:
        """The paper's rows: "under", "over" and "all"."""
        rows = []
        for group, members in (("under", [s for s in self.images if s.exposure == UNDER]),
                               ("over", [s for s in self.images if s.exposure == OVER]),
                               ("all", self.images)):
            rows.append(GroupScore(group, len(members), _mean([s.psnr for s in members]),
                                   _mean([s.ssim for s in members])))
        return rows

    def format_table(self) -> str:
        """The groups as a text table (PSNR in dB to 3 decimals, SSIM to 4)."""
        lines = [f"{'group':<6} {'images':>7} {'PSNR':>9} {'SSIM':>7}"]
        for row in self.groups():
            if row.images:
                lines.append(f"{row.group:<6} {row.images:>7} {row.psnr:>9.3f} {row.ssim:>7.4f}")
            else:
                lines.append(f"{row.group:<6} {0:>7} {'-':>9} {'-':>7}")
        return "\n".join(lines)

    def write_csv(self, path: str | os.PathLike) -> None:
        """One row per image (columns ``CSV_COLUMNS``, full precision), written atomically."""
        rows = [[s.name, EXPOSURE_NAMES[s.exposure], "" if s.label is None else repr(s.label),
                 repr(s.psnr), repr(s.ssim), f"{s.seconds:.6f}"] for s in self.images]
        _write_csv(path, CSV_COLUMNS, rows)

    def write_summary(self, path: str | os.PathLike) -> None:
        """The group rows as CSV (``group,images,psnr,ssim``), written atomically."""
        rows = [[g.group, g.images, repr(g.psnr), repr(g.ssim)] for g in self.groups()]
        _write_csv(path, ("group", "images", "psnr", "ssim"), rows)


def _write_csv(path, header, rows) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


class _Guarded(torch.utils.data.Dataset):
    """Items as ``(index, item, None)`` or ``(index, None, message)``: a read error
    reaches the main process as its own one-line message, not a worker traceback."""

    def __init__(self, dataset: ExposureDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return index, self.dataset[index], None
        except DatasetError as exc:
            return index, None, str(exc)


def _unchanged(item):
    return item


def output_path(save_dir: Path, name: str) -> Path:
    """Where the prediction for the image ``name`` is saved: its path as a PNG."""
    return save_dir / Path(name).with_suffix(".png")


def _check_output_names(pairs: Sequence[ImagePair], save_dir: Path) -> None:
    claimed: dict[Path, str] = {}
    clashes = []
    for pair in pairs:
        target = output_path(save_dir, pair.name)
        if target in claimed:
            clashes.append(f"{claimed[target]} and {pair.name} -> {target}")
        claimed[target] = pair.name
    if clashes:
        raise ValueError("several images would be saved under the same name:\n  "
                         + "\n  ".join(clashes))


def evaluate(model: torch.nn.Module, dataset: ExposureDataset | Sequence[ImagePair], *,
             device: torch.device | str | None = None, workers: int = 0,
             save_outputs: str | os.PathLike | None = None,
             progress: bool = True) -> EvaluationResult:
    """PSNR and SSIM of ``model`` on every image of ``dataset``.

    Args:
        model: an :class:`~exposure_slot.ExposureSlot` (its ``size_policy`` applies;
            "pad" is the authors' evaluation protocol). It runs in eval mode; its
            training mode is restored afterwards.
        dataset: an :class:`ExposureDataset` (without ``resize``/``crop``/``flip``
            for the paper's protocol) or a list of :class:`ImagePair`.
        device: where to compute; default: where the model's parameters are.
        workers: DataLoader worker processes that read images in parallel (0: read
            in this process).
        save_outputs: a folder for the predictions, as 8-bit PNGs at
            ``output_path(folder, name)`` (written atomically).
        progress: show a tqdm progress bar on stderr.

    Raises:
        DatasetError: an image could not be read, or its ground truth differs in
            size; the message names the files. Nothing more is evaluated.
    """
    from tqdm import tqdm

    from .backends import resolve_backend

    if not isinstance(dataset, ExposureDataset):
        dataset = ExposureDataset(dataset)
    parameter = next(model.parameters())
    device = torch.device(device) if device is not None else parameter.device
    model_dtype = parameter.dtype
    save_dir = Path(save_outputs) if save_outputs is not None else None
    if save_dir is not None:
        _check_output_names(dataset.pairs, save_dir)
    loader = torch.utils.data.DataLoader(_Guarded(dataset), batch_size=None, shuffle=False,
                                         num_workers=workers, collate_fn=_unchanged,
                                         pin_memory=device.type == "cuda")
    scores: list[ImageScore] = []
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(dataset), unit="image", desc="evaluating", file=sys.stderr,
               disable=True if not progress else None, dynamic_ncols=True)
    try:
        for index, item, error in loader:
            if error is not None:
                raise DatasetError(error)
            x, gt, exposure, name = item
            x = x[None].to(device=device, dtype=model_dtype, non_blocking=True)
            gt = gt.to(device=device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.inference_mode():
                pred = model(x)[0]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            score = ImageScore(name, exposure, dataset.pairs[index].label, psnr(pred, gt),
                               ssim(pred, gt), seconds)
            scores.append(score)
            if save_dir is not None:
                target = output_path(save_dir, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                save_image(target, pred, format="PNG", bit_depth=8)
            bar.update()
            bar.set_postfix_str(f"PSNR {score.psnr:.2f}", refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    backend = getattr(model, "backend", "reference")
    concrete = resolve_backend(backend, device)
    return EvaluationResult(scores, backend=concrete if backend == concrete else f"{backend} -> {concrete}",
                            device=str(device), size_policy=getattr(model, "size_policy", "none"))


# --------------------------------------------------------------------------
# exposure-slot eval

_EVAL_DESCRIPTION = """\
Measure a model on a benchmark the way the paper reports it: PSNR and SSIM of every
image, and their means over the under-exposed, the over-exposed and all images.

The data: either one of the authors' split files (--split MSEC_Test.txt, with
--root the folder that holds the dataset; the authors' absolute paths are
re-rooted under it, keeping as much of their folder layout as needed to find the
files), or a folder of inputs and a folder of ground truths matched by file name
stem (--input-dir/--gt-dir; MSEC names such as a0001_N1.5.JPG match a0001.jpg and
give their exposure from the name). Every file is checked before the model runs:
missing or unreadable files are all listed, exit code 2, nothing written.

Exposure groups: MSEC EV < 0 is under-exposed, the rest over; SICE labels 0 (low)
and 2 (over); LCDP labels by the sign of input minus ground truth (the paper
reports only its "all" row).
Images are evaluated at full size, reflect-padded to a multiple of 4 and cropped
back (--size-policy pad, the authors' protocol).

Exit codes: 0 done; 1 an image failed while running (nothing but already saved
outputs is written); 2 a setup error (missing files, bad checkpoint or options).
"""

_EVAL_EPILOG = """\
examples:
  exposure-slot eval --split MSEC_Test.txt --root /data/MSEC --checkpoint MSEC_level2.pth
  exposure-slot eval --split SICEV2_Test.txt --root /data/SICEV2 --checkpoint SICE_level3.pth \\
      --csv sice_per_image.csv --save-outputs sice_out --workers 4
  exposure-slot eval --input-dir MSEC/testing/INPUT_IMAGES \\
      --gt-dir MSEC/testing/expert_c_testing_set --checkpoint runs/msec/checkpoint.pt
"""


def add_eval_command(commands) -> None:
    """Register ``exposure-slot eval`` on the CLI's subparsers."""
    parser = commands.add_parser("eval", help="PSNR/SSIM of a model on a benchmark (paper's table)",
                                 description=_EVAL_DESCRIPTION, epilog=_EVAL_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (a split file, or an input/gt folder pair)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", type=Path, metavar="CSV",
                        help="the authors' split file (header ',Ex,filename,filepath,gtpath,NAME')")
    source.add_argument("--input-dir", type=Path, metavar="DIR", help="folder of input images")
    data.add_argument("--root", type=Path, metavar="DIR",
                      help="with --split: the folder that holds the dataset (default: paths as "
                           "written, relative ones from the split file's folder)")
    data.add_argument("--gt-dir", type=Path, metavar="DIR",
                      help="with --input-dir: folder of ground-truth images")
    data.add_argument("--exposure", choices=("under", "over"),
                      help="with --input-dir: the group of inputs whose name carries no EV "
                           "(default: unknown, counted in 'all' only)")

    cli.add_model_options(parser)

    out = parser.add_argument_group("output")
    out.add_argument("--csv", type=Path, metavar="PATH",
                     help="write one row per image: " + ",".join(CSV_COLUMNS))
    out.add_argument("--summary", type=Path, metavar="PATH",
                     help="write the table as CSV: group,images,psnr,ssim")
    out.add_argument("--save-outputs", type=Path, metavar="DIR",
                     help="save every prediction as an 8-bit PNG under DIR (name's path, .png)")
    out.add_argument("--workers", type=int, default=2, metavar="N",
                     help="processes reading images in parallel (default 2; 0: none)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_eval)


def _dataset_from_args(args) -> ExposureDataset:
    if args.split is not None:
        if args.gt_dir is not None or args.exposure is not None:
            raise cli._UsageError("--gt-dir and --exposure go with --input-dir, not --split")
        pairs = read_split(args.split, root=args.root)
    else:
        if args.gt_dir is None:
            raise cli._UsageError("--input-dir needs --gt-dir")
        if args.root is not None:
            raise cli._UsageError("--root goes with --split, not --input-dir")
        pairs = folder_pairs(args.input_dir, args.gt_dir, exposure=args.exposure)
    return ExposureDataset(pairs)


def _check_outputs(args) -> None:
    """Fail before any work if an output cannot be written where asked."""
    if args.workers < 0:
        raise cli._UsageError(f"--workers must be 0 or more, got {args.workers}")
    for option, path in (("--csv", args.csv), ("--summary", args.summary)):
        if path is None:
            continue
        if path.is_dir():
            raise cli._UsageError(f"{option} {path} is a directory; give a file name")
        if not path.parent.is_dir():
            raise cli._UsageError(f"{option}: directory {path.parent} does not exist")
    save = args.save_outputs
    if save is not None and save.exists() and not save.is_dir():
        raise cli._UsageError(f"--save-outputs {save} exists and is not a directory")


def _cmd_eval(args) -> int:
    _check_outputs(args)
    try:
        dataset = _dataset_from_args(args)
        if args.save_outputs is not None:
            _check_output_names(dataset.pairs, args.save_outputs)
    except (DatasetError, ValueError) as exc:
        raise cli._UsageError(str(exc)) from None
    model, device, _ = cli._build_model(args)
    if args.save_outputs is not None:
        try:
            args.save_outputs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cli._UsageError(f"cannot create {args.save_outputs}: {exc.strerror or exc}") from None
    try:
        result = evaluate(model, dataset, device=device, workers=args.workers,
                          save_outputs=args.save_outputs, progress=not args.no_progress)
    except (DatasetError, OSError) as exc:
        detail = exc if isinstance(exc, DatasetError) else f"cannot write a prediction: {exc}"
        print(f"exposure-slot: error: {detail}", file=sys.stderr)
        print("evaluation stopped; no table written", file=sys.stderr)
        return cli.EXIT_SOME_FAILED

    print(result.format_table())
    print(f"{len(result.images)} images; backend {result.backend}; device {result.device}; "
          f"size policy {result.size_policy}; network "
          f"{math.fsum(s.seconds for s in result.images):.2f} s in all")
    if args.random_weights:
        print("(random weights: these numbers say nothing about the method)", file=sys.stderr)
    for path, write in ((args.csv, result.write_csv), (args.summary, result.write_summary)):
        if path is not None:
            try:
                write(path)
            except OSError as exc:
                print(f"exposure-slot: error: cannot write {path}: {exc.strerror or exc}",
                      file=sys.stderr)
                return cli.EXIT_SOME_FAILED
            print(f"wrote {path}")
    if args.save_outputs is not None:
        print(f"predictions in {args.save_outputs}")
    return cli.EXIT_OK
