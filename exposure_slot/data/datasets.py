"""Paired exposure-correction data: which input goes with which ground truth, and
a torch ``Dataset`` that reads them.

Two ways to describe a dataset, both giving a list of :class:`ImagePair`:

:func:`read_split`
    The authors' split files (``MSEC_Test.txt``, ``SICEV2_Test.txt``,
    ``LCDP_Test.txt``, ...): CSV with the header ``,Ex,filename,filepath,gtpath,NAME``;
    column 1 is the exposure label, column 3 the input path, column 4 the ground
    truth path, column 5 the dataset name. The paths are absolute paths on the
    authors' machine (``/home/.../data/MSEC/testing/INPUT_IMAGES/a0001_N1.5.JPG``);
    ``root`` re-roots them, see :func:`read_split`.

:func:`folder_pairs`
    An ``input/`` folder and a ``gt/`` folder, matched by file stem
    (``input/7.JPG`` -> ``gt/7.JPG``, any image extension), plus MSEC's naming rule:
    ``a0001_N1.5.JPG``, ``a0001_N1.JPG``, ``a0001_0.JPG``, ``a0001_P1.JPG`` and
    ``a0001_P1.5.JPG`` all have the ground truth ``a0001.jpg``, and the suffix is the
    exposure value (EV) of the input.

Exposure groups (the paper's "under" and "over" columns) follow each dataset's
convention:

* MSEC: EV label < 0 is under-exposed, the rest (0, +1, +1.5) over-exposed. The
  same sign rule serves LCDP, whose labels are the sign of the mean difference
  input - ground truth (the paper reports only LCDP's overall figure) and any
  dataset without a convention of its own.
* SICE (dataset names starting with ``SICE``): the test split labels its ``low``
  inputs 0 and its ``over`` inputs 2, the training split -1 and 1; so label <= 0
  is under-exposed, > 0 over-exposed.

Every pair's files are checked before anything is read (:func:`check_pairs`, run
by :class:`ExposureDataset`): one :class:`DatasetError` lists every missing or
unreadable file instead of a failure in the middle of an epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..images import ImageReadError, read_image

__all__ = [
    "DatasetError",
    "ImagePair",
    "UNDER",
    "OVER",
    "UNKNOWN",
    "EXPOSURE_NAMES",
    "IMAGE_SUFFIXES",
    "exposure_group",
    "read_split",
    "folder_pairs",
    "check_pairs",
    "ExposureDataset",
]

# Exposure groups, as returned by ExposureDataset (a plain int collates into a tensor).
UNDER, UNKNOWN, OVER = -1, 0, 1
EXPOSURE_NAMES = {UNDER: "under", OVER: "over", UNKNOWN: "unknown"}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_COLUMNS = ("Ex", "filename", "filepath", "gtpath")

# MSEC input names: <gt stem>_<EV>, EV one of N1.5, N1, 0, P1, P1.5 (other values of
# the same form are accepted too).
_MSEC_SUFFIX = re.compile(r"^(?P<base>.+)_(?P<ev>[NP]\d+(?:\.\d+)?|0)$")

# How many problem lines an error message shows before summarising the rest.
_MAX_LISTED = 50


class DatasetError(ValueError):
    """A split file or folder that cannot be used, or files that are missing or
    unreadable; the message names all of them."""


@dataclasses.dataclass(frozen=True)
class ImagePair:
    """One input image and its ground truth.

    Attributes:
        input: path of the input (the badly exposed photo).
        gt: path of the ground truth.
        name: unique, human-readable name: the input's path relative to the
            dataset (e.g. ``INPUT_IMAGES/a0001_N1.5.JPG`` or ``low/7.JPG``).
        label: the raw exposure label (the split file's ``Ex`` column, or MSEC's
            EV from the file name), or ``None`` if there is none.
        exposure: ``UNDER``, ``OVER`` or ``UNKNOWN``.
    """

    input: Path
    gt: Path
    name: str
    label: float | None = None
    exposure: int = UNKNOWN


def exposure_group(label: float, dataset: str = "") -> int:
    """``UNDER`` or ``OVER`` for a raw label under ``dataset``'s convention (module docs)."""
    if dataset.upper().startswith("SICE"):
        return UNDER if label <= 0 else OVER
    return UNDER if label < 0 else OVER


def _listing(title: str, lines: Sequence[str], hint: str = "") -> str:
    shown = [f"  {line}" for line in lines[:_MAX_LISTED]]
    if len(lines) > _MAX_LISTED:
        shown.append(f"  ... and {len(lines) - _MAX_LISTED} more")
    return "\n".join([title, *shown] + ([hint] if hint else []))


# --------------------------------------------------------------------------
# The authors' split files


def _split_path(text: str) -> PurePosixPath:
    # Split files written on Windows would use backslashes.
    return PurePosixPath(text.strip().replace("\\", "/"))


def _parse_split(path: Path) -> tuple[list[tuple[float, PurePosixPath, PurePosixPath]], str]:
    """The rows ``(label, input path, gt path)`` and the dataset name of a split file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise DatasetError(f"split file {path} does not exist") from None
    except IsADirectoryError:
        raise DatasetError(f"split file {path} is a directory, not a CSV file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read split file {path}: {exc}") from None
    if not rows:
        raise DatasetError(f"split file {path} is empty")
    header = [cell.strip() for cell in rows[0]]
    if len(header) < 5 or tuple(header[1:5]) != SPLIT_COLUMNS:
        raise DatasetError(f"split file {path} does not start with the header "
                           f"',Ex,filename,filepath,gtpath,<DATASET>' (found {','.join(header)!r})")
    dataset = header[5] if len(header) > 5 else ""
    parsed, problems = [], []
    for line_number, row in enumerate(rows[1:], start=2):
        if len(row) < 5:
            problems.append(f"line {line_number}: {len(row)} columns, expected at least 5")
            continue
        try:
            label = float(row[1])
        except ValueError:
            problems.append(f"line {line_number}: exposure label {row[1]!r} is not a number")
            continue
        if not math.isfinite(label) or not row[3].strip() or not row[4].strip():
            problems.append(f"line {line_number}: a non-finite label or an empty path")
            continue
        parsed.append((label, _split_path(row[3]), _split_path(row[4])))
    if problems:
        raise DatasetError(_listing(f"split file {path} has {len(problems)} malformed line(s):",
                                    problems))
    if not parsed:
        raise DatasetError(f"split file {path} has a header but no image rows")
    return parsed, dataset


def _common_directory(paths: Iterable[PurePosixPath], source: Path) -> PurePosixPath:
    try:
        return PurePosixPath(os.path.commonpath([str(p.parent) for p in paths]))
    except ValueError:
        raise DatasetError(f"split file {source} mixes absolute and relative paths") from None


def _rebase(paths: list[PurePosixPath], common: PurePosixPath, root: Path) -> Path:
    """Where the split's common directory ``common`` lies under ``root``.

    Candidates, tried in order: ``root`` itself, then ``root`` joined with the last
    1, 2, ... folder names of the common directory. The first candidate under which
    every file exists wins; if none has them all, the one with the most files.
    """
    folders = [part for part in common.parts if part not in ("/", ".", "..")]
    candidates = [root.joinpath(*folders[len(folders) - depth:]) for depth in range(len(folders) + 1)]
    relative = [p.relative_to(common) for p in paths]
    best, best_found = candidates[0], -1
    for base in candidates:
        if not base.is_dir():
            continue
        found = sum(1 for rel in relative if (base / rel).is_file())
        if found == len(relative):
            return base
        if found > best_found:
            best, best_found = base, found
    return best


def read_split(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[ImagePair]:
    """The pairs of one of the authors' split files.

    Args:
        path: the split file (CSV, header ``,Ex,filename,filepath,gtpath,NAME``).
        root: where the dataset lies on this machine. The split's paths are
            re-rooted: the longest directory common to all of its input and ground
            truth paths is cut off (for ``MSEC_Test.txt``:
            ``/home/.../data/MSEC/testing``), and what remains
            (``INPUT_IMAGES/a0001_N1.5.JPG``, ``expert_c_testing_set/a0001.jpg``) is
            looked up under ``root``, or under ``root`` plus the last 1, 2, ... folder
            names of the cut-off directory, whichever holds the files. So ``root``
            may be the ``testing`` folder itself, the ``MSEC`` folder above it, or
            any folder above those that keeps the authors' tail of the layout.
            Without ``root`` the paths are used as written (relative ones from the
            split file's folder).

    Returns:
        One :class:`ImagePair` per row, named by the input's path relative to the
        common directory; ``label`` is the ``Ex`` column and ``exposure`` its group
        under the dataset's convention (see the module docs).

    Missing files are not an error here: :func:`check_pairs` (which
    :class:`ExposureDataset` runs) lists them all.
    """
    path = Path(path)
    rows, dataset = _parse_split(path)
    all_paths = [p for _, inp, gt in rows for p in (inp, gt)]
    common = _common_directory(all_paths, path)
    if root is None:
        base = path.parent.joinpath(common)
    else:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset root {root} is not a directory")
        base = _rebase(all_paths, common, root)
    pairs = []
    for label, inp, gt in rows:
        name = inp.relative_to(common)
        pairs.append(ImagePair(input=base / name, gt=base / gt.relative_to(common), name=str(name),
                               label=label, exposure=exposure_group(label, dataset)))
    _check_unique_names(pairs, str(path))
    return pairs


def _check_unique_names(pairs: Sequence[ImagePair], source: str) -> None:
    seen: dict[str, int] = {}
    for pair in pairs:
        seen[pair.name] = seen.get(pair.name, 0) + 1
    repeated = [f"{name} ({count} times)" for name, count in seen.items() if count > 1]
    if repeated:
        raise DatasetError(_listing(f"{source} lists the same input more than once:", repeated))


# --------------------------------------------------------------------------
# Folder pairs


def _image_files(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{what} folder {folder} does not exist or is not a directory")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"{what} folder {folder} holds no images "
                           f"({', '.join(IMAGE_SUFFIXES)})")
    return files


def _msec_ev(text: str) -> float:
    """``N1.5`` -> -1.5, ``P1`` -> 1.0, ``0`` -> 0.0."""
    if text == "0":
        return 0.0
    return (-1.0 if text[0] == "N" else 1.0) * float(text[1:])


def folder_pairs(input_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                 exposure: str | None = None) -> list[ImagePair]:
    """Pairs from an input folder and a ground-truth folder, matched by file stem.

    An input whose stem is also a ground truth's stem pairs with it; otherwise an
    MSEC-style stem ``<gt stem>_<EV>`` (EV ``N1.5``, ``N1``, ``0``, ``P1``, ``P1.5``)
    pairs with ``<gt stem>``, and its EV becomes the label (EV < 0 under-exposed,
    else over-exposed). ``exposure`` ("under" or "over") sets the group of every
    pair that has no EV of its own, e.g. for SICE's ``low/`` and ``over/`` folders;
    without it their group is unknown (they count in the overall figures only).

    Raises:
        DatasetError: a folder is missing or holds no images, two ground truths share
            a stem, or inputs have no ground truth (all of them are listed).
    """
    if exposure not in (None, "under", "over"):
        raise ValueError(f"exposure must be None, 'under' or 'over', got {exposure!r}")
    default_group = {None: UNKNOWN, "under": UNDER, "over": OVER}[exposure]
    input_dir, gt_dir = Path(input_dir), Path(gt_dir)
    inputs = _image_files(input_dir, "input")
    truths: dict[str, Path] = {}
    clashes = []
    for gt in _image_files(gt_dir, "ground-truth"):
        if gt.stem in truths:
            clashes.append(f"{truths[gt.stem].name} and {gt.name}")
        truths[gt.stem] = gt
    if clashes:
        raise DatasetError(_listing(f"ground-truth folder {gt_dir} has several files with the "
                                    "same stem, so the match is ambiguous:", clashes))
    pairs, unmatched = [], []
    for inp in inputs:
        msec = _MSEC_SUFFIX.match(inp.stem)
        if inp.stem in truths:
            pairs.append(ImagePair(inp, truths[inp.stem], inp.name, None, default_group))
        elif msec and msec["base"] in truths:
            ev = _msec_ev(msec["ev"])
            pairs.append(ImagePair(inp, truths[msec["base"]], inp.name, ev, exposure_group(ev)))
        else:
            unmatched.append(inp.name)
    if unmatched:
        raise DatasetError(_listing(
            f"{len(unmatched)} input(s) in {input_dir} have no ground truth in {gt_dir} "
            "(matched by stem, or <stem>_<EV> for MSEC names such as a0001_N1.5.JPG):",
            unmatched))
    return pairs


# --------------------------------------------------------------------------
# Checking files up front


def _probe(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or ``None``. Reads the header only."""
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a file"
    try:
        with Image.open(path) as im:
            width, height = im.size
    except PermissionError:
        return "unreadable (permission denied)"
    except UnidentifiedImageError:
        return "unreadable (not an image, or a format Pillow cannot read)"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"unreadable (corrupt image header: {exc or type(exc).__name__})"
    if width == 0 or height == 0:
        return "unreadable (empty image)"
    return None


def check_pairs(pairs: Sequence[ImagePair]) -> None:
    """Raise one :class:`DatasetError` listing every missing or unreadable file.

    Checks existence and that Pillow recognises each file's header (cheap: no pixel
    data is decoded); damage further into a file shows up when it is read, as a
    :class:`DatasetError` naming it.
    """
    if not pairs:
        raise DatasetError("the dataset has no image pairs")
    problems, seen = [], set()
    for pair in pairs:
        for kind, path in (("input", pair.input), ("ground truth", pair.gt)):
            if path in seen:
                continue
            seen.add(path)
            reason = _probe(path)
            if reason is not None:
                problems.append(f"{reason}: {path} ({kind} of {pair.name})")
    if problems:
        missing = sum(1 for line in problems if line.startswith("missing"))
        hint = ""
        if missing == len(seen):
            hint = "(no file was found at all: is the dataset root right?)"
        raise DatasetError(_listing(f"{len(problems)} of the dataset's {len(seen)} files are "
                                    "missing or unreadable:", problems, hint))


# --------------------------------------------------------------------------
# The torch Dataset


def _as_size(value: int | tuple[int, int] | None, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    height, width = (value, value) if isinstance(value, int) else tuple(value)
    if height < 1 or width < 1:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return int(height), int(width)


class ExposureDataset(torch.utils.data.Dataset):
    """Image pairs as tensors: item ``i`` is ``(input, gt, exposure, name)``.

    ``input`` and ``gt`` are float32 ``[3, H, W]`` in ``[0, 1]`` (RGB, read with
    :func:`exposure_slot.images.read_image`: EXIF orientation applied, 16-bit kept,
    alpha dropped), ``exposure`` is ``UNDER`` (-1), ``OVER`` (1) or ``UNKNOWN`` (0),
    ``name`` the pair's name. The default ``torch.utils.data`` collation batches
    them (images of one size only: use ``resize`` or ``crop`` for batches > 1).

    Args:
        pairs: from :func:`read_split` or :func:`folder_pairs`.
        resize: ``(H, W)`` or one int: resize both images to it (bilinear with
            antialiasing), as the authors do for training (256x256).
        crop: ``(H, W)`` or one int: a random crop at the same place in both images
            (after ``resize``, if given).
        flip: random horizontal and vertical flips (each with probability 1/2).
        seed: the random crops and flips are a function of ``(seed, epoch, index)``
            only, so they are the same in any DataLoader worker and on every run.
            Call :meth:`set_epoch` before each epoch for new ones (with
            ``persistent_workers=True`` the workers keep the epoch they started with).
        check: run :func:`check_pairs` now (default), so that missing or unreadable
            files fail here, all listed, instead of in the middle of an epoch.

    Without ``resize`` or ``crop`` the input and its ground truth must have the same
    size; reading a pair that does not raises a :class:`DatasetError` naming it.
    """

    def __init__(self, pairs: Sequence[ImagePair], *, resize=None, crop=None, flip: bool = False,
                 seed: int = 0, check: bool = True):
        self.pairs = list(pairs)
        self.resize = _as_size(resize, "resize")
        self.crop = _as_size(crop, "crop")
        self.flip = flip
        self.seed = seed
        self.epoch = 0
        if check:
            check_pairs(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops and flips of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        pair = self.pairs[index]
        x = self._read(pair.input, "input", pair)
        y = self._read(pair.gt, "ground truth", pair)
        if self.resize is not None:
            x, y = (F.interpolate(t[None], size=self.resize, mode="bilinear", align_corners=False,
                                  antialias=True)[0].clamp(0.0, 1.0) for t in (x, y))
        if x.shape != y.shape:
            raise DatasetError(f"{pair.name}: input {pair.input} is {x.shape[2]}x{x.shape[1]} but "
                               f"its ground truth {pair.gt} is {y.shape[2]}x{y.shape[1]} (WxH)")
        if self.crop is not None or self.flip:
            x, y = self._augment(x, y, index, pair)
        return x, y, pair.exposure, pair.name

    def _read(self, path: Path, kind: str, pair: ImagePair) -> torch.Tensor:
        try:
            return read_image(path).tensor[0]
        except ImageReadError as exc:
            raise DatasetError(f"cannot read the {kind} of {pair.name}, {path}: {exc}") from None

    def _augment(self, x, y, index: int, pair: ImagePair):
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        if self.crop is not None:
            height, width = x.shape[-2:]
            crop_h, crop_w = self.crop
            if crop_h > height or crop_w > width:
                raise DatasetError(f"{pair.name}: {width}x{height} is smaller than the crop "
                                   f"{crop_w}x{crop_h} (WxH); resize first or crop less")
            top = int(torch.randint(height - crop_h + 1, (1,), generator=generator))
            left = int(torch.randint(width - crop_w + 1, (1,), generator=generator))
            x = x[:, top:top + crop_h, left:left + crop_w]
            y = y[:, top:top + crop_h, left:left + crop_w]
        if self.flip:
            dims = [d for d in (-1, -2) if torch.rand((), generator=generator) < 0.5]
            if dims:
                x, y = x.flip(dims), y.flip(dims)
        return x.contiguous(), y.contiguous()
