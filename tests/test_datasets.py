"""Split files, folder pairs and the torch Dataset, on tiny generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exposure_slot.data import DatasetError, ExposureDataset, check_pairs, folder_pairs, read_split
from exposure_slot.data.datasets import OVER, UNDER, UNKNOWN

AUTHORS_ROOT = "/home/someone/Lowlight_models/data"


def _write_image(path: Path, seed: int, size=(12, 10)) -> np.ndarray:
    """A random 8-bit RGB image (W x H = size); returns its values in [0, 1], HWC."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")  # lossless whatever the extension
    return pixels.astype(np.float32) / 255


def _write_split(path: Path, dataset: str, rows) -> Path:
    lines = [f",Ex,filename,filepath,gtpath,{dataset}"]
    for number, (label, inp, gt) in enumerate(rows):
        lines.append(f"{number},{label},{Path(inp).stem},{inp},{gt},{dataset}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def msec(tmp_path):
    """A tiny MSEC test split: files under tmp/data/MSEC/testing, CSV with authors' paths."""
    testing = tmp_path / "data" / "MSEC" / "testing"
    pixels, rows = {}, []
    for i, stem in enumerate(("a0001", "a0002")):
        pixels[f"gt/{stem}"] = _write_image(testing / "expert_c_testing_set" / f"{stem}.jpg", 100 + i)
        for j, (ev, label) in enumerate((("N1.5", -2), ("0", 0), ("P1", 1))):
            name = f"INPUT_IMAGES/{stem}_{ev}.JPG"
            pixels[name] = _write_image(testing / name, 10 * i + j)
            rows.append((label, f"{AUTHORS_ROOT}/MSEC/testing/{name}",
                         f"{AUTHORS_ROOT}/MSEC/testing/expert_c_testing_set/{stem}.jpg"))
    split = _write_split(tmp_path / "MSEC_Test.txt", "MSEC", rows)
    return split, tmp_path, pixels


def test_split_is_rerooted_at_any_level_of_the_layout(msec):
    split, tmp, pixels = msec
    for root in (tmp / "data" / "MSEC" / "testing", tmp / "data" / "MSEC", tmp / "data", tmp):
        pairs = read_split(split, root=root)
        assert [p.name for p in pairs] == [f"INPUT_IMAGES/a000{i}_{ev}.JPG" for i in (1, 2)
                                           for ev in ("N1.5", "0", "P1")]
        assert all(p.input.is_file() and p.gt.is_file() for p in pairs)
        assert pairs[0].input == tmp / "data/MSEC/testing/INPUT_IMAGES/a0001_N1.5.JPG"
        assert pairs[4].gt == tmp / "data/MSEC/testing/expert_c_testing_set/a0002.jpg"
    assert [p.label for p in pairs[:3]] == [-2.0, 0.0, 1.0]
    # MSEC: EV < 0 is under-exposed, 0 and above over-exposed.
    assert [p.exposure for p in pairs[:3]] == [UNDER, OVER, OVER]

    dataset = ExposureDataset(pairs)
    x, y, exposure, name = dataset[4]
    assert name == "INPUT_IMAGES/a0002_0.JPG" and exposure == OVER
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 10, 12)
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), pixels[name])
    np.testing.assert_array_equal(y.permute(1, 2, 0).numpy(), pixels["gt/a0002"])


def test_split_with_a_root_that_does_not_hold_the_files_lists_them(msec, tmp_path):
    split, _, _ = msec
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    pairs = read_split(split, root=elsewhere)
    with pytest.raises(DatasetError) as err:
        ExposureDataset(pairs)
    message = str(err.value)
    assert "8 of the dataset's 8 files" in message and "dataset root" in message
    assert message.count("missing: ") == 8


def test_sice_split_labels_and_shared_file_names(tmp_path):
    base = tmp_path / "SICEV2" / "test"
    for folder in ("low", "over", "gt"):
        _write_image(base / folder / "7.JPG", seed=len(folder))
    theirs = f"{AUTHORS_ROOT}/SICEV2/test"
    split = _write_split(tmp_path / "SICEV2_Test.txt", "SICEV2",
                         [(0, f"{theirs}/low/7.JPG", f"{theirs}/gt/7.JPG"),
                          (2, f"{theirs}/over/7.JPG", f"{theirs}/gt/7.JPG")])
    pairs = read_split(split, root=tmp_path / "SICEV2")
    assert [p.name for p in pairs] == ["low/7.JPG", "over/7.JPG"]
    # SICE's test split labels its low inputs 0 and its over inputs 2.
    assert [p.exposure for p in pairs] == [UNDER, OVER]
    assert pairs[0].gt == pairs[1].gt == base / "gt" / "7.JPG"


def test_split_paths_without_root_are_relative_to_the_split_file(tmp_path):
    _write_image(tmp_path / "in" / "x.png", 1)
    _write_image(tmp_path / "gt" / "x.png", 2)
    split = _write_split(tmp_path / "split.csv", "LCDP", [(-1, "in/x.png", "gt/x.png")])
    (pair,) = read_split(split)
    assert pair.input == tmp_path / "in" / "x.png" and pair.gt == tmp_path / "gt" / "x.png"
    assert pair.name == "in/x.png" and pair.exposure == UNDER


def test_malformed_split_files(tmp_path):
    bad_header = tmp_path / "bad_header.csv"
    bad_header.write_text("a,b,c\n0,1,x,/x.png,/y.png\n")
    with pytest.raises(DatasetError, match="header"):
        read_split(bad_header)
    bad_rows = tmp_path / "bad_rows.csv"
    bad_rows.write_text(",Ex,filename,filepath,gtpath,MSEC\n0,low,x,/a/x.png,/a/y.png,MSEC\n1,1,x\n")
    with pytest.raises(DatasetError) as err:
        read_split(bad_rows)
    assert "line 2: exposure label 'low'" in str(err.value)
    assert "line 3: 3 columns" in str(err.value)
    with pytest.raises(DatasetError, match="does not exist"):
        read_split(tmp_path / "nope.csv")
    repeated = _write_split(tmp_path / "rep.csv", "MSEC", [(1, "/a/x.png", "/a/y.png")] * 2)
    with pytest.raises(DatasetError, match="more than once"):
        read_split(repeated)


def test_folder_pairs_with_msec_names(tmp_path):
    for stem in ("a0001", "b7"):
        _write_image(tmp_path / "gt" / f"{stem}.jpg", 0)
    for name in ("a0001_N1.5.JPG", "a0001_N1.JPG", "a0001_0.JPG", "a0001_P1.JPG", "a0001_P1.5.JPG",
                 "b7.png"):
        _write_image(tmp_path / "input" / name, 1)
    (tmp_path / "input" / "notes.txt").write_text("not an image")
    pairs = {p.name: p for p in folder_pairs(tmp_path / "input", tmp_path / "gt")}
    assert sorted(pairs) == sorted(["a0001_N1.5.JPG", "a0001_N1.JPG", "a0001_0.JPG",
                                    "a0001_P1.JPG", "a0001_P1.5.JPG", "b7.png"])
    assert {n: p.label for n, p in pairs.items()} == {
        "a0001_N1.5.JPG": -1.5, "a0001_N1.JPG": -1.0, "a0001_0.JPG": 0.0, "a0001_P1.JPG": 1.0,
        "a0001_P1.5.JPG": 1.5, "b7.png": None}
    assert [pairs[n].exposure for n in ("a0001_N1.5.JPG", "a0001_N1.JPG", "a0001_0.JPG",
                                        "a0001_P1.JPG", "a0001_P1.5.JPG", "b7.png")] == \
        [UNDER, UNDER, OVER, OVER, OVER, UNKNOWN]
    assert pairs["a0001_P1.JPG"].gt == tmp_path / "gt" / "a0001.jpg"
    assert pairs["b7.png"].gt == tmp_path / "gt" / "b7.jpg"
    # A whole folder of one exposure (SICE's low/ and over/): the EV names keep theirs.
    over = {p.name: p.exposure for p in folder_pairs(tmp_path / "input", tmp_path / "gt", "over")}
    assert over["b7.png"] == OVER and over["a0001_N1.JPG"] == UNDER


def test_folder_pairs_errors(tmp_path):
    _write_image(tmp_path / "gt" / "a.png", 0)
    for name in ("a.png", "lost.png", "c_N1.png", "d_X2.png"):
        _write_image(tmp_path / "input" / name, 1)
    with pytest.raises(DatasetError) as err:
        folder_pairs(tmp_path / "input", tmp_path / "gt")
    message = str(err.value)
    assert "3 input(s)" in message
    for name in ("lost.png", "c_N1.png", "d_X2.png"):
        assert name in message
    _write_image(tmp_path / "gt" / "a.jpg", 0)
    with pytest.raises(DatasetError, match="same stem"):
        folder_pairs(tmp_path / "input", tmp_path / "gt")
    with pytest.raises(DatasetError, match="does not exist"):
        folder_pairs(tmp_path / "missing", tmp_path / "gt")


def test_missing_files_are_all_listed_up_front(msec):
    split, tmp, _ = msec
    testing = tmp / "data" / "MSEC" / "testing"
    gone = [testing / "INPUT_IMAGES" / "a0001_0.JPG", testing / "INPUT_IMAGES" / "a0002_P1.JPG",
            testing / "expert_c_testing_set" / "a0002.jpg"]
    for path in gone:
        path.unlink()
    pairs = read_split(split, root=tmp / "data" / "MSEC")
    with pytest.raises(DatasetError) as err:
        ExposureDataset(pairs)
    message = str(err.value)
    assert "3 of the dataset's 8 files are missing or unreadable" in message
    for path in gone:
        assert f"missing: {path}" in message
    assert message.count("missing: ") == 3  # a shared ground truth is listed once


def test_unreadable_files_are_named(tmp_path):
    for folder in ("input", "gt"):
        for stem in ("good", "garbage", "truncated"):
            _write_image(tmp_path / folder / f"{stem}.png", 3, size=(40, 30))
    (tmp_path / "input" / "garbage.png").write_bytes(b"this is not an image at all")
    truncated = tmp_path / "gt" / "truncated.png"
    truncated.write_bytes(truncated.read_bytes()[:100])  # header intact, pixels cut off
    pairs = folder_pairs(tmp_path / "input", tmp_path / "gt")
    with pytest.raises(DatasetError) as err:
        check_pairs(pairs)
    message = str(err.value)
    assert f"unreadable (not an image, or a format Pillow cannot read): {tmp_path / 'input' / 'garbage.png'}" in message
    assert "1 of the dataset's 6 files" in message
    # Damage past the header surfaces when the file is read, naming the file.
    dataset = ExposureDataset([p for p in pairs if p.name != "garbage.png"])
    with pytest.raises(DatasetError, match=f"cannot read the ground truth of truncated.png, {truncated}"):
        dataset[[p.name for p in dataset.pairs].index("truncated.png")]


def test_size_mismatch_is_named(tmp_path):
    _write_image(tmp_path / "input" / "a.png", 0, size=(12, 10))
    _write_image(tmp_path / "gt" / "a.png", 0, size=(14, 10))
    dataset = ExposureDataset(folder_pairs(tmp_path / "input", tmp_path / "gt"))
    with pytest.raises(DatasetError, match="a.png: input .* is 12x10 but its ground truth .* is 14x10"):
        dataset[0]
    resized = ExposureDataset(dataset.pairs, resize=8)
    x, y, _, _ = resized[0]
    assert x.shape == y.shape == (3, 8, 8)


def test_training_augmentation_is_deterministic_and_applied_to_both(tmp_path):
    for i in range(3):  # the same seed: ground truth = input
        _write_image(tmp_path / "input" / f"{i}.png", i, size=(32, 24))
        _write_image(tmp_path / "gt" / f"{i}.png", i, size=(32, 24))
    pairs = folder_pairs(tmp_path / "input", tmp_path / "gt")
    full = ExposureDataset(pairs)
    a = ExposureDataset(pairs, crop=(8, 16), flip=True, seed=5)
    b = ExposureDataset(pairs, crop=(8, 16), flip=True, seed=5)
    seen = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(len(pairs)):
            xa, ya, _, _ = a[i]
            xb, _, _, _ = b[i]
            assert xa.shape == (3, 8, 16)
            assert torch.equal(xa, xb)  # same seed, epoch and index: same crop and flips
            assert torch.equal(xa, ya)  # input and ground truth are the same picture here
            source = full[i][0]
            # The crop is a (possibly flipped) window of the source image.
            found = [(top, left, flips) for flips in ([], [-1], [-2], [-1, -2])
                     for top in range(24 - 8 + 1) for left in range(32 - 16 + 1)
                     if torch.equal(source[:, top:top + 8, left:left + 16].flip(flips) if flips
                                    else source[:, top:top + 8, left:left + 16], xa)]
            assert len(found) == 1
            seen.add((i, found[0][0], found[0][1], tuple(found[0][2])))
    assert len(seen) > 12  # new crops and flips each epoch
    c = ExposureDataset(pairs, crop=8, seed=6)
    assert not all(torch.equal(a[i][0][:, :, :8], c[i][0]) for i in range(3))


def test_dataloader_batches_with_workers(tmp_path):
    for i in range(4):
        _write_image(tmp_path / "input" / f"{i}_N1.png", i, size=(20 + i, 18))
        _write_image(tmp_path / "gt" / f"{i}.png", 10 + i, size=(20 + i, 18))
    dataset = ExposureDataset(folder_pairs(tmp_path / "input", tmp_path / "gt"), resize=(16, 16))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1)
    batches = list(loader)
    x, y, exposure, names = batches[0]
    assert x.shape == y.shape == (2, 3, 16, 16)
    assert exposure.tolist() == [UNDER, UNDER] and list(names) == ["0_N1.png", "1_N1.png"]
    assert torch.equal(batches[1][0][1], dataset[3][0])
