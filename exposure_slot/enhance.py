"""The ``exposure-slot enhance`` pipeline: photos, folders and videos through the
network, with batched, prefetched I/O and atomic outputs.

``Enhancer`` takes a ready model (``cli._build_model``) and an output folder and
enhances what it is given: ``images(paths)`` runs the photos of the most common size
through a fixed-shape engine (``exposure_slot.engine``) in batches, the others one
by one (tiled by ``infer_large`` when they need it); ``video(path, number)`` runs
every frame of a video through the engine. Decoding and encoding run in worker
threads, with pinned host memory and asynchronous copies on CUDA. Every output is
written under a temporary name and renamed when complete, so an interrupted or
failed run never leaves a partial file. Per-file failures are counted and
reported, not raised; the command line (``cli.py``) turns the counts into an exit
code.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Sequence


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most 600 characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:597] + "..."


def _size_note(model, height: int, width: int) -> str:
    aligned_h, aligned_w = model.aligned_size(height, width)
    if (aligned_h, aligned_w) == (height, width):
        return model.size_policy
    if model.size_policy == "pad":
        return (f"pad ({width}x{height} reflect-padded to {aligned_w}x{aligned_h}, "
                "result cropped back)")
    return (f"resize ({width}x{height} resized to {aligned_w}x{aligned_h} for the network, "
            "result resized back)")


def _output_name(path: Path, source_format: str) -> str:
    from .images import output_format

    if output_format(source_format) == "JPEG":
        suffix = path.suffix if path.suffix.lower() in (".jpg", ".jpeg") else ".jpg"
    else:
        suffix = ".png"
    return path.stem + suffix


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False




class _FileFailure(Exception):
    """One input could not be processed; the message says why."""


def expand_inputs(names: Sequence[str]) -> list[Path]:
    """The inputs with each folder replaced by its photos and videos (by suffix,
    sorted, hidden files skipped); a folder with none stays, to be reported."""
    from .images import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    paths = []
    for name in names:
        path = Path(name)
        found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES
                       ) if path.is_dir() else []
        paths += found or [path]
    return paths


def _read_input(path: Path):
    """``read_image(path)``, or the ImageReadError that says why not."""
    from .images import IMAGE_SUFFIXES, ImageReadError, read_image

    try:
        if path.is_dir():
            raise ImageReadError(f"a folder without photos or videos "
                                 f"({', '.join(IMAGE_SUFFIXES)}, ...)")
        return read_image(path)
    except ImageReadError as exc:
        return exc


def _peek_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of an image file as read_image will give it, from its
    header; None if Pillow cannot tell."""
    from PIL import Image

    from .images import _exif_orientation

    try:
        with Image.open(path) as im:
            width, height = im.size
            transposed = _exif_orientation(im) in (5, 6, 7, 8)
    except Exception:  # unreadable: read_image will report it
        return None
    return (width, height) if transposed else (height, width)


def _prefetch(fn, items: Sequence, workers: int):
    """``(item, fn(item))`` for each item in order, computed up to ``2 * workers``
    items ahead by ``workers`` threads (Pillow decodes without the GIL)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="exposure-slot-read")
    pending = deque()
    rest = iter(items)
    try:
        for item in rest:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            item, future = pending.popleft()
            for following in rest:
                pending.append((following, pool.submit(fn, following)))
                break
            yield item, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _background(items, depth: int = 8):
    """Iterate ``items`` in a worker thread, up to ``depth`` items ahead; its
    exceptions are raised here. Close it (``contextlib.closing``) before what
    ``items`` reads from: closing stops and joins the thread."""
    import queue
    import threading

    buffer: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((end, exc))

    thread = threading.Thread(target=produce, name="exposure-slot-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class _OrderedWrites:
    """Writes done by worker threads, their outcomes handled in the main thread in
    the order they were submitted; at most ``limit`` outstanding. On exit, queued
    writes that have not started are cancelled and running ones finish (each is
    atomic: a whole file or none)."""

    def __init__(self, workers: int, limit: int):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="exposure-slot-write")
        self._pending = deque()
        self._limit = limit

    def submit(self, write, on_done) -> None:
        """Run ``write()`` in a worker; later call ``on_done(future)`` here."""
        self._pending.append((self._pool.submit(write), on_done))
        self.collect()

    def collect(self, wait: bool = False) -> None:
        """Handle finished writes (with ``wait``, all of them)."""
        while self._pending and (wait or len(self._pending) > self._limit
                                 or self._pending[0][0].done()):
            future, on_done = self._pending.popleft()
            on_done(future)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        try:
            if exc_type is None:
                self.collect(wait=True)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _run_engine(engine, host, masks: bool = False):
    """One engine call on a batch in host memory: ``[b, 3, H, W]`` float images, or
    ``[b, H, W, 3]`` 8-bit frames (then the conversions run on the device, and
    only 8-bit data crosses the bus). Returns the results in the same layout in
    host memory, the top level's masks (or None), and a CUDA event after which the
    results may be read (None on a CPU). On a GPU, pass pinned host memory: the
    copies are then asynchronous."""
    import torch

    cuda = engine.device.type == "cuda"
    x = host.to(engine.device, non_blocking=cuda)
    frames = x.dtype == torch.uint8
    if frames:
        x = x.permute(0, 3, 1, 2).float().div_(255)
    y, levels = engine(x, return_masks=True) if masks else (engine(x), None)
    if frames:
        y = y.clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1)
    result = torch.empty(y.shape, dtype=y.dtype, pin_memory=cuda)
    result.copy_(y, non_blocking=cuda)
    top = levels[0].cpu() if masks else None
    ready = None
    if cuda:
        ready = torch.cuda.Event()
        ready.record()
    return result, top, ready


def _pinned_stack(tensors, cuda: bool):
    """``torch.cat(tensors)`` (or of arrays), in pinned memory on a GPU machine."""
    import torch

    tensors = [torch.as_tensor(t) for t in tensors]
    if tensors[0].dim() == 3:  # [H, W, 3] frames
        tensors = [t[None] for t in tensors]
    shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
    return torch.cat(tensors, out=torch.empty(shape, dtype=tensors[0].dtype, pin_memory=cuda))


class _Item:
    """A photo on its way through ``enhance``."""

    def __init__(self, index: int, path: Path, image, out_path: Path, mask_path: Path | None):
        self.index, self.path, self.image = index, path, image
        self.out_path, self.mask_path = out_path, mask_path
        self.start = time.perf_counter()

    @property
    def targets(self) -> list[Path]:
        return [self.out_path] + ([self.mask_path] if self.mask_path else [])


class Enhancer:
    """The state of one ``enhance`` run: what was written, counts, the engine."""

    def __init__(self, args, model, device, backend, budget, outdir, total):
        from tqdm import tqdm

        self.args, self.model, self.device, self.backend = args, model, device, backend
        self.budget, self.outdir, self.total = budget, outdir, total
        self.batch_size = args.batch_size or (4 if device.type == "cuda" else 1)
        self.claimed: dict[Path, Path] = {}  # output path -> input that produced it
        self.done = self.failed = 0
        self._engine = None
        self._tqdm = tqdm

    # -- reporting

    def say(self, message: str, err: bool = False) -> None:
        self._tqdm.write(message, file=sys.stderr if err else sys.stdout)

    def prefix(self, index: int) -> str:
        return f"[{index}/{self.total}] " if self.total > 1 else ""

    def fail(self, index: int, path: Path, exc: BaseException) -> None:
        self.failed += 1
        self.say(f"{self.prefix(index)}FAILED {path}: {exc}", err=True)

    def claim(self, path: Path, targets: list[Path]) -> None:
        """Refuse outputs that would overwrite the input or an earlier output of
        this run; then reserve them for ``path``."""
        for target in targets:
            if _same_file(target, path):
                raise _FileFailure(f"the output {target} would overwrite the input; "
                                   "choose another output directory")
            earlier = self.claimed.get(target.resolve())
            if earlier is not None:
                raise _FileFailure(f"output {target.name} was already written for "
                                   f"{earlier} in this run (same file name stem); rename "
                                   "one of them or use another output directory")
        for target in targets:
            self.claimed[target.resolve()] = path

    def release(self, targets: list[Path]) -> None:
        for target in targets:
            self.claimed.pop(target.resolve(), None)

    # -- the engine

    def fitting_batch(self, height: int, width: int) -> int | None:
        """The largest batch up to --batch-size (halving) that the memory budget
        takes in one pass; None if not even one image fits."""
        from .tiling import plan_tiles

        batch = self.batch_size
        while batch >= 1:
            if plan_tiles(self.model, (batch, 3, height, width), max_memory=self.budget).whole:
                return batch
            batch //= 2
        return None

    def engine(self, batch: int, height: int, width: int):
        """The engine for batches of ``height`` x ``width`` (the last one, reused)."""
        from .engine import compile_for

        shape = (batch, 3, height, width)
        if self._engine is None or tuple(self._engine.shape) != shape:
            self._engine = None  # its graph's memory goes before the next is captured
            try:
                self._engine = compile_for(self.model, shape)
            except RuntimeError as exc:
                if self.device.type != "cuda":
                    raise
                # A kernel that cannot be captured (it synchronises, say) still runs.
                self.say(f"note: capturing a CUDA graph failed ({one_line(exc)}); "
                         "running without one", err=True)
                self._engine = compile_for(self.model, shape, graphs=False)
        return self._engine

    # -- photos

    def images(self, paths: list[Path]) -> None:
        """Photos of the most common size (if two or more share it) go through the
        engine in batches; the others one by one, tiled when they need it."""
        import collections

        if not paths:
            return
        sizes = collections.Counter(size for size in map(_peek_size, paths) if size is not None)
        common = sizes.most_common(1)[0] if sizes else (None, 0)
        batch_size = None
        if common[1] >= 2 and self.args.tile is None:
            batch_size = self.fitting_batch(*common[0])
        pending: list[_Item] = []
        bar = self._tqdm(total=len(paths), unit="image", desc="enhancing",
                         disable=True if len(paths) < 2 else None, file=sys.stderr,
                         dynamic_ncols=True)
        with _OrderedWrites(self.args.workers, limit=4 * max(self.args.workers,
                                                             batch_size or 1)) as writes:
            for index, (path, image) in enumerate(_prefetch(_read_input, paths,
                                                            self.args.workers), 1):
                try:
                    if isinstance(image, Exception):
                        raise _FileFailure(str(image))
                    out_path = self.outdir / _output_name(path, image.format)
                    mask_path = (self.outdir / f"{path.stem}_masks.png"
                                 if self.args.save_masks else None)
                    item = _Item(index, path, image, out_path, mask_path)
                    self.claim(path, item.targets)
                    if batch_size and (image.height, image.width) == common[0]:
                        pending.append(item)
                        if len(pending) == batch_size:
                            self._enhance_batch(pending, batch_size, writes, bar)
                            pending = []
                    else:
                        self._enhance_batch(pending, batch_size, writes, bar)
                        pending = []
                        self._enhance_one(item, writes, bar)
                except _FileFailure as exc:
                    self.fail(index, path, exc)
                    bar.update()
            self._enhance_batch(pending, batch_size, writes, bar)
        bar.close()

    def _enhance_one(self, item: _Item, writes: _OrderedWrites, bar) -> None:
        """One photo, in one pass or in tiles (``infer_large``)."""
        import torch

        from .tiling import infer_large, plan_tiles

        image = item.image
        x = image.tensor.to(self.device)
        t0 = time.perf_counter()
        try:
            try:
                plan = plan_tiles(self.model, x.shape, max_memory=self.budget,
                                  tile=self.args.tile)
                if not plan.whole:
                    reason = ("as asked with --tile" if self.args.tile is not None else
                              "too large for one pass within the memory budget")
                    self.say(f"{self.prefix(item.index)}{item.path}: {image.width}x"
                             f"{image.height}, {reason}; {plan.describe()}")
                result = infer_large(self.model, x, max_memory=self.budget, tile=self.args.tile,
                                     return_masks=self.args.save_masks)
                corrected, masks = result if self.args.save_masks else (result, None)
            except MemoryError as exc:
                raise _FileFailure(f"not enough memory: {one_line(exc)}") from None
            except (ValueError, TypeError, RuntimeError) as exc:
                raise _FileFailure(f"the network could not process this image: "
                                   f"{one_line(exc)}") from None
        except _FileFailure as exc:
            self.release(item.targets)
            self.fail(item.index, item.path, exc)
            bar.update()
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        network = f"network {time.perf_counter() - t0:.2f} s"
        top = None if masks is None else masks[0][0].cpu()
        self._write(item, corrected.cpu(), top, None, network, writes, bar)

    def _enhance_batch(self, items: list[_Item], batch_size: int, writes: _OrderedWrites,
                       bar) -> None:
        """Photos of one size, through the engine (for ``batch_size``) in one call."""
        if not items:
            return
        try:
            engine = self.engine(batch_size, items[0].image.height, items[0].image.width)
            host = _pinned_stack([item.image.tensor for item in items],
                                 engine.device.type == "cuda")
            results, masks, ready = _run_engine(engine, host, masks=self.args.save_masks)
        except (ValueError, TypeError, RuntimeError, MemoryError) as exc:  # e.g. out of memory
            for item in items:
                self.release(item.targets)
                self.fail(item.index, item.path, _FileFailure(
                    f"the network could not process this batch: {one_line(exc)}"))
            bar.update(len(items))
            return
        how = f"engine, batch of {len(items)}"
        for i, item in enumerate(items):
            self._write(item, results[i:i + 1], None if masks is None else masks[i], ready, how,
                        writes, bar)

    def _write(self, item: _Item, corrected, masks, ready, how: str, writes, bar) -> None:
        """Save a result (and its masks) in a writer thread; report it when done."""
        from .images import colorize_masks, output_format, save_image

        image = item.image

        def write():
            if ready is not None:
                ready.synchronize()
            fmt = output_format(image.format)
            try:
                save_image(item.out_path, corrected, format=fmt, bit_depth=image.bit_depth,
                           alpha=image.alpha if fmt == "PNG" else None,
                           icc_profile=image.icc_profile)
                if masks is not None:
                    picture = colorize_masks(masks, (image.height, image.width),
                                             padded=self.model.size_policy == "pad")
                    save_image(item.mask_path, picture, format="PNG", bit_depth=8)
            except OSError as exc:
                raise _FileFailure(f"cannot write output: {exc.strerror or exc}") from None

        def on_done(future):
            bar.update()
            try:
                future.result()
            except _FileFailure as exc:
                self.release(item.targets)
                self.fail(item.index, item.path, exc)
                return
            self.done += 1
            written = item.out_path.name + (f" + {item.mask_path.name}" if item.mask_path else "")
            self.say(f"{self.prefix(item.index)}{item.path} -> {self.outdir / written}")
            self.say(f"    {image.width}x{image.height} {image.bit_depth}-bit {image.format}; "
                     f"backend {self.backend}; size policy "
                     f"{_size_note(self.model, image.height, image.width)}; {how}, total "
                     f"{time.perf_counter() - item.start:.2f} s")
            for note in image.notes:
                self.say(f"    note: {note}")

        writes.submit(write, on_done)

    # -- videos

    def video(self, path: Path, index: int) -> None:
        """A video's frames through the engine, written to a video of the same kind."""
        from .images import VideoError

        out_path = self.outdir / path.name
        try:
            self.claim(path, [out_path])
        except _FileFailure as exc:
            self.fail(index, path, exc)
            return
        start = time.perf_counter()
        try:
            count, note = self._video_frames(path, out_path)
        except (_FileFailure, VideoError) as exc:
            self.release([out_path])
            self.fail(index, path, exc)
            return
        except (ValueError, TypeError, RuntimeError, MemoryError) as exc:  # e.g. out of memory
            self.release([out_path])
            self.fail(index, path, _FileFailure(f"the network could not process this video: "
                                                f"{one_line(exc)}"))
            return
        except OSError as exc:
            self.release([out_path])
            self.fail(index, path, _FileFailure(f"cannot write output: {exc.strerror or exc}"))
            return
        seconds = time.perf_counter() - start
        self.done += 1
        self.say(f"{self.prefix(index)}{path} -> {out_path}")
        self.say(f"    {count} frames; {note}; backend {self.backend}; "
                 f"{seconds:.2f} s ({count / seconds:.1f} frames/s)")
        if self.args.save_masks:
            self.say("    note: masks are not written for videos")

    def _video_frames(self, path: Path, out_path: Path) -> tuple[int, str]:
        import contextlib

        from .images import VideoReader, VideoWriter

        cuda = self.device.type == "cuda"
        with VideoReader(path) as reader:
            size = (reader.height, reader.width)
            batch = self.fitting_batch(*size)
            if batch is None:
                raise _FileFailure(f"{reader.width}x{reader.height} frames do not fit the memory "
                                   "budget even one at a time; raise --max-memory")
            engine = self.engine(batch, *size)
            bar = self._tqdm(total=reader.frames or None, unit="frame", desc=path.name,
                             file=sys.stderr, dynamic_ncols=True, leave=False)
            count = 0
            with contextlib.closing(_background(iter(reader), depth=2 * batch)) as frames, \
                    VideoWriter(out_path, reader.width, reader.height, reader.rate) as writer, \
                    _OrderedWrites(1, limit=2) as writes:
                chunk = []
                for frame in itertools.chain(frames, [None]):
                    if frame is not None:
                        if frame.shape[:2] != size:
                            raise _FileFailure(
                                f"frame {count + len(chunk) + 1} is {frame.shape[1]}x"
                                f"{frame.shape[0]} but the video started at {size[1]}x{size[0]}; "
                                "videos whose frame size changes are not supported")
                        chunk.append(frame)
                    if chunk and (frame is None or len(chunk) == batch):
                        results, _, ready = _run_engine(engine, _pinned_stack(chunk, cuda))
                        writes.submit(functools.partial(_encode, writer, results, ready),
                                      functools.partial(_encoded, bar, len(chunk)))
                        count += len(chunk)
                        chunk = []
            bar.close()
        how = "CUDA graph" if engine.graphed else "eager"
        return count, (f"{reader.width}x{reader.height} at {float(reader.rate):g} frames/s; "
                       f"engine ({how}, {engine.dtype}, batch {batch}), {writer.codec}")


def _encode(writer, frames, ready) -> None:
    """Encode a batch of result frames (in a writer thread), once they are there."""
    if ready is not None:
        ready.synchronize()
    for frame in frames.numpy():
        writer.write(frame)


def _encoded(bar, count: int, future) -> None:
    future.result()  # the encoder's error, if any, stops the video here
    bar.update(count)
