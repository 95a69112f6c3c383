"""The STN model: the reference architecture, other input shapes, identity init, and learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stn_deploy.train.model import STNConfig, build_model

REFERENCE_MODULES = ["conv1", "conv2", "conv2_drop", "fc1", "fc2", "localization", "fc_loc"]


def test_reference_model_lists_the_reference_modules():
    model = build_model()
    text = repr(model)
    assert [name for name, _ in model.named_children()] == REFERENCE_MODULES
    assert "(conv1): Conv2d(3, 16, kernel_size=(5, 5), stride=(1, 1))" in text
    assert "(conv2): Conv2d(16, 32, kernel_size=(5, 5), stride=(1, 1))" in text
    assert "(conv2_drop): Dropout2d(p=0.5, inplace=False)" in text
    assert "(fc1): Linear(in_features=800, out_features=1024, bias=True)" in text
    assert "(fc2): Linear(in_features=1024, out_features=10, bias=True)" in text
    assert "Linear(in_features=2048, out_features=256, bias=True)" in text
    assert "Linear(in_features=256, out_features=6, bias=True)" in text


@pytest.mark.parametrize(
    ("config", "fc1_in", "loc_in"),
    [
        (STNConfig(), 800, 2048),
        (STNConfig(in_channels=1, image_size=28), 512, 128 * 3 * 3),
        (STNConfig(in_channels=3, image_size=48, num_classes=5), 32 * 9 * 9, 128 * 8 * 8),
    ],
)
def test_shapes_for_several_configs(config, fc1_in, loc_in):
    model = build_model(config).eval()
    assert model.fc1.in_features == fc1_in == config.classifier_features
    assert model.fc_loc[0].in_features == loc_in == config.localization_features
    x = torch.randn(4, config.in_channels, config.image_size, config.image_size)
    log_probs = model(x)
    assert log_probs.shape == (4, config.num_classes)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(4))
    warped, theta = model.transform(x)
    assert warped.shape == x.shape and theta.shape == (4, 2, 3)


def test_too_small_image_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        STNConfig(image_size=12)


def test_identity_init_makes_the_warp_the_identity():
    torch.manual_seed(0)
    model = build_model().eval()
    x = torch.rand(3, 3, 32, 32)
    warped, theta = model.transform(x)
    torch.testing.assert_close(theta, torch.eye(2, 3).expand(3, 2, 3))
    # align_corners=False with the identity θ samples every pixel centre exactly
    torch.testing.assert_close(warped, x, atol=1e-5, rtol=0)


def test_plain_cnn_has_no_transformer_and_passes_images_through():
    model = build_model(arch="cnn").eval()
    assert model.localization is None and model.fc_loc is None
    assert [name for name, _ in model.named_children()] == ["conv1", "conv2", "conv2_drop", "fc1", "fc2"]
    x = torch.rand(2, 3, 32, 32)
    warped, theta = model.transform(x)
    assert warped is x
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("arch", ["stn", "cnn"])
def test_a_few_optimizer_steps_lower_the_loss(arch):
    torch.manual_seed(0)
    model = build_model(arch=arch, dropout=0.0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = F.nll_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_localization_receives_gradient():
    model = build_model()
    loss = F.nll_loss(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    # zero-initialised θ weights still get a gradient through grid_sample
    assert model.fc_loc[-1].weight.grad.abs().sum() > 0
    assert model.localization[0].weight.grad is None or model.localization[0].weight.grad.abs().sum() == 0
