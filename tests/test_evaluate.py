"""Evaluation on a tiny generated benchmark: the Python API and ``exposure-slot eval``,
checked against PSNR/SSIM computed independently (scikit-image, manual padding)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from exposure_slot import ExposureSlot, export_official
from exposure_slot.cli import main
from exposure_slot.data import DatasetError, ExposureDataset, folder_pairs
from exposure_slot.evaluate import evaluate

# name -> (width, height); the ground truth of <stem>_<EV> is <stem>.
SIZES = {"a": (26, 21), "b": (17, 24)}
INPUTS = {"a_N1.5.png": -1.5, "a_P1.png": 1.0, "b_N1.png": -1.0, "b_0.png": 0.0}


def _write(path: Path, seed: int, size) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def bench(tmp_path):
    for stem, size in SIZES.items():
        _write(tmp_path / "gt" / f"{stem}.png", seed=ord(stem), size=size)
    for i, name in enumerate(INPUTS):
        _write(tmp_path / "input" / name, seed=i, size=SIZES[name[0]])
    return tmp_path


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1234)
    return ExposureSlot(level=2, backend="reference").eval()


def _read(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def _expected(model, root: Path) -> dict[str, tuple[float, float]]:
    """PSNR and SSIM per input, independently: the authors' padding by hand, skimage metrics."""
    expected = {}
    for name in INPUTS:
        x = _read(root / "input" / name)[None]
        gt = _read(root / "gt" / f"{name.split('_')[0]}.png").numpy().astype(np.float64)
        h, w = x.shape[-2:]
        padded = F.pad(x, (0, (-w) % 4, 0, (-h) % 4), mode="reflect")
        with torch.no_grad():
            pred = model(padded)[0, :, :h, :w].double().clamp(0, 1).numpy()
        p255, g255 = pred * 255, gt * 255
        expected[name] = (
            peak_signal_noise_ratio(g255, p255, data_range=255),
            structural_similarity(p255, g255, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=255, channel_axis=0))
    return expected


def _group_means(expected, names):
    return (sum(expected[n][0] for n in names) / len(names),
            sum(expected[n][1] for n in names) / len(names))


def test_evaluate_matches_independent_metrics(bench, model):
    expected = _expected(model, bench)
    dataset = ExposureDataset(folder_pairs(bench / "input", bench / "gt"))
    result = evaluate(model, dataset, progress=False, save_outputs=bench / "out")
    assert not model.training
    scores = {s.name: s for s in result.images}
    assert sorted(scores) == sorted(INPUTS)
    for name, (p, s) in expected.items():
        assert abs(scores[name].psnr - p) < 1e-6 and abs(scores[name].ssim - s) < 1e-8
        assert scores[name].label == INPUTS[name] and scores[name].seconds > 0
    groups = {g.group: g for g in result.groups()}
    under, over = ["a_N1.5.png", "b_N1.png"], ["a_P1.png", "b_0.png"]
    for group, names in (("under", under), ("over", over), ("all", under + over)):
        p, s = _group_means(expected, names)
        assert groups[group].images == len(names)
        assert abs(groups[group].psnr - p) < 1e-6 and abs(groups[group].ssim - s) < 1e-8
    assert result.size_policy == "pad" and result.backend == "reference"
    # Saved predictions: the network's output, clipped and rounded to 8 bits.
    x = _read(bench / "input" / "b_0.png")[None]
    with torch.no_grad():
        pred = model(x)[0].clamp(0, 1)
    saved = _read(bench / "out" / "b_0.png")
    assert torch.equal(saved, (pred * 255).round() / 255)


def test_evaluate_reads_in_workers_and_restores_training_mode(bench, model):
    pairs = folder_pairs(bench / "input", bench / "gt")
    reference = evaluate(model, pairs, progress=False)
    model.train()
    try:
        result = evaluate(model, pairs, workers=2, progress=False)
        assert model.training
    finally:
        model.eval()
    assert [(s.name, s.psnr, s.ssim) for s in result.images] == \
        [(s.name, s.psnr, s.ssim) for s in reference.images]


def test_evaluate_names_a_pair_of_different_sizes(bench, model):
    _write(bench / "gt" / "b.png", seed=0, size=(20, 24))
    dataset = ExposureDataset(folder_pairs(bench / "input", bench / "gt"))
    with pytest.raises(DatasetError, match="b_0.png: input .* is 17x24 but its ground truth .* 20x24"):
        evaluate(model, dataset, progress=False, workers=1)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("layout", ["authors", "ours"])
def test_cli_eval_end_to_end(bench, model, capsys, layout):
    checkpoint = bench / "weights.pth"
    if layout == "authors":
        export_official(model, checkpoint)
    else:  # a training checkpoint of ours: our key names under "model", plus other state
        torch.save({"model": model.state_dict(), "step": 7, "optimizer": {"state": {}}}, checkpoint)
    expected = _expected(model, bench)
    # A split file in the authors' format, with their absolute paths.
    theirs = "/home/author/data/MSEC/testing"
    lines = [",Ex,filename,filepath,gtpath,MSEC"] + [
        f"{i},{INPUTS[n]},{n[:-4]},{theirs}/input/{n},{theirs}/gt/{n.split('_')[0]}.png,MSEC"
        for i, n in enumerate(INPUTS)]
    split = bench / "MSEC_Test.txt"
    split.write_text("\n".join(lines) + "\n")
    out = bench / "results"
    out.mkdir()
    code = main(["eval", "--split", str(split), "--root", str(bench), "--checkpoint", str(checkpoint),
                 "--backend", "reference", "--device", "cpu", "--csv", str(out / "images.csv"),
                 "--summary", str(out / "summary.csv"), "--save-outputs", str(out / "pred"),
                 "--workers", "1", "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    rows = _rows(out / "images.csv")
    assert [r["name"] for r in rows] == [f"input/{n}" for n in INPUTS]
    for row in rows:
        name = row["name"].removeprefix("input/")
        assert abs(float(row["psnr"]) - expected[name][0]) < 1e-6
        assert abs(float(row["ssim"]) - expected[name][1]) < 1e-8
        assert float(row["label"]) == INPUTS[name]
        assert row["exposure"] == ("under" if INPUTS[name] < 0 else "over")
        assert float(row["seconds"]) > 0
    summary = {r["group"]: r for r in _rows(out / "summary.csv")}
    under = _group_means(expected, ["a_N1.5.png", "b_N1.png"])
    over = _group_means(expected, ["a_P1.png", "b_0.png"])
    every = _group_means(expected, list(INPUTS))
    for group, (p, s) in (("under", under), ("over", over), ("all", every)):
        count = 4 if group == "all" else 2
        assert int(summary[group]["images"]) == count
        assert abs(float(summary[group]["psnr"]) - p) < 1e-6
        assert abs(float(summary[group]["ssim"]) - s) < 1e-8
        # The printed table shows the same means.
        assert f"{group:<6} {count:>7} {p:>9.3f} {s:>7.4f}" in stdout
    assert "size policy pad" in stdout
    assert sorted(p.name for p in (out / "pred" / "input").iterdir()) == sorted(INPUTS)
    assert sorted(p.name for p in out.iterdir()) == ["images.csv", "pred", "summary.csv"]


def test_cli_missing_file_exits_2_and_writes_nothing(bench, capsys):
    (bench / "input" / "a_P1.png").unlink()
    (bench / "gt" / "b.png").unlink()
    lines = [",Ex,filename,filepath,gtpath,MSEC"] + [
        f"{i},{INPUTS[n]},{n[:-4]},/x/input/{n},/x/gt/{n.split('_')[0]}.png,MSEC"
        for i, n in enumerate(INPUTS)]
    split = bench / "split.csv"
    split.write_text("\n".join(lines) + "\n")
    out = bench / "results"
    code = main(["eval", "--split", str(split), "--root", str(bench), "--random-weights",
                 "--csv", str(bench / "images.csv"), "--save-outputs", str(out), "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert code == 2
    assert f"missing: {bench / 'input' / 'a_P1.png'}" in stderr
    assert f"missing: {bench / 'gt' / 'b.png'}" in stderr
    assert not out.exists() and not (bench / "images.csv").exists()
    assert stdout == ""


def test_cli_failure_while_running_exits_1_without_a_table(bench, capsys):
    _write(bench / "gt" / "a.png", seed=0, size=(30, 21))  # no longer the inputs' size
    code = main(["eval", "--input-dir", str(bench / "input"), "--gt-dir", str(bench / "gt"),
                 "--random-weights", "--csv", str(bench / "images.csv"), "--workers", "0",
                 "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert code == 1
    assert "a_N1.5.png: input" in stderr and "30x21" in stderr
    assert not (bench / "images.csv").exists() and "PSNR" not in stdout


def test_cli_option_errors(bench, capsys):
    base = ["eval", "--random-weights", "--no-progress"]
    assert main(base + ["--input-dir", str(bench / "input")]) == 2
    assert "--input-dir needs --gt-dir" in capsys.readouterr().err
    assert main(base + ["--input-dir", str(bench / "input"), "--gt-dir", str(bench / "gt"),
                        "--csv", str(bench / "no" / "such" / "dir.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(base + ["--input-dir", str(bench / "input"), "--gt-dir", str(bench / "gt"),
                        "--root", str(bench)]) == 2
    assert "--root goes with --split" in capsys.readouterr().err
