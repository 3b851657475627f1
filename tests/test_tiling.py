"""infer_large: exact tiled inference, halos derived from the layers, the memory
budget (measured with the allocator), the lean bottleneck path and the CLI's use."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

import exposure_slot as es
from exposure_slot import tiling
from exposure_slot.host_memory import peak_allocated_bytes
from exposure_slot.inference import optimize_for_inference
from exposure_slot.network import BottleneckBlock
from exposure_slot.tiling import (
    Window,
    conv_step,
    infer_large,
    needed_box,
    network_halos,
    network_stages,
    parse_memory_size,
    plan_tiles,
)

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many tiny convolutions: on a busy machine each OpenMP
    parallel region can wait a scheduler time slice for its second thread, which
    makes them 100x slower. One thread keeps them fast; results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(level: int = 2, size_policy: str = "pad", seed: int = 0) -> es.ExposureSlot:
    """A random model whose BatchNorms are not the identity (as after training)."""
    torch.manual_seed(seed)
    model = es.ExposureSlot(level=level, size_policy=size_policy).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.2)
    return model


def whole(model, x):
    with torch.inference_mode():
        return model(x, return_aux=True)


def max_error(a, b) -> float:
    return (a - b).abs().max().item()


# (level, batch, height, width, tile, mode, size_policy): tiles smaller than the
# halos (4, 8), odd and non-multiple-of-4 sizes (many tile borders, corners and
# image borders), an image smaller than one tile, the smallest images, both levels,
# every mode, both size policies, batch 2.
CASES = [
    (2, 1, 45, 61, 16, "recompute", "pad"),
    (2, 1, 45, 61, 16, "keep", "pad"),
    (2, 1, 45, 61, 16, "lean", "pad"),
    (2, 1, 26, 23, 4, "recompute", "pad"),
    (3, 1, 37, 45, 12, "keep", "pad"),
    (3, 1, 53, 29, 20, "lean", "pad"),
    (2, 1, 30, 37, 200, "recompute", "pad"),
    (2, 1, 5, 6, 4, "lean", "pad"),
    (2, 1, 8, 8, 4, "keep", "pad"),
    (2, 1, 45, 61, 20, "recompute", "resize"),
    (3, 2, 36, 52, 20, "lean", "pad"),
]


@pytest.mark.parametrize("level,batch,height,width,tile,mode,policy", CASES,
                         ids=["L{}-B{}-{}x{}-t{}-{}-{}".format(*c) for c in CASES])
def test_tiled_matches_whole_image_forward(level, batch, height, width, tile, mode, policy):
    model = make_model(level, policy)
    # Bands of a few rows, so the bottleneck's halo rows and ("lean") its
    # recomputed input rows are exercised too.
    model.bottleneck.chunk_tokens = 40
    x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    ref = whole(model, x)
    image, masks = infer_large(model, x, tile=tile, mode=mode, progress=False, return_masks=True)
    assert image.shape == ref.image.shape
    assert max_error(image, ref.image) <= TOL
    assert len(masks) == len(ref.masks)
    for got, want in zip(masks, ref.masks):
        assert got.shape == want.shape
        assert max_error(got, want) <= TOL


FUSED_CASES = [(45, 61, 16, "recompute"), (37, 29, 8, "lean"), (45, 61, 12, "keep")]


@pytest.mark.parametrize("height,width,tile,mode", FUSED_CASES,
                         ids=[f"{c[0]}x{c[1]}-t{c[2]}-{c[3]}" for c in FUSED_CASES])
def test_tiled_optimized_model_matches_its_whole_image_forward(height, width, tile, mode):
    """optimize_for_inference's fused, strided and transposed convolutions tile too."""
    fast = optimize_for_inference(make_model())
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(2))
    ref = whole(fast, x)
    image, masks = infer_large(fast, x, tile=tile, mode=mode, progress=False, return_masks=True)
    assert max_error(image, ref.image) <= TOL
    for got, want in zip(masks, ref.masks):
        assert max_error(got, want) <= TOL


def test_halos_agree_between_the_layer_and_the_fused_forms():
    """Pixel (un)shuffles plus convolutions, and the strided and transposed
    convolutions that replace them, are derived to reach equally far."""
    model = make_model()
    assert network_halos(optimize_for_inference(model)) == network_halos(model)


def test_forced_tiling_really_tiles():
    """The exactness tests above would prove nothing if a forced tile ran whole."""
    model = make_model()
    plan = plan_tiles(model, (1, 3, 45, 61), tile=16, max_memory="1G")
    assert not plan.whole and plan.tile == 16
    assert len(tiling._tiles(plan.image_size, plan.tile)) == 3 * 4


def test_halos_are_derived_from_the_layers():
    model = make_model()
    halos = network_halos(model)
    # A 5x5 first convolution reaches one pixel further, everywhere downstream of it.
    model.conv1_1 = nn.Conv2d(3, model.conv1_1.out_channels, 5, padding=2)
    wider = network_halos(model)
    assert wider["encoder_input"] == halos["encoder_input"] + 1
    assert wider["decoder_input"] == halos["decoder_input"] + 1
    assert wider["decoder_bottleneck"] == halos["decoder_bottleneck"]
    x = torch.rand(1, 3, 36, 44)
    assert max_error(infer_large(model, x, tile=16, progress=False), whole(model, x).image) <= TOL


def test_conv_step_geometry():
    step = conv_step(nn.Conv2d(4, 4, (5, 3), padding=(4, 2), dilation=2))
    assert step.before == step.after == (4, 2) and step.scale == 1
    step = conv_step(nn.Conv2d(4, 4, 4, stride=2, padding=1))  # output i reads 2i-1 .. 2i+2
    assert step.before == step.after == (1, 1) and step.scale == Fraction(1, 2)
    for conv in (nn.Conv2d(4, 4, 3, padding=0), nn.Conv2d(4, 4, 3, stride=2, padding=1)):
        with pytest.raises(NotImplementedError, match="keep the size"):
            conv_step(conv)


def test_encoder_halo_is_exactly_enough():
    """An interior e3 tile is exact from the derived input region and wrong from
    one pixel less on any side."""
    model = make_model()
    stages = network_stages(model)
    encoder = stages.to_e1 + stages.to_e2 + stages.to_e3
    x = torch.rand(1, 3, 128, 128)
    with torch.inference_mode():
        e3 = model.bn3(model.conv3_2(torch.nn.functional.gelu(model.down2(
            model.bn2(model.conv2_2(torch.nn.functional.gelu(model.down1(
                model.bn1(model.conv1_2(torch.nn.functional.gelu(model.conv1_1(x))))))))))))
        box = ((12, 16), (12, 16))
        need = needed_box(encoder, box, (128, 128))
        assert need == ((48 - 11, 64 + 11), (48 - 11, 64 + 11))
        aligned = tiling._aligned(need, stages.alignment, (128, 128))
        tile = Window.exact(x, aligned).through(encoder).crop(box)
        assert max_error(tile, tiling._crop(e3, box)) <= TOL
        for axis, side in ((0, 0), (0, 1), (1, 0), (1, 1)):
            # Zero the outermost pixels of the needed region on one side: the tile
            # must change, so every pixel of the halo is used.
            damaged = x.clone()
            rows, cols = [list(r) for r in need]
            edge = [rows, cols][axis][side] - side
            index = [slice(None)] * 2 + [slice(*rows), slice(*cols)]
            index[2 + axis] = slice(edge, edge + 1)
            damaged[tuple(index)] = 0
            changed = Window.exact(damaged, aligned).through(encoder).crop(box)
            assert max_error(changed, tiling._crop(e3, box)) > 1e-4


def test_window_detects_a_missing_halo():
    model = make_model()
    stages = network_stages(model)
    x = torch.rand(1, 3, 64, 64)
    win = Window.exact(x, ((16, 48), (16, 48))).through(stages.to_e1)
    assert win.valid == ((18, 46), (18, 46))  # two 3x3 convolutions inside the image
    with pytest.raises(RuntimeError, match="not exact"):
        win.crop(((17, 20), (20, 24)))
    with pytest.raises(RuntimeError, match="not aligned"):
        Window.exact(x, ((1, 31), (0, 32))).through(stages.to_e1 + stages.to_e2)


@pytest.mark.parametrize("chunk", [7, 100, 1 << 20])
def test_bottleneck_lean_path_matches_autograd_path(chunk):
    torch.manual_seed(0)
    block = BottleneckBlock(32, (3, 5)).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    block.chunk_tokens = chunk  # 7 tokens: bands of one row, halo rows recomputed
    z = torch.randn(2, 32, 13, 9)
    ref_out, ref_slot_map, ref_masks = block(z)
    with torch.no_grad():
        out, slot_map, masks = block(z)
        _, dropped, _ = block(z, keep_slot_map=False)
    assert dropped is None
    assert max_error(out, ref_out) <= TOL
    assert max_error(slot_map, ref_slot_map) <= TOL
    for got, want in zip(masks, ref_masks):
        assert max_error(got, want) <= TOL


def run_measured(model, x, budget):
    """infer_large within ``budget``: its plan, measured peak and output."""
    plan = plan_tiles(model, x.shape, max_memory=budget)
    result = {}
    measured = peak_allocated_bytes(lambda: result.update(
        image=infer_large(model, x, max_memory=budget, progress=False)))
    return plan, measured, result["image"]


def test_memory_budget_is_kept():
    """With a budget far below the whole-image forward's need, the tiled run's
    measured peak stays within it."""
    model = make_model()
    model.bottleneck.chunk_tokens = 256
    x = torch.rand(1, 3, 144, 200)
    budget = peak_allocated_bytes(lambda: whole(model, x)) // 2
    plan, measured, image = run_measured(model, x, budget)
    assert not plan.whole and plan.tile < 200 and plan.mode == "recompute"
    assert measured <= budget, f"peak {measured} > budget {budget} ({plan.describe()})"
    assert measured <= plan.estimate
    assert max_error(image, whole(model, x).image) <= TOL


def test_lean_mode_keeps_a_budget_the_bottleneck_alone_exceeds():
    """A budget below what the bottleneck needs while it holds its input: the
    "lean" mode recomputes that input and stays within the budget (measured)."""
    model = make_model()
    model.bottleneck.chunk_tokens = 128
    x = torch.rand(1, 3, 160, 128)
    fp = tiling._footprint(model, x.shape, torch.float32, torch.device("cpu"))
    budget = fp.copy + fp.bottleneck - 1
    plan, measured, image = run_measured(model, x, budget)
    assert plan.mode == "lean", plan.describe()
    assert measured <= budget, f"peak {measured} > budget {budget} ({plan.describe()})"
    assert max_error(image, whole(model, x).image) <= TOL


@pytest.mark.parametrize("level", [2, 3])
def test_memory_estimates_cover_measured_peaks(level):
    """The per-pixel and per-map constants of the plan (the bottleneck's for each
    backend) against the allocator, and not more than 40 % above it."""
    model = make_model(level)
    model.bottleneck.chunk_tokens = 256
    stages = network_stages(model)
    x = torch.rand(1, 3, 256, 256)
    e3 = torch.rand(1, 128, 64, 64)
    box = ((0, 256), (0, 256))

    def decoder_tile():
        e1 = Window.exact(x, box).through(stages.to_e1)
        e2 = e1.through(stages.to_e2)
        up = Window.exact(e3, ((0, 64), (0, 64))).through(stages.up_z)
        d2 = tiling._cat(up, e2, ((0, 128), (0, 128))).through(stages.to_d2)
        tiling._cat(d2.through(stages.up_d2), e1, box).through(stages.to_y)

    with torch.inference_mode():
        measured = {
            "encoder": peak_allocated_bytes(lambda: Window.exact(x, box).through(
                stages.to_e1 + stages.to_e2 + stages.to_e3)) / 256**2,
            "decoder": peak_allocated_bytes(decoder_tile) / 256**2,
            "whole": peak_allocated_bytes(lambda: model(x)) / 256**2,
        }
        estimated = {"encoder": tiling.ENCODER_BYTES_PER_PIXEL,
                     "decoder": tiling.DECODER_BYTES_PER_PIXEL,
                     "whole": tiling.WHOLE_BYTES_PER_PIXEL}
        for backend in es.available_backends():
            model.backend = backend
            measured[backend] = peak_allocated_bytes(
                lambda: model.bottleneck(e3, keep_slot_map=False)) + e3.numel() * 4
            estimated[backend] = tiling._footprint(model, x.shape, torch.float32,
                                                   torch.device("cpu")).bottleneck
    for name, value in measured.items():
        assert value <= estimated[name] <= 1.4 * value, (name, measured, estimated)


def test_plan_runs_whole_when_it_fits_and_refuses_what_cannot():
    model = make_model()
    assert plan_tiles(model, (1, 3, 64, 64), max_memory="1G").whole
    plan = plan_tiles(model, (1, 3, 64, 64), max_memory="1G", tile=10)
    assert not plan.whole and plan.tile == 12  # rounded up to the alignment of 4
    with pytest.raises(MemoryError, match="slot attention alone"):
        plan_tiles(model, (1, 3, 4000, 6000), max_memory="100M")
    assert "budget" in plan.describe()


def test_infer_large_argument_errors():
    model = make_model()
    with pytest.raises(ValueError, match="eval mode"):
        infer_large(model.train(), torch.rand(1, 3, 16, 16), tile=8)
    model.eval()
    with pytest.raises(ValueError, match="image batch"):
        infer_large(model, torch.rand(3, 16, 16), tile=8)
    with pytest.raises(ValueError, match="positive"):
        infer_large(model, torch.rand(1, 3, 16, 16), tile=0)


@pytest.mark.parametrize("text,expected", [("4G", 4 << 30), ("3.5GB", int(3.5 * 2**30)),
                                           ("800MiB", 800 << 20), ("1024", 1024), (77, 77)])
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "4X", "-1G", "0"])
def test_parse_memory_size_rejects(text):
    with pytest.raises(ValueError):
        parse_memory_size(text)


def test_cli_tiles_when_the_image_does_not_fit(tmp_path, capsys):
    from exposure_slot.cli import main
    from exposure_slot.images import read_image, save_image

    src = tmp_path / "scene.png"
    image = torch.rand(90, 70, 3)
    save_image(src, image.numpy(), format="PNG", bit_depth=16)
    args = [str(src), "--random-weights", "--save-masks", "--backend", "reference"]
    assert main(["enhance", *args, "-o", str(tmp_path / "whole")]) == 0
    assert "tiled" not in capsys.readouterr().out
    assert main(["enhance", *args, "-o", str(tmp_path / "tiled"), "--max-memory", "6M"]) == 0
    out = capsys.readouterr().out
    assert "too large for one pass within the memory budget; tiled:" in out
    for name in ("scene.png", "scene_masks.png"):
        a = read_image(tmp_path / "whole" / name).tensor
        b = read_image(tmp_path / "tiled" / name).tensor
        assert max_error(a, b) <= 1 / 65535
    assert main(["enhance", *args, "-o", str(tmp_path / "x"), "--max-memory", "lots"]) == 2
    assert "memory size" in capsys.readouterr().err
