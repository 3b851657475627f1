"""Models shared by the inference and engine tests."""

import torch

import exposure_slot as es


def random_model(level=2, seed=0, size_policy="pad"):
    """A random model with non-trivial BatchNorm (statistics, scale and shift) and
    rescale, so that a fold that drops any of them shows."""
    torch.manual_seed(seed)
    model = es.ExposureSlot(level=level, backend="reference", size_policy=size_policy).eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.3, 3.0)
            bn.weight.normal_(1, 0.4)
            bn.bias.normal_(0, 0.4)
        model.bottleneck.rescale.fill_(1.7)
        model.conv6.weight.mul_(4)  # a correction of order 1, not a near-identity
    return model
