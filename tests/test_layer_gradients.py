"""Gradients of the filter: the exact mode against finite differences, and both modes always finite."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eigenguard.layer import EigenGuard, spectral_filter


def separated(b, d, seed=0):
    """Features whose singular values are far apart, where the derivative is well defined."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(b, b, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, b, generator=g, dtype=torch.float64))
    sigma = torch.linspace(10, 1, b, dtype=torch.float64)
    return (u * sigma) @ v.T


@pytest.mark.parametrize("scale", ["kth", "mean"])
@pytest.mark.parametrize("tail_scale", [1e-3, 0.5])
def test_full_gradient_matches_finite_differences(scale, tail_scale):
    x = separated(6, 9).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f: spectral_filter(f, 3, tail_scale=tail_scale, scale=scale, grad="full"), (x,),
        eps=1e-6, atol=1e-5, rtol=1e-4)


def test_full_gradient_equals_autograd_through_plain_eigh_on_separated_spectra():
    x = separated(8, 20, seed=3).requires_grad_()
    upstream = torch.randn(8, 20, dtype=torch.float64)
    (ours,) = torch.autograd.grad(spectral_filter(x, 4, grad="full"), x, upstream)
    # the same function written with torch.linalg.svd, differentiated by PyTorch itself
    y = x.detach().clone().requires_grad_()
    u, s, vh = torch.linalg.svd(y, full_matrices=False)
    new = torch.cat([s[3].expand(4), s[4:] * 1e-3])
    (theirs,) = torch.autograd.grad((u * new) @ vh, y, upstream)
    assert torch.allclose(ours, theirs, atol=1e-8)


def test_detach_and_full_give_the_same_forward_values():
    x = torch.randn(16, 40, dtype=torch.float64)
    assert torch.allclose(spectral_filter(x, 5, grad="full"), spectral_filter(x, 5), atol=1e-12)
    with pytest.raises(ValueError, match="fast path"):
        spectral_filter(x, 5, grad="full", method="svd")
    with pytest.raises(ValueError, match="grad"):
        EigenGuard(grad="sometimes")


STRUCTURES = ("random", "duplicated", "zeros", "rank_one", "rank_deficient", "one_row_zero")


def build(structure, b, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    if structure == "duplicated":
        x = x[:1].repeat(b, 1) if b % 2 else torch.cat([x[: b // 2]] * 2)
    elif structure == "zeros":
        x = torch.zeros(b, d, dtype=torch.float64)
    elif structure == "rank_one":
        x = torch.randn(b, 1, generator=g, dtype=torch.float64) @ x[:1]
    elif structure == "rank_deficient":
        x = torch.randn(b, 2, generator=g, dtype=torch.float64) @ torch.randn(
            2, d, generator=g, dtype=torch.float64)
    elif structure == "one_row_zero":
        x[0] = 0
    return x * scale


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structure=st.sampled_from(STRUCTURES), b=st.integers(1, 24), d=st.integers(1, 40),
       k=st.integers(1, 40), scale=st.sampled_from([1e-30, 1e-8, 1.0, 1e8, 1e30]),
       grad=st.sampled_from(["detach", "full"]), dtype=st.sampled_from([torch.float32,
                                                                        torch.float64]),
       seed=st.integers(0, 2**16))
def test_outputs_and_gradients_are_always_finite(structure, b, d, k, scale, grad, dtype, seed):
    x = build(structure, b, d, scale, seed)
    if dtype == torch.float32:
        x = x.clamp(-1e30, 1e30)
    x = x.to(dtype).requires_grad_()
    out = spectral_filter(x, k, grad=grad)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    upstream = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    (gradient,) = torch.autograd.grad(out, x, upstream)
    assert torch.isfinite(gradient).all()
    if b == 1 and structure != "zeros":  # a batch of one passes unchanged, in both modes
        assert torch.allclose(out, x, rtol=1e-5, atol=0)


def test_layer_trains_with_full_gradient_on_a_degenerate_batch():
    layer = EigenGuard(k=4, grad="full").train()
    x = torch.ones(8, 12, requires_grad=True)  # every row equal: all but one eigenvalue are zero
    layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
