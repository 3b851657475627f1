"""Training Exposure-slot: the released recipe, checkpoints with exact resume,
one process or many (``torchrun``).

Recipe (SPEC section 5): loss ``L1(image, gt) + MSE(recon, gt)`` (``recon`` is the
slot decoder's reconstruction), Adam with lr 2e-4, cosine annealing to
``lr * 1e-3`` over the run (per step here, over epochs in the released code),
batch 8. Images are resized to 256x256 or randomly cropped by the dataset.

A run directory holds:

* ``checkpoint.pt``: the full training state (model, optimizer, scheduler, AMP
  scaler, every rank's RNG states, step), rewritten atomically every
  ``checkpoint_every`` steps and at the end;
* ``weights.pt``: the model alone in the :mod:`exposure_slot.pretrained` format,
  written with each checkpoint (loadable with ``load_weights``);
* ``log.csv``: step, epoch, mean losses since the previous row, lr, elapsed time,
  images per second;
* ``config.json``: the configuration.

Exact resume: the batch of step ``s`` is fixed by the seed and ``s`` alone
(epoch ``s // steps_per_epoch`` of a seeded ``DistributedSampler``, then the
position in that epoch), the data loader draws no global random numbers, and
every RNG state is restored, so a resumed run computes bitwise the same weights
as an uninterrupted one (on CPU; CUDA kernels may not be deterministic). Data
whose random augmentations use global RNG are reproduced exactly with
``num_workers=0``; :class:`~exposure_slot.data.SyntheticExposurePairs` draws
per item and is exact with any worker count.

Many processes: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
``DistributedDataParallel`` (gloo on CPU, nccl on CUDA), each rank takes
``batch_size / world_size`` items per step, and only rank 0 writes. Every
parameter, the training-only ``slot_decoder`` included, gets a gradient in each
step (the recon loss uses it), so DDP runs without ``find_unused_parameters``.
BatchNorm trains on batch statistics as released; on CUDA with several processes
it becomes ``SyncBatchNorm``, so the statistics cover the whole batch as in the
released single-GPU training (``SyncBatchNorm`` does not run on CPU: CPU ranks
normalise over their own share of the batch).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .images import atomic_write
from .network import ExposureSlot
from .pretrained import save_weights

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "weights.pt"
LOG_NAME = "log.csv"
CONFIG_NAME = "config.json"
CHECKPOINT_FORMAT = "exposure-slot-training"
LOG_FIELDS = ("step", "epoch", "loss", "l1", "recon_mse", "lr", "elapsed_s", "images_per_s")
# Fields that must match for a run to be resumed exactly.
_RESUME_FIELDS = ("level", "dim", "iters", "steps", "batch_size", "lr", "min_lr_ratio",
                  "recon_weight", "seed")


@dataclasses.dataclass
class TrainConfig:
    """How to train; the defaults are the released recipe.

    ``batch_size`` is the global batch (split over the processes).
    ``data`` is a free-form description recorded in the weights' metadata.
    ``init_weights``: start from these weights (ours, or the authors' checkpoint)
    instead of a random initialisation: fine-tuning.
    """

    output_dir: str
    steps: int = 10000
    batch_size: int = 8
    lr: float = 2e-4
    min_lr_ratio: float = 1e-3
    recon_weight: float = 1.0
    level: int = 2
    dim: int = 128
    iters: int = 3
    backend: str = "auto"
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    progress: bool = True
    data: str = ""
    init_weights: str | None = None


class TrainingError(RuntimeError):
    """A training setup problem (bad configuration, unusable run directory)."""


# --------------------------------------------------------------------------
# Processes and devices


@dataclasses.dataclass
class _Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _start_processes(device_name: str) -> _Processes:
    """Join the ``torchrun`` process group if there is one; pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for, but no CUDA GPU is available")
    if world_size == 1:
        return _Processes(0, 1, torch.device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Processes(dist.get_rank(), dist.get_world_size(), device)


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast on CUDA GPUs that support it, float16 (with loss
    scaling) on older ones, none on CPU or with ``amp=False``."""
    if not config.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --------------------------------------------------------------------------
# RNG state


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------
# Data


def _pair(item) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) of a collated batch: a pair, or a dict with input/gt."""
    if isinstance(item, dict):
        return item["input"], item["gt"]
    inputs, targets = item[0], item[1]
    return inputs, targets


class _EpochBatches:
    """The batches of the run, step by step, starting at any step.

    Step ``s`` takes batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``
    of a seeded ``DistributedSampler`` (shuffled per epoch, this rank's share).
    """

    def __init__(self, dataset: Dataset, processes: _Processes, per_rank_batch: int,
                 config: TrainConfig):
        self.dataset = dataset
        self.per_rank_batch = per_rank_batch
        self.config = config
        self.pin = processes.device.type == "cuda"
        self.sampler = DistributedSampler(dataset, num_replicas=processes.world_size,
                                          rank=processes.rank, shuffle=True, seed=config.seed,
                                          drop_last=True)
        self.steps_per_epoch = len(self.sampler) // per_rank_batch
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"the dataset has {len(dataset)} items, fewer than one batch of "
                f"{per_rank_batch * processes.world_size}; use a smaller batch or more data")

    def from_step(self, step: int):
        """Yield ``(epoch, inputs, targets)`` for steps ``step, step + 1, ...``."""
        while True:
            epoch, position = divmod(step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            indices = list(self.sampler)[position * self.per_rank_batch:]
            # A private generator: creating the loader must not draw from the
            # global RNG, or a resumed run would see different random numbers.
            loader = DataLoader(self.dataset, batch_size=self.per_rank_batch, sampler=indices,
                                drop_last=True, num_workers=self.config.num_workers,
                                pin_memory=self.pin,
                                generator=torch.Generator().manual_seed(self.config.seed + epoch))
            for batch in loader:
                inputs, targets = _pair(batch)
                yield epoch, inputs, targets
                step += 1


# --------------------------------------------------------------------------
# Run directory


def _check_run_dir(config: TrainConfig, resume: bool) -> dict | None:
    """The checkpoint to resume from, or None for a fresh run; raises TrainingError."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output directory {out} exists and is not a directory")
    checkpoint_path = out / CHECKPOINT_NAME
    if not resume:
        if checkpoint_path.exists():
            raise TrainingError(f"{out} already holds a training run ({CHECKPOINT_NAME}); "
                                "resume it with --resume or choose another output directory")
        return None
    if not checkpoint_path.exists():
        raise TrainingError(f"nothing to resume: {checkpoint_path} does not exist")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TrainingError(f"cannot read {checkpoint_path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{checkpoint_path} is not an exposure-slot training checkpoint")
    saved = checkpoint["config"]
    changed = [f"{name}: {saved[name]!r} -> {getattr(config, name)!r}"
               for name in _RESUME_FIELDS if saved[name] != getattr(config, name)]
    if changed:
        raise TrainingError("cannot resume exactly with a different configuration ("
                            + "; ".join(changed) + ")")
    return checkpoint


def _trim_log(path: Path, step: int) -> None:
    """Drop log rows written after ``step`` (by a run that went on past its last checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
    text = _csv_text(rows, header=True)
    atomic_write(path, lambda f: f.write(text.encode()))


def _csv_text(rows: Sequence[dict], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --------------------------------------------------------------------------
# Training


def build_model(config: TrainConfig) -> ExposureSlot:
    """The network to train; its initial weights are ``config.init_weights``, or
    random, fixed by ``config.seed``."""
    torch.manual_seed(config.seed)
    # "resize" matches the released training on any crop; crops are multiples of 4 anyway.
    model = ExposureSlot(level=config.level, backend=config.backend, size_policy="resize",
                         dim=config.dim, iters=config.iters)
    if config.init_weights is not None:
        from .checkpoint import CheckpointError, load_official
        from .pretrained import load_weights
        try:
            start = load_weights(config.init_weights)
        except CheckpointError:  # not our format: the authors' checkpoint layout?
            try:
                start = load_official(config.init_weights)
            except CheckpointError as exc:
                raise TrainingError(f"--init-weights {config.init_weights}: {exc}") from None
        try:
            model.load_state_dict(start.state_dict(), strict=True)
        except RuntimeError as exc:
            raise TrainingError(f"--init-weights {config.init_weights} does not fit a level-"
                                f"{config.level}, dim-{config.dim} network: "
                                f"{' '.join(str(exc).split())[:300]}") from None
    return model


def train(dataset: Dataset, config: TrainConfig, *, resume: bool = False) -> torch.nn.Module:
    """Train on ``dataset`` and return this process's trained model.

    Items of ``dataset`` are ``(input, target, ...)`` with ``[3,h,w]`` images in
    [0,1] (:class:`~exposure_slot.data.ExposureDataset`,
    :class:`~exposure_slot.data.SyntheticExposurePairs`) or dicts with ``input``
    and ``gt``. Under ``torchrun`` call it in every process. The final weights
    are ``<output_dir>/weights.pt``. Raises TrainingError on setup problems,
    before anything is written.
    """
    if config.steps < 1:
        raise TrainingError(f"steps must be at least 1, got {config.steps}")
    if config.checkpoint_every < 1 or config.log_every < 1:
        raise TrainingError("checkpoint_every and log_every must be at least 1")
    processes = _start_processes(config.device)
    if config.batch_size % processes.world_size:
        raise TrainingError(f"batch size {config.batch_size} is not divisible by the "
                            f"{processes.world_size} processes")
    per_rank_batch = config.batch_size // processes.world_size
    checkpoint = _check_run_dir(config, resume)
    batches = _EpochBatches(dataset, processes, per_rank_batch, config)
    device = processes.device

    model = build_model(config).to(device)
    if processes.distributed and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.steps, eta_min=config.lr * config.min_lr_ratio)
    amp_dtype = _amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        step = checkpoint["step"]
        rng = checkpoint["rng"]
        if len(rng) == processes.world_size:
            _set_rng_state(rng[processes.rank])
        elif processes.is_main:
            print(f"warning: the checkpoint was written by {len(rng)} processes, this run has "
                  f"{processes.world_size}; random states restart (data order is unchanged)",
                  file=sys.stderr)
    network = model
    if processes.distributed:
        network = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    out = Path(config.output_dir)
    log_path = out / LOG_NAME
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config_text = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
        atomic_write(out / CONFIG_NAME, lambda f: f.write(config_text.encode()))
        if checkpoint is not None:
            _trim_log(log_path, step)
        elif log_path.exists():
            log_path.unlink()

    def save_checkpoint():
        states = [None] * processes.world_size
        if processes.distributed:
            dist.all_gather_object(states, _rng_state())
        else:
            states = [_rng_state()]
        if processes.is_main:
            payload = {
                "format": CHECKPOINT_FORMAT, "version": 1,
                "config": dataclasses.asdict(config), "step": step,
                "epoch": step // batches.steps_per_epoch, "world_size": processes.world_size,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": states,
            }
            atomic_write(out / CHECKPOINT_NAME, lambda f: torch.save(payload, f))
            save_weights(_plain(model, config), out / WEIGHTS_NAME, metadata=_metadata(config, step))
        if processes.distributed:
            dist.barrier()  # nobody runs ahead while rank 0 may still be failing to write

    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=step, unit="step", desc="training", file=sys.stderr,
               disable=not (config.progress and processes.is_main), dynamic_ncols=True)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # l1, recon, count since last row
    started = time.perf_counter()
    last_row_time, last_row_step = started, step
    network.train()
    for epoch, inputs, targets in batches.from_step(step) if step < config.steps else ():
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output = network(inputs, return_aux=True)
        l1 = F.l1_loss(output.image.float(), targets)
        recon = F.mse_loss(output.recon.float(), targets)
        loss = l1 + config.recon_weight * recon
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        sums += torch.stack([l1.detach().double(), recon.detach().double(),
                             torch.ones((), dtype=torch.float64, device=device)])
        bar.update(1)

        if step % config.log_every == 0 or step == config.steps:
            if processes.distributed:
                dist.all_reduce(sums)
            if processes.is_main:
                now = time.perf_counter()
                l1_mean, recon_mean = (sums[:2] / sums[2]).tolist()
                row = {"step": step, "epoch": epoch, "loss": f"{l1_mean + config.recon_weight * recon_mean:.6f}",
                       "l1": f"{l1_mean:.6f}", "recon_mse": f"{recon_mean:.6f}",
                       "lr": f"{scheduler.get_last_lr()[0]:.6e}", "elapsed_s": f"{now - started:.1f}",
                       "images_per_s": f"{(step - last_row_step) * config.batch_size / max(now - last_row_time, 1e-9):.2f}"}
                with open(log_path, "a", newline="") as f:
                    f.write(_csv_text([row], header=f.tell() == 0))
                bar.set_postfix(loss=row["loss"], refresh=False)
                last_row_time, last_row_step = now, step
            sums.zero_()
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint()
        if step == config.steps:
            break
    bar.close()
    if processes.distributed:
        dist.destroy_process_group()
    return model


def _plain(model: torch.nn.Module, config: TrainConfig) -> ExposureSlot:
    """An ExposureSlot with ``model``'s weights (SyncBatchNorm layers become BatchNorm)."""
    if isinstance(model, ExposureSlot) and not any(
            isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        return model
    plain = ExposureSlot(level=config.level, backend=config.backend, dim=config.dim, iters=config.iters)
    plain.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    return plain


def _metadata(config: TrainConfig, step: int) -> dict[str, Any]:
    return {"steps": step, "data": config.data, "batch_size": config.batch_size,
            "lr": config.lr, "seed": config.seed,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# --------------------------------------------------------------------------
# Command line: exposure-slot train

_TRAIN_DESCRIPTION = """\
Train an Exposure-slot network with the released recipe (L1 + slot-decoder MSE,
Adam 2e-4 with cosine annealing to 2e-7, batch 8) on one of:

  --split CSV --root DIR     the authors' split files (MSEC_Train.txt, ...)
                             re-rooted at DIR; images resized to 256x256
  --pairs INPUT_DIR GT_DIR   input and ground-truth folders matched by name
  --synthetic PATH...        well-exposed photos (folders or files), re-exposed
                             on the fly by -2..+2 EV, globally or in regions

RUN_DIR receives checkpoint.pt (every --checkpoint-every steps, atomically),
weights.pt (the model, for --weights of 'exposure-slot demo' or
exposure_slot.pretrained.load_weights), log.csv and config.json. An
interrupted run continues exactly where it stopped with --resume.

Several processes (one per GPU, or CPU processes): launch the same command with
torchrun, e.g. 'torchrun --nproc_per_node 4 -m exposure_slot train ...';
--batch-size is then split over the processes and only rank 0 writes.
"""

_TRAIN_EPILOG = """\
examples:
  exposure-slot train -o runs/msec --split MSEC_Train.txt --root data/MSEC --steps 100000
  exposure-slot train -o runs/kodak --synthetic photos/ --crop 128 --steps 3000
  exposure-slot train -o runs/kodak --synthetic photos/ --crop 128 --steps 3000 --resume
"""


def add_train_command(commands) -> None:
    """Register ``exposure-slot train`` on the CLI's subparsers."""
    from .backends import available_backends

    parser = commands.add_parser("train", help="train a network (released recipe, resumable)",
                                 description=_TRAIN_DESCRIPTION, epilog=_TRAIN_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output-dir", required=True, metavar="RUN_DIR", type=Path,
                        help="directory for checkpoints, weights and the log (created if missing)")
    data = parser.add_argument_group("data (choose one)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", metavar="CSV", type=Path,
                        help="one of the authors' split files (with --root)")
    source.add_argument("--pairs", nargs=2, metavar=("INPUT_DIR", "GT_DIR"), type=Path,
                        help="input and ground-truth folders, matched by file stem")
    source.add_argument("--synthetic", nargs="+", metavar="PATH", type=Path,
                        help="folders or files of well-exposed photos to re-expose on the fly")
    data.add_argument("--root", type=Path, metavar="DIR",
                      help="where the --split dataset lies on this machine")
    data.add_argument("--resize", type=int, metavar="N",
                      help="resize --split/--pairs images to NxN (default 256, as released; "
                           "0 keeps the size)")
    data.add_argument("--crop", type=int, metavar="N",
                      help="random NxN crops (after --resize); default for --synthetic: 256")
    data.add_argument("--flip", action="store_true",
                      help="random flips for --split/--pairs (--synthetic always flips)")
    data.add_argument("--window", type=float, nargs=2, metavar=("MIN", "MAX"),
                      help="--synthetic: crop a random square window of MIN..MAX times the "
                           "photo's shorter side and resize it to --crop (whole-scene context)")
    data.add_argument("--epoch-size", type=int, metavar="N",
                      help="--synthetic items per epoch (default 8 per photo)")
    data.add_argument("--ev-range", type=float, nargs=2, default=(-2.0, 2.0), metavar=("LOW", "HIGH"),
                      help="--synthetic global EV range (default -2 2)")
    data.add_argument("--mixed-prob", type=float, default=0.5, metavar="P",
                      help="--synthetic share of mixed (regional) exposure errors (default 0.5)")
    data.add_argument("--jpeg-quality", type=int, metavar="Q",
                      help="--synthetic: round-trip inputs through JPEG at quality Q")

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--steps", type=int, default=10000, help="optimizer steps (default 10000)")
    recipe.add_argument("--batch-size", type=int, default=8,
                        help="images per step, over all processes (default 8)")
    recipe.add_argument("--lr", type=float, default=2e-4, help="initial learning rate (default 2e-4)")
    recipe.add_argument("--level", type=int, choices=(2, 3), default=2, help="network level (default 2)")
    recipe.add_argument("--dim", type=int, default=128,
                        help="bottleneck channels (default 128, the released network)")
    recipe.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    recipe.add_argument("--init-weights", metavar="PATH",
                        help="fine-tune: start from these weights (a weights.pt of ours or the "
                             "authors' .pth) instead of a random initialisation")

    running = parser.add_argument_group("running")
    running.add_argument("--resume", action="store_true",
                         help="continue the run in RUN_DIR exactly where its checkpoint stopped")
    running.add_argument("--checkpoint-every", type=int, default=500, metavar="N",
                         help="write checkpoint.pt and weights.pt every N steps (default 500)")
    running.add_argument("--log-every", type=int, default=10, metavar="N",
                         help="append a row to log.csv every N steps (default 10)")
    running.add_argument("--backend", default="auto", metavar="NAME",
                         help=f"slot attention implementation (available: auto, "
                              f"{', '.join(available_backends())})")
    running.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                         help="'auto' (default) trains on a CUDA GPU if there is one")
    running.add_argument("--no-amp", action="store_true",
                         help="train in float32 on CUDA too (default: bfloat16 autocast on GPUs)")
    running.add_argument("--workers", type=int, default=0, metavar="N",
                         help="data loader processes per training process (default 0)")
    running.add_argument("--threads", type=int, metavar="N",
                         help="CPU threads per process (default: torch's choice)")
    running.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_train)


def _dataset_from_args(args) -> tuple[Dataset, str]:
    """The training data named on the command line, and its description."""
    from .data import ExposureDataset, folder_pairs, read_split
    from .data.synthesis import SyntheticExposurePairs

    if args.synthetic:
        if args.resize is not None or args.flip:
            raise TrainingError("--resize and --flip apply to --split/--pairs; --synthetic "
                                "always takes random crops (--crop) and flips")
        if args.root is not None:
            raise TrainingError("--root applies to --split only")
        crop = args.crop or 256
        window = tuple(args.window) if args.window else None
        dataset = SyntheticExposurePairs(
            args.synthetic, crop=crop, window=window, length=args.epoch_size,
            ev_range=tuple(args.ev_range),
            mixed_prob=args.mixed_prob, jpeg_quality=args.jpeg_quality, seed=args.seed)
        photos = dataset.paths
        names = ", ".join(p.name for p in photos[:4]) + (", ..." if len(photos) > 4 else "")
        crops = (f"windows of {window[0]:g}-{window[1]:g} x the shorter side resized to {crop}px"
                 if window else f"{crop}px crops")
        return dataset, (f"synthetic exposure errors of {len(photos)} photos ({names}): "
                         f"{crops}, flips, global EV U{list(args.ev_range)} or "
                         f"mixed fields (p={args.mixed_prob})")
    if (args.epoch_size or args.jpeg_quality or args.window or args.mixed_prob != 0.5
            or tuple(args.ev_range) != (-2.0, 2.0)):
        raise TrainingError("--window, --epoch-size, --ev-range, --mixed-prob and --jpeg-quality "
                            "apply to --synthetic only")
    if args.split is not None:
        pairs = read_split(args.split, args.root)
        description = f"split {args.split.name}"
    else:
        if args.root is not None:
            raise TrainingError("--root applies to --split only")
        pairs = folder_pairs(*args.pairs)
        description = f"pairs {args.pairs[0]} / {args.pairs[1]}"
    resize = 256 if args.resize is None else args.resize
    dataset = ExposureDataset(pairs, resize=resize or None, crop=args.crop, flip=args.flip,
                              seed=args.seed)
    details = [f"resized to {resize}x{resize}" if resize else "full size"]
    if args.crop:
        details.append(f"{args.crop}px crops")
    if args.flip:
        details.append("flips")
    return dataset, f"{description} ({len(pairs)} pairs): {', '.join(details)}"


def _cmd_train(args) -> int:
    from .backends import validate_backend
    from .cli import EXIT_OK, _UsageError
    from .data import DatasetError

    try:
        validate_backend(args.backend)
        if args.threads:
            torch.set_num_threads(args.threads)
        dataset, description = _dataset_from_args(args)
        config = TrainConfig(
            output_dir=str(args.output_dir), steps=args.steps, batch_size=args.batch_size,
            lr=args.lr, level=args.level, dim=args.dim, backend=args.backend, device=args.device,
            amp=not args.no_amp, num_workers=args.workers, checkpoint_every=args.checkpoint_every,
            log_every=args.log_every, seed=args.seed, progress=not args.quiet, data=description,
            init_weights=None if args.init_weights is None else str(args.init_weights))
        model = train(dataset, config, resume=args.resume)
    except (TrainingError, DatasetError, ValueError) as exc:
        raise _UsageError(" ".join(str(exc).split())) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {config.steps} steps (level {model.level if isinstance(model, ExposureSlot) else config.level}); "
              f"weights: {Path(config.output_dir) / WEIGHTS_NAME}, log: {Path(config.output_dir) / LOG_NAME}")
    return EXIT_OK
