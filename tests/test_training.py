"""Training: exact resume, two-process DistributedDataParallel, the train command."""

import csv
import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from exposure_slot.cli import EXIT_OK, EXIT_USAGE, main, make_example_image
from exposure_slot.data import SyntheticExposurePairs, synthesize
from exposure_slot.images import read_image, save_image
from exposure_slot.pretrained import load_weights, read_weights
from exposure_slot.training import TrainConfig, TrainingError, train

TINY = dict(dim=16, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two small generated photos in a folder."""
    folder = tmp_path_factory.mktemp("photos")
    for name, size in (("a.png", (64, 48)), ("b.png", (48, 64))):
        save_image(folder / name, make_example_image(*size), format="PNG")
    return folder


class _Interrupted(Exception):
    pass


class _CrashAfter(torch.utils.data.Dataset):
    """Wraps a dataset and raises after ``limit`` items, like a killed run."""

    def __init__(self, dataset, limit):
        self.dataset, self.limit, self.served = dataset, limit, 0

    def set_epoch(self, epoch):
        self.dataset.set_epoch(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if self.served == self.limit:
            raise _Interrupted
        self.served += 1
        return self.dataset[index]


def _state_hash(state):
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _log_rows(run):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_resume_gives_bitwise_the_uninterrupted_weights(photos, tmp_path):
    def dataset():
        return SyntheticExposurePairs(photos, crop=16, length=6, seed=1)  # 3 steps per epoch

    config = dict(steps=5, checkpoint_every=2, log_every=1, **TINY)
    straight = tmp_path / "straight"
    train(dataset(), TrainConfig(output_dir=str(straight), **config))

    broken = tmp_path / "broken"
    # Dies while loading step 4's batch: checkpoint at step 2, log rows up to step 3.
    with pytest.raises(_Interrupted):
        train(_CrashAfter(dataset(), limit=6), TrainConfig(output_dir=str(broken), **config))
    assert [row["step"] for row in _log_rows(broken)] == ["1", "2", "3"]
    assert torch.load(broken / "checkpoint.pt", weights_only=False)["step"] == 2
    train(dataset(), TrainConfig(output_dir=str(broken), **config), resume=True)

    a, b = read_weights(straight / "weights.pt"), read_weights(broken / "weights.pt")
    assert _state_hash(a["state_dict"]) == _state_hash(b["state_dict"])
    assert a["metadata"]["steps"] == b["metadata"]["steps"] == 5
    ckpt_a = torch.load(straight / "checkpoint.pt", weights_only=False)
    ckpt_b = torch.load(broken / "checkpoint.pt", weights_only=False)
    for key, value in ckpt_a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], ckpt_b["optimizer"]["state"][key]["exp_avg_sq"])
    assert ckpt_a["scheduler"] == ckpt_b["scheduler"]
    # The log is continuous: the row of step 3 written before the crash was replaced.
    rows_a, rows_b = _log_rows(straight), _log_rows(broken)
    assert [r["step"] for r in rows_b] == ["1", "2", "3", "4", "5"]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    # The training did something: the weights moved from their initialisation.
    initial = TrainConfig(output_dir="unused", **config)
    from exposure_slot.training import build_model
    assert _state_hash(build_model(initial).state_dict()) != _state_hash(a["state_dict"])


def test_run_directory_guards(photos, tmp_path):
    dataset = SyntheticExposurePairs(photos, crop=16, length=4)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(dataset, TrainConfig(output_dir=str(run), steps=1, **TINY), resume=True)
    train(dataset, TrainConfig(output_dir=str(run), steps=1, **TINY))
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(dataset, TrainConfig(output_dir=str(run), steps=1, **TINY))
    with pytest.raises(TrainingError, match=r"steps: 1 -> 3"):
        train(dataset, TrainConfig(output_dir=str(run), steps=3, **TINY), resume=True)
    with pytest.raises(TrainingError, match="fewer than one batch"):
        train(SyntheticExposurePairs(photos, crop=16, length=1),
              TrainConfig(output_dir=str(tmp_path / "small"), steps=1, **TINY))


_DDP_SCRIPT = textwrap.dedent("""
    import hashlib, os, sys
    import torch
    torch.set_num_threads(1)
    from exposure_slot.data import SyntheticExposurePairs
    from exposure_slot.training import TrainConfig, train

    photos, run, hashes = sys.argv[1:4]
    dataset = SyntheticExposurePairs(photos, crop=16, length=8, seed=3)
    model = train(dataset, TrainConfig(output_dir=run, steps=3, batch_size=4, dim=16,
                                       checkpoint_every=2, log_every=1, progress=False))
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().contiguous().numpy().tobytes())
    with open(os.path.join(hashes, f"rank{os.environ['RANK']}.txt"), "w") as f:
        f.write(digest.hexdigest())
""")


def test_two_process_ddp_keeps_replicas_identical(photos, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    run, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(photos), str(run), str(hashes)],
        capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (hashes / "rank0.txt").read_text(), (hashes / "rank1.txt").read_text()
    assert rank0 == rank1
    # Rank 0 wrote the run; its weights are the replicas' parameters.
    model = load_weights(run / "weights.pt")
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().contiguous().numpy().tobytes())
    assert digest.hexdigest() == rank0
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert [row["step"] for row in _log_rows(run)] == ["1", "2", "3"]
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())


def test_train_command_end_to_end(photos, tmp_path, capsys):
    run = tmp_path / "cli_run"
    args = ["train", "-o", str(run), "--synthetic", str(photos), "--crop", "16", "--steps", "2",
            "--batch-size", "2", "--dim", "16", "--checkpoint-every", "1", "--log-every", "1",
            "--quiet"]
    assert main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and str(run / "weights.pt") in out
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "log.csv",
                                                     "weights.pt"]
    model = load_weights(run / "weights.pt")
    assert not model.training and model.level == 2
    assert model.metadata["steps"] == 2 and "2 photos" in model.metadata["data"]
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 20, 24)).shape == (1, 3, 20, 24)
    # Resuming a finished run changes nothing.
    before = _state_hash(read_weights(run / "weights.pt")["state_dict"])
    assert main(args + ["--resume"]) == EXIT_OK
    assert _state_hash(read_weights(run / "weights.pt")["state_dict"]) == before

    # Setup errors: exit code 2, one line naming the problem, nothing written.
    assert main(args) == EXIT_USAGE
    assert "already holds a training run" in capsys.readouterr().err
    missing = tmp_path / "no_such_folder"
    assert main(["train", "-o", str(tmp_path / "other"), "--synthetic", str(missing), "--quiet"]) == EXIT_USAGE
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    assert main(["train", "-o", str(tmp_path / "other"), "--synthetic", str(photos),
                 "--resize", "64"]) == EXIT_USAGE
    assert "--resize and --flip apply to --split/--pairs" in capsys.readouterr().err


def test_train_command_on_folder_pairs(photos, tmp_path, capsys):
    inputs, truths = tmp_path / "input", tmp_path / "gt"
    inputs.mkdir()
    truths.mkdir()
    for index, photo in enumerate(sorted(photos.iterdir())):
        target = read_image(photo).tensor[0]
        save_image(truths / f"{index}.png", target, format="PNG")
        save_image(inputs / f"{index}.png", synthesize(target, -1.0), format="PNG")
    run = tmp_path / "run"
    assert main(["train", "-o", str(run), "--pairs", str(inputs), str(truths), "--resize", "24",
                 "--flip", "--steps", "2", "--batch-size", "2", "--dim", "16", "--quiet"]) == EXIT_OK
    model = load_weights(run / "weights.pt")
    assert "pairs" in model.metadata["data"] and "resized to 24x24" in model.metadata["data"]
    assert [row["step"] for row in _log_rows(run)] == ["2"]
    capsys.readouterr()
    # A dataset problem is a setup error naming the file.
    (truths / "1.png").unlink()
    assert main(["train", "-o", str(tmp_path / "run2"), "--pairs", str(inputs), str(truths),
                 "--quiet"]) == EXIT_USAGE
    assert "1.png" in capsys.readouterr().err


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    """init_weights: the network starts from the file (ours or the authors'), not a
    random initialisation; a mismatched file is a TrainingError naming it."""
    from exposure_slot.network import ExposureSlot
    from exposure_slot.pretrained import save_weights
    from exposure_slot.training import build_model

    torch.manual_seed(123)
    start = ExposureSlot(level=2)
    save_weights(start, tmp_path / "start.pt")
    export = tmp_path / "authors.pth"
    from exposure_slot.checkpoint import export_official
    export_official(start, export)
    for path in (tmp_path / "start.pt", export):
        model = build_model(TrainConfig(output_dir=str(tmp_path / "run"),
                                        init_weights=str(path)))
        assert _state_hash(model.state_dict()) == _state_hash(start.state_dict())
    fresh = build_model(TrainConfig(output_dir=str(tmp_path / "run")))
    assert _state_hash(fresh.state_dict()) != _state_hash(start.state_dict())
    with pytest.raises(TrainingError, match="start.pt does not fit a level-3"):
        build_model(TrainConfig(output_dir=str(tmp_path / "run"), level=3,
                                init_weights=str(tmp_path / "start.pt")))
    with pytest.raises(TrainingError, match="missing.pt"):
        build_model(TrainConfig(output_dir=str(tmp_path / "run"),
                                init_weights=str(tmp_path / "missing.pt")))
