"""Tests for eigenguard.models: registry, shapes on 28x28 and 32x32, stage hooks, sizes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eigenguard.errors import UnknownNameError
from eigenguard.models import (
    create_model,
    get_stage_names,
    is_model,
    list_models,
    register_model,
    stage_output_shapes,
)
from eigenguard.models import registry as registry_module

EXPECTED_MODELS = ["mobilenetv2", "preact_resnet18", "resnet18", "resnet34", "small_cnn", "vgg16_bn"]
INPUTS = {"gray28": (1, 28, 28), "rgb32": (3, 32, 32)}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, in_channels: int, width: int = 8, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, in_channels=in_channels, num_classes=num_classes, width=width)


# --- registry -----------------------------------------------------------------------


def test_all_expected_models_registered():
    assert list_models() == sorted(EXPECTED_MODELS)
    for name in EXPECTED_MODELS:
        assert is_model(name)
    assert not is_model("resnet1800")


def test_list_models_wildcard():
    assert list_models("resnet*") == ["resnet18", "resnet34"]
    assert list_models("*resnet18") == ["preact_resnet18", "resnet18"]
    assert list_models("nothing*") == []


def test_unknown_name_lists_known_and_suggests():
    with pytest.raises(UnknownNameError) as info:
        create_model("resnet19")
    message = str(info.value)
    for name in EXPECTED_MODELS:
        assert name in message
    assert "Did you mean" in message and "'resnet18'" in message
    assert isinstance(info.value, KeyError)  # callers catching KeyError still work


def test_register_overwrite_warns_and_replaces():
    name = "_test_tmp_model"
    try:

        @register_model(name)
        def first(**kwargs):
            return nn.Identity()

        assert is_model(name)
        with pytest.warns(UserWarning, match="already registered"):

            @register_model(name)
            def second(**kwargs):
                return nn.Flatten()

        assert isinstance(create_model(name), nn.Flatten)
    finally:
        registry_module._REGISTRY.pop(name, None)


def test_reregistering_same_factory_is_silent():
    factory = registry_module._REGISTRY["small_cnn"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_model("small_cnn")(factory)


def test_create_model_rejects_nonpositive_sizes():
    with pytest.raises(ValueError):
        create_model("small_cnn", width=0)
    with pytest.raises(ValueError):
        create_model("small_cnn", num_classes=0)


# --- shapes -------------------------------------------------------------------------


@pytest.mark.parametrize("input_kind", sorted(INPUTS))
@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_output_shape_and_finite(name, input_kind):
    c, h, w = INPUTS[input_kind]
    model = build(name, in_channels=c, num_classes=7)
    x = torch.randn(2, c, h, w)
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()


def test_preact_resnet18_width16_on_28x28():
    model = build("preact_resnet18", in_channels=1, width=16).eval()
    shapes = stage_output_shapes(model, torch.randn(1, 1, 28, 28))
    assert shapes == {
        "stem": (1, 16, 28, 28),
        "layer1": (1, 16, 28, 28),
        "layer2": (1, 32, 14, 14),
        "layer3": (1, 64, 7, 7),
        "layer4": (1, 128, 4, 4),
    }
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_vgg16_bn_works_on_28x28():
    # Five halvings of 28 would reach 0 with floor pooling; ceil-mode pools stop at 1.
    model = build("vgg16_bn", in_channels=1).eval()
    shapes = stage_output_shapes(model, torch.randn(2, 1, 28, 28))
    assert [s[2:] for s in shapes.values()] == [(14, 14), (7, 7), (4, 4), (2, 2), (1, 1)]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_any_in_channels():
    for name in EXPECTED_MODELS:
        model = build(name, in_channels=5).eval()
        assert model(torch.randn(1, 5, 30, 30)).shape == (1, 10)


def test_gradients_reach_first_layer():
    for name in EXPECTED_MODELS:
        model = build(name, in_channels=3)
        loss = model(torch.randn(2, 3, 32, 32)).sum()
        loss.backward()
        first = getattr(model, model.stage_names[0])
        grads = [p.grad for p in first.parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name


# --- stages -------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_stages_fire_in_order_with_4d_outputs(name):
    model = build(name, in_channels=1).eval()
    names = model.stage_names
    assert isinstance(names, tuple) and len(names) >= 3
    assert get_stage_names(model) == names
    children = dict(model.named_children())
    fired: list[tuple[str, tuple[int, ...]]] = []
    for stage in names:
        assert stage in children, stage
        children[stage].register_forward_hook(
            lambda _m, _i, out, stage=stage: fired.append((stage, tuple(out.shape)))
        )
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    assert [s for s, _ in fired] == list(names)
    for stage, shape in fired:
        assert len(shape) == 4 and shape[0] == 2 and min(shape[1:]) >= 1, (stage, shape)


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_classifier_is_final_linear(name):
    model = build(name, in_channels=3, num_classes=6)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == 6


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_wrapping_a_stage_keeps_outputs(name):
    model = build(name, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    for stage in model.stage_names:
        original = getattr(model, stage)
        setattr(model, stage, nn.Sequential(original, nn.Identity()))
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
        setattr(model, stage, original)


def test_inserted_layer_sees_stage_output():
    model = build("preact_resnet18", in_channels=1, width=16).eval()
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x * 0  # zeroing layer2's output must change the prediction path

    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
        model.layer2 = nn.Sequential(model.layer2, Probe())
        after = model(x)
    assert seen == [(1, 32, 14, 14)]
    assert not torch.equal(before, after)


def test_stage_helpers_reject_models_without_stages():
    with pytest.raises(AttributeError, match="stage_names"):
        get_stage_names(nn.Linear(2, 2))


# --- sizes and init -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("preact_resnet18", 11.17e6 * 0.99, 11.17e6 * 1.01),
        ("resnet18", 11.17e6 * 0.99, 11.17e6 * 1.01),
        ("resnet34", 21.28e6 * 0.99, 21.28e6 * 1.01),
        ("vgg16_bn", 14.7e6, 15.3e6),  # single linear head: 14,724,042
        ("mobilenetv2", 2.2e6, 2.3e6),  # standard width (stem 32): 2,236,682
    ],
)
def test_standard_parameter_counts(name, low, high):
    model = create_model(name, in_channels=3, num_classes=10)
    assert low <= n_params(model) <= high


def test_default_width_is_standard():
    assert n_params(create_model("resnet18")) == n_params(create_model("resnet18", width=64))
    assert n_params(create_model("mobilenetv2")) == n_params(create_model("mobilenetv2", width=32))


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_width_scales_channels(name):
    narrow = build(name, in_channels=3, width=16)
    wide = build(name, in_channels=3, width=64)
    assert n_params(narrow) < n_params(wide)
    first = getattr(narrow, narrow.stage_names[0])
    convs = [m for m in first.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 16


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_init_is_deterministic_under_seed(name):
    a, b = build(name, in_channels=3), build(name, in_channels=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        assert torch.equal(va, vb), ka


# --- learning -----------------------------------------------------------------------


def test_small_cnn_fits_random_labels():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    model = create_model("small_cnn", in_channels=3, num_classes=10, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9
