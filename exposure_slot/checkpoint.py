"""The authors' checkpoint layout: key mapping, strict loading, export.

The released ``.pth`` files are ``{"model": state_dict}`` with the authors' module
names (``TransformerBlock.blocks.0.0.slot_list.0.sub_slot_attention.…``). Our
modules use shorter names; ``_KEY_PREFIXES`` is the one place that relates the two.
A key whose prefix is not listed keeps its name (``conv1_1.weight`` is the same in
both layouts).
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from typing import Mapping

import torch

from .network import SLOTS_OF_LEVEL, ExposureSlot


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not match the network."""


_ATTENTION = "TransformerBlock.blocks.0.0."
_FEED_FORWARD = "TransformerBlock.blocks.0.1."
# The authors nest each slot level inside its parent under these names.
_SLOT_LEVEL_NAMES = ("slot_list.0.", "sub_slot_attention.", "sub2_slot_attention.")

# (authors' prefix, our prefix), slot levels excluded (they depend on the level count).
_KEY_PREFIXES = (
    (_ATTENTION, "bottleneck."),
    (_FEED_FORWARD + "norm.", "bottleneck.norm."),
    (_FEED_FORWARD + "fn.net.0.", "bottleneck.ff.expand."),
    (_FEED_FORWARD + "fn.net.2.", "bottleneck.ff.depthwise."),
    (_FEED_FORWARD + "fn.net.4.", "bottleneck.ff.project."),
    ("batchnorm1.", "bn1."),
    ("batchnorm2.", "bn2."),
    ("batchnorm3.", "bn3."),
    ("downsample1.body.0.", "down1.conv."),
    ("downsample2.body.0.", "down2.conv."),
    ("upsample1.body.0.", "up1.conv."),
    ("upsample2.body.0.", "up2.conv."),
    ("slot_decoder.upsample1.body.0.", "slot_decoder.up1.conv."),
    ("slot_decoder.upsample2.body.0.", "slot_decoder.up2.conv."),
)


def _slot_level_prefixes(num_levels: int) -> list[str]:
    """The authors' prefix of each slot level, top first."""
    prefixes, prefix = [], _ATTENTION
    for name in _SLOT_LEVEL_NAMES[:num_levels]:
        prefix += name
        prefixes.append(prefix)
    return prefixes


def _prefix_table(level: int) -> list[tuple[str, str]]:
    levels = [(authors, f"bottleneck.slot_attention.levels.{depth}.")
              for depth, authors in enumerate(_slot_level_prefixes(len(SLOTS_OF_LEVEL[level])))]
    return levels + list(_KEY_PREFIXES)


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    """Replace the longest matching prefix (nested names share shorter ones)."""
    best = max((pair for pair in table if key.startswith(pair[0])), key=lambda p: len(p[0]), default=None)
    return key if best is None else best[1] + key[len(best[0]):]


def _unused_keys(level: int, dim: int = 128) -> dict[str, tuple[int, ...]]:
    """Keys of the released state_dicts that the released network never reads, with shapes."""
    unused: dict[str, tuple[int, ...]] = {}
    for depth, prefix in enumerate(_slot_level_prefixes(len(SLOTS_OF_LEVEL[level]))):
        unused[prefix + "slots_logsigma"] = (1, 1, dim)
        if depth > 0:
            for name in ("to_k", "to_v"):
                unused[f"{prefix}{name}.weight"] = (dim, dim)
                unused[f"{prefix}{name}.bias"] = (dim,)
            unused[prefix + "norm_input.weight"] = (dim,)
            unused[prefix + "norm_input.bias"] = (dim,)
    if level == 2:
        unused["conv_fusion.weight"] = (dim, 2 * dim, 3, 3)
        unused["conv_fusion.bias"] = (dim,)
    return unused


def detect_level(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The level (number of nested slot levels) of an authors'-layout state_dict."""
    prefixes = _slot_level_prefixes(len(_SLOT_LEVEL_NAMES))
    depth = sum(1 for prefix in prefixes if prefix + "slots_mu" in state_dict)
    if depth < 2:
        raise CheckpointError(
            "not an Exposure-slot checkpoint of level 2 or 3: no key "
            f"'{prefixes[1]}slots_mu' (found {len(state_dict)} keys, e.g. {_sample(state_dict)})")
    return depth


def _level_with(num_levels: int) -> int:
    """The model level whose slot-in-slot attention has ``num_levels`` nested levels."""
    for level, slots in SLOTS_OF_LEVEL.items():
        if len(slots) == num_levels:
            return level
    raise CheckpointError(f"exposure-slot state_dict with {num_levels} slot levels; expected 1 to 3")


def _detect_our_level(state_dict: Mapping[str, torch.Tensor]) -> int:
    depth = 0
    while f"bottleneck.slot_attention.levels.{depth}.slots_mu" in state_dict:
        depth += 1
    return _level_with(depth)


def _sample(keys, count: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


def read_state_dict(src) -> tuple[dict[str, torch.Tensor], str]:
    """A state_dict and a name for messages from a path, a ``{"model": ...}`` wrapper or
    a bare state_dict; a DataParallel ``module.`` prefix is removed."""
    name = "state_dict"
    if isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        if not os.path.isfile(name):
            raise CheckpointError(f"checkpoint {name!r} does not exist or is not a file")
        try:
            src = torch.load(name, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types for damaged files
            if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
                raise CheckpointError(
                    f"checkpoint {name!r} holds Python objects other than tensors and plain "
                    "containers; if you trust it, load it with torch.load(path, "
                    "weights_only=False) and pass its state_dict instead") from None
            detail = f"{type(err).__name__}: {err}"[:200]
            raise CheckpointError(f"checkpoint {name!r} is not a readable PyTorch file ({detail})") from None
    if isinstance(src, Mapping) and "model" in src and isinstance(src["model"], Mapping):
        src = src["model"]
    if not isinstance(src, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in src.items()):
        raise CheckpointError(f"{name} is not a state_dict (a mapping of names to tensors), "
                              "nor a dict holding one under 'model'")
    state = dict(src)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, name


def _match(state_dict, level, name, table, unused) -> OrderedDict:
    """Rename ``state_dict`` into our layout with ``table``, strictly: every key is used
    or listed in ``unused``; otherwise one error names all that does not fit."""
    with torch.device("meta"):
        expected = ExposureSlot(level=level, backend="reference").state_dict()
    ours, seen, unexpected, misshaped = OrderedDict(), set(), [], []
    for key, value in state_dict.items():
        if key in unused:
            if tuple(value.shape) != unused[key]:
                misshaped.append(f"{key}: checkpoint {list(value.shape)}, expected {list(unused[key])}")
            continue
        target = _rename(key, table)
        if target not in expected:
            unexpected.append(key)
            continue
        seen.add(target)
        if value.shape != expected[target].shape:
            misshaped.append(f"{key}: checkpoint {list(value.shape)}, "
                             f"level-{level} network {list(expected[target].shape)}")
        else:
            ours[target] = value
    inverse = [(o, a) for a, o in table]
    missing = [_rename(k, inverse) for k in expected if k not in seen]
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {name} does not match the level-{level} Exposure-slot network:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("keys with the wrong shape", misshaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + "; ".join(keys[:12])
                             + ("; ..." if len(keys) > 12 else ""))
        raise CheckpointError("\n".join(lines))
    return ours


def from_official_state_dict(state_dict: Mapping[str, torch.Tensor], level: int,
                             name: str = "state_dict") -> OrderedDict:
    """Our state_dict from an authors'-layout one, strictly: every key used or known unused."""
    return _match(state_dict, level, name, _prefix_table(level), _unused_keys(level))


def from_official_slot_attention_state(state_dict: Mapping[str, torch.Tensor],
                                       num_levels: int) -> OrderedDict:
    """A ``SlotInSlotAttention`` state_dict from the authors' top slot module's own
    state_dict (their names without ``TransformerBlock.blocks.0.0.slot_list.0.``)."""
    level = _level_with(num_levels)
    top = _slot_level_prefixes(1)[0]
    unused = _unused_keys(level)
    table = _prefix_table(level)
    ours = OrderedDict()
    for key, value in state_dict.items():
        if top + key not in unused:
            ours[_rename(top + key, table).removeprefix("bottleneck.slot_attention.")] = value
    return ours


def to_official_state_dict(model: ExposureSlot) -> OrderedDict:
    """The model's weights in the authors' layout, loadable by their code. The keys
    their network never reads are filled with zeros (their values change nothing)."""
    inverse = [(ours, authors) for authors, ours in _prefix_table(model.level)]
    state = OrderedDict((_rename(k, inverse), v.detach().clone())
                        for k, v in model.state_dict().items())
    dtype = model.conv1_1.weight.dtype
    for key, shape in _unused_keys(model.level, model.bottleneck.norm.normalized_shape[0]).items():
        state[key] = torch.zeros(shape, dtype=dtype)
    return state


def load_official(src, backend: str = "auto", level: int | None = None) -> ExposureSlot:
    """An ``ExposureSlot`` in eval mode from the authors' checkpoint.

    ``src``: a path, a ``{"model": state_dict}`` dict or a bare state_dict, in the
    authors' layout (or ours); a ``module.`` prefix is accepted. The level is read
    from the keys; passing ``level`` checks it. Raises ``CheckpointError`` naming the
    missing, unexpected and mis-shaped keys if anything does not fit.
    """
    state, name = read_state_dict(src)
    ours_layout = any(k.startswith("bottleneck.") for k in state)
    found = _detect_our_level(state) if ours_layout else detect_level(state)
    if level is not None and level != found:
        raise CheckpointError(f"checkpoint {name} is a level-{found} model, but level={level} was asked for")
    if ours_layout:
        weights = _match(state, found, name, table=[], unused={})
    else:
        weights = from_official_state_dict(state, found, name)
    model = ExposureSlot(level=found, backend=backend)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def export_official(model: ExposureSlot, path=None) -> dict:
    """``{"model": state_dict}`` in the authors' layout; saved to ``path`` if given."""
    checkpoint = {"model": to_official_state_dict(model)}
    if path is not None:
        torch.save(checkpoint, path)
    return checkpoint
