"""Loading the authors' checkpoints strictly, and exporting back to their layout.

The authors' key layout is rebuilt here from SPEC's names and shapes, independently
of exposure_slot.checkpoint, so a mapping bug cannot hide behind itself.
"""

import pytest
import torch

import exposure_slot as es
from exposure_slot import CheckpointError

C = 128
SLOTS = {2: (3, 7), 3: (3, 7, 10)}


def authors_layout(level: int) -> dict[str, tuple[int, ...]]:
    """Every key of a released level-``level`` state_dict with its shape (SPEC 1-4)."""
    keys = {}

    def conv(name, cout, cin, k, bias=True):
        keys[f"{name}.weight"] = (cout, cin, k, k)
        if bias:
            keys[f"{name}.bias"] = (cout,)

    def batchnorm(name, n):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{leaf}"] = (n,)
        keys[f"{name}.num_batches_tracked"] = ()

    def linear(name, bias=True):
        keys[f"{name}.weight"] = (C, C)
        if bias:
            keys[f"{name}.bias"] = (C,)

    def layernorm(name):
        keys[f"{name}.weight"] = (C,)
        keys[f"{name}.bias"] = (C,)

    conv("conv1_1", 32, 3, 3)
    conv("conv1_2", 32, 32, 3)
    batchnorm("batchnorm1", 32)
    conv("downsample1.body.0", 16, 32, 3, bias=False)
    conv("conv2_2", 64, 64, 3)
    batchnorm("batchnorm2", 64)
    conv("downsample2.body.0", 32, 64, 3, bias=False)
    conv("conv3_2", 128, 128, 3)
    batchnorm("batchnorm3", 128)
    conv("upsample1.body.0", 256, 128, 3, bias=False)
    conv("conv4_1", 64, 128, 3)
    conv("conv4_2", 64, 64, 3)
    conv("upsample2.body.0", 128, 64, 3, bias=False)
    conv("conv5_1", 32, 64, 3)
    conv("conv5_2", 32, 32, 3)
    conv("conv6", 3, 32, 1)

    attn = "TransformerBlock.blocks.0.0."
    keys[attn + "rescale"] = (1, 1, 1)
    for name in ("to_q", "to_k", "to_v"):
        linear(attn + name, bias=False)
    linear(attn + "proj")
    nesting = ("slot_list.0.", "sub_slot_attention.", "sub2_slot_attention.")
    prefix = attn
    for depth, k in enumerate(SLOTS[level]):
        prefix += nesting[depth]
        keys[prefix + "slots_mu"] = (1, k, C)
        keys[prefix + "slots_logsigma"] = (1, 1, C)
        keys[prefix + "prompts"] = (1, k, C)
        linear(prefix + "to_q")
        for leaf in ("weight_ih", "weight_hh"):
            keys[f"{prefix}gru.{leaf}"] = (3 * C, C)
        for leaf in ("bias_ih", "bias_hh"):
            keys[f"{prefix}gru.{leaf}"] = (3 * C,)
        linear(prefix + "mlp.0")
        linear(prefix + "mlp.2")
        for name in ("norm_k_inp", "norm_v_inp", "norm_slots", "norm_pre_ff"):
            layernorm(prefix + name)
        if depth > 0:
            linear(prefix + "to_k")
            linear(prefix + "to_v")
            layernorm(prefix + "norm_input")
    ff = "TransformerBlock.blocks.0.1."
    layernorm(ff + "norm")
    conv(ff + "fn.net.0", 4 * C, C, 1, bias=False)
    conv(ff + "fn.net.2", 4 * C, 1, 3, bias=False)
    conv(ff + "fn.net.4", C, 4 * C, 1, bias=False)

    conv("slot_decoder.upsample1.body.0", 256, 128, 3, bias=False)
    conv("slot_decoder.conv1", 64, 64, 3)
    conv("slot_decoder.conv2", 64, 64, 3)
    conv("slot_decoder.upsample2.body.0", 128, 64, 3, bias=False)
    conv("slot_decoder.conv3", 32, 32, 3)
    conv("slot_decoder.conv4", 16, 32, 3)
    conv("slot_decoder.conv5", 3, 16, 3)
    if level == 2:
        conv("conv_fusion", 128, 256, 3)
    return keys


def random_authors_state_dict(level: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in authors_layout(level).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.05
    return state


def test_spec_layout_equals_released_layout(golden):
    """The layout rebuilt from SPEC is exactly the released checkpoint's (same keys, shapes)."""
    released = golden["checkpoint"]["model"]
    assert {k: tuple(v.shape) for k, v in released.items()} == authors_layout(golden["level"])


@pytest.mark.parametrize("level", [2, 3])
def test_authors_layout_loads_strictly_and_exports_back(level):
    state = random_authors_state_dict(level)
    model = es.load_official({"model": state}, backend="reference")
    assert model.level == level and not model.training
    exported = es.export_official(model)["model"]
    assert set(exported) == set(state)
    for key, value in exported.items():
        assert value.shape == state[key].shape, key
    unused = {k for k in state if "slots_logsigma" in k or "conv_fusion" in k
              or ".sub_slot_attention.to_" in k or ".sub_slot_attention.norm_input" in k
              or ".sub2_slot_attention.to_" in k or ".sub2_slot_attention.norm_input" in k}
    for key in set(state) - unused:
        assert torch.equal(exported[key], state[key]), key
    # ... and the export loads again into the same network.
    again = es.load_official(exported, backend="reference")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_round_trip_through_a_file(tmp_path):
    model = es.ExposureSlot(level=3)
    path = tmp_path / "exported.pth"
    es.export_official(model, path)
    loaded = es.load_official(str(path))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_wrappers_prefix_paths_and_our_layout(tmp_path):
    state = random_authors_state_dict(2)
    reference = es.load_official(state).state_dict()
    module_prefixed = {"module." + k: v for k, v in state.items()}
    path = tmp_path / "MSEC_level2.pth"
    torch.save({"model": module_prefixed, "epoch": 10}, path)
    for src in (state, {"model": state}, module_prefixed, path, str(path), reference):
        loaded = es.load_official(src).state_dict()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_wrong_level_is_named():
    with pytest.raises(CheckpointError, match="level-3 model, but level=2"):
        es.load_official(random_authors_state_dict(3), level=2)


def test_truncated_checkpoint_names_missing_keys():
    state = random_authors_state_dict(3)
    del state["conv4_1.weight"]
    del state["TransformerBlock.blocks.0.0.slot_list.0.sub_slot_attention.gru.bias_hh"]
    with pytest.raises(CheckpointError) as err:
        es.load_official(state)
    message = str(err.value)
    assert "missing keys (2)" in message
    assert "conv4_1.weight" in message and "sub_slot_attention.gru.bias_hh" in message


def test_unexpected_and_misshaped_keys_are_named():
    state = random_authors_state_dict(2)
    state["extra_head.weight"] = torch.zeros(3)
    state["conv6.weight"] = torch.zeros(3, 32, 3, 3)
    state["TransformerBlock.blocks.0.0.slot_list.0.slots_logsigma"] = torch.zeros(1, 2, C)
    with pytest.raises(CheckpointError) as err:
        es.load_official(state)
    message = str(err.value)
    assert "unexpected keys (1): extra_head.weight" in message
    assert "conv6.weight: checkpoint [3, 32, 3, 3], level-2 network [3, 32, 1, 1]" in message
    assert "slots_logsigma: checkpoint [1, 2, 128], expected [1, 1, 128]" in message


def test_slot_count_mismatch_is_named():
    state = random_authors_state_dict(2)
    child = "TransformerBlock.blocks.0.0.slot_list.0.sub_slot_attention."
    state[child + "slots_mu"] = torch.zeros(1, 5, C)
    with pytest.raises(CheckpointError, match=r"sub_slot_attention.slots_mu: checkpoint \[1, 5, 128\]"):
        es.load_official(state)


def test_level3_conv_fusion_is_unexpected():
    state = random_authors_state_dict(3)
    state["conv_fusion.bias"] = torch.zeros(C)
    with pytest.raises(CheckpointError, match="unexpected keys.*conv_fusion.bias"):
        es.load_official(state)


@pytest.mark.parametrize("content, message", [
    (b"this is not a checkpoint", "not a readable PyTorch file"),
    (b"", "not a readable PyTorch file"),
])
def test_corrupt_file(tmp_path, content, message):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        es.load_official(path)


def test_not_a_state_dict_and_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        es.load_official(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not a state_dict"):
        es.load_official({"model": {"a": 1}})
    with pytest.raises(CheckpointError, match="not an Exposure-slot checkpoint of level 2 or 3"):
        es.load_official({"conv1_1.weight": torch.zeros(32, 3, 3, 3)})


def test_truncated_file(tmp_path):
    path = tmp_path / "full.pth"
    torch.save({"model": random_authors_state_dict(2)}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        es.load_official(cut)


def test_pickled_objects_are_refused_with_advice(tmp_path):
    import argparse
    path = tmp_path / "with_args.pth"
    torch.save({"model": random_authors_state_dict(2), "args": argparse.Namespace(lr=2e-4)}, path)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        es.load_official(path)
    checkpoint = torch.load(path, weights_only=False)  # what the message tells a user to do
    assert es.load_official(checkpoint).level == 2


def test_empty_file_names_the_error(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"not a readable PyTorch file \(EOFError"):
        es.load_official(path)
