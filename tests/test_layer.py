"""The spectral filter against its SVD definition, its edge cases, and guard() insertion."""
import copy
import math

import pytest
import torch
from torch import nn

from eigenguard.layer import EigenGuard, filter_weights, find_guards, guard, spectral_filter


def svd_definition(features, k, tail_scale=1e-3, scale="kth", rank_rtol=1e-5):
    """F' = U Σ' Vᵀ straight from the SVD of F (the slow reference); F itself without a tail."""
    flat = features.reshape(features.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    rank = int((s > s[0] * rank_rtol).sum()) if s.numel() else 0
    if rank <= k:  # k or fewer nonzero singular values: nothing to damp, the batch passes
        return features.double()
    new = s * tail_scale
    new[:k] = {"kth": s[k - 1], "mean": s[:k].mean(), "zero": 0.0}[scale]
    return ((u * new) @ vh).reshape(features.shape)


def low_rank(b, d, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, rank, generator=g) @ torch.randn(rank, d, generator=g)


@pytest.mark.parametrize("b,d,k", [(128, 300, 32), (64, 1000, 10), (20, 15, 4), (128, 6272, 32)])
@pytest.mark.parametrize("scale", ["kth", "mean", "zero"])
def test_matches_svd_definition_on_random_features(b, d, k, scale):
    x = torch.randn(b, d, generator=torch.Generator().manual_seed(b + d), dtype=torch.float64)
    out = spectral_filter(x, k, scale=scale)
    ref = svd_definition(x, k, scale=scale)
    assert torch.allclose(out, ref, rtol=1e-8, atol=1e-9 * ref.abs().max())


@pytest.mark.parametrize("tail_scale", [0.0, 1e-3, 0.1, 1.0])
def test_matches_svd_definition_on_rank_deficient_features(tail_scale):
    x = low_rank(100, 500, rank=7)
    out = spectral_filter(x, 4, tail_scale=tail_scale)  # rank 7 > k: four equalised, three damped
    ref = svd_definition(x, 4, tail_scale=tail_scale)
    assert torch.allclose(out, ref.float(), atol=1e-4 * ref.abs().max().item())
    s, s_out = torch.linalg.svdvals(x.double()), torch.linalg.svdvals(out.double())
    assert torch.allclose(s_out[:7], torch.cat([s[3].expand(4), s[4:7] * tail_scale]), rtol=1e-4,
                          atol=1e-6 * s[0].item())  # float32 rounding of the output
    # rank 7 <= k = 16: no tail, the batch passes unchanged (it is not whitened)
    assert torch.allclose(spectral_filter(x, 16, tail_scale=tail_scale), x, rtol=1e-6, atol=0)


def test_conv_features_keep_shape_and_dtype():
    x = torch.randn(16, 4, 5, 5)
    out = spectral_filter(x, 3)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.allclose(out, svd_definition(x, 3).float(), atol=1e-4)


def test_top_k_share_one_scale_and_tail_is_damped():
    x = torch.randn(64, 200, dtype=torch.float64)
    s = torch.linalg.svdvals(x)
    s_out = torch.linalg.svdvals(spectral_filter(x, 8, tail_scale=1e-3))
    assert torch.allclose(s_out[:8], s[7].expand(8), rtol=1e-9)
    assert torch.allclose(s_out[8:], s[8:] * 1e-3, rtol=1e-6)


def test_zero_scale_removes_the_top_k_directions():
    """The source's ablation: the top k singular values become 0, the tail is damped as usual."""
    x = torch.randn(64, 200, dtype=torch.float64)
    s = torch.linalg.svdvals(x)
    s_out = torch.linalg.svdvals(spectral_filter(x, 8, tail_scale=0.1, scale="zero"))
    assert torch.allclose(s_out[:56], s[8:] * 0.1, rtol=1e-6)
    assert s_out[56:].max() < 1e-9 * s[0]


def test_batch_of_one_passes_unchanged():
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(spectral_filter(x, 32), x, rtol=1e-6, atol=0)


@pytest.mark.parametrize("b", [2, 5, 31, 32])
@pytest.mark.parametrize("method,grad", [("gram", "detach"), ("gram", "full"), ("svd", "detach")])
def test_batch_of_k_or_fewer_passes_unchanged_and_is_never_whitened(b, method, grad):
    x = torch.randn(b, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(b))
    x = x * torch.linspace(1, 4, b, dtype=torch.float64).unsqueeze(1)  # rows of unequal size
    out = spectral_filter(x, 32, method=method, grad=grad)
    assert torch.allclose(out, x, rtol=1e-12, atol=0)
    s, s_out = torch.linalg.svdvals(x), torch.linalg.svdvals(out)
    assert s[0] / s[-1] > 2  # the input's spectrum is spread ...
    assert torch.allclose(s_out, s, rtol=1e-12)  # ... and stays spread: no unit-scale whitening
    assert torch.equal(filter_weights(x @ x.T, 32), torch.eye(b, dtype=torch.float64))


def test_batch_of_k_plus_one_is_filtered():
    x = torch.randn(33, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(x)
    s_out = torch.linalg.svdvals(spectral_filter(x, 32))
    assert torch.allclose(s_out[:32], s[31].expand(32), rtol=1e-9)  # equalised to σ_32
    assert torch.allclose(s_out[32], s[32] * 1e-3, rtol=1e-6)  # the one-direction tail, damped


def test_duplicated_rows_and_zero_input():
    row = torch.randn(1, 50)
    dup = row.repeat(10, 1)  # rank 1: a single direction, forced to its own scale = unchanged
    assert torch.allclose(spectral_filter(dup, 4), dup, atol=1e-5)
    zeros = torch.zeros(8, 50)
    out = spectral_filter(zeros, 4)
    assert torch.equal(out, zeros)


def test_partial_last_batch_is_filtered_on_its_own():
    x = torch.randn(37, 64, dtype=torch.float64)
    assert torch.allclose(spectral_filter(x, 32), svd_definition(x, 32), atol=1e-10)


def test_filter_weights_is_batched():
    x = torch.randn(3, 10, 40, dtype=torch.float64)
    x[1] = low_rank(10, 40, rank=3).double()  # rank 3 <= k: identity within the same call
    grams = x @ x.transpose(1, 2)
    weights = filter_weights(grams, 4)
    assert torch.equal(weights[1], torch.eye(10, dtype=torch.float64))
    for i in range(3):
        assert torch.allclose(weights[i] @ x[i], svd_definition(x[i], 4), atol=1e-10)
    assert not torch.allclose(weights[0] @ x[0], x[0], atol=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_dtype_equals_input_dtype(dtype):
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = spectral_filter(x, 4)
    assert out.dtype == dtype
    ref = svd_definition(x.double(), 4)  # the definition on the same (rounded) input
    error = (out.double() - ref).abs()
    if dtype == torch.float64:  # computed in float64 throughout
        assert (error <= 1e-10 * ref.abs().max()).all()
    else:  # computed in float32, then rounded once to the input dtype: half an ulp, eps/2
        rounding = torch.finfo(dtype).eps / 2 * ref.abs()
        assert (error <= rounding + 1e-5 * x.double().abs().max()).all()


def test_gradient_flows_through_features_with_constant_filter():
    x = torch.randn(12, 30, dtype=torch.float64, requires_grad=True)
    out = spectral_filter(x, 3)
    weights = filter_weights(x.detach() @ x.detach().T, 3)
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert torch.allclose(grad, weights.T @ upstream)


@pytest.mark.parametrize("bad_k", [0, -3, 2.5, "8", True, None])
def test_bad_k_is_refused_with_a_clear_message(bad_k):
    with pytest.raises((ValueError, TypeError), match="k must be"):
        EigenGuard(k=bad_k)
    with pytest.raises((ValueError, TypeError), match="k must be"):
        spectral_filter(torch.randn(4, 4), bad_k)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="tail_scale"):
        EigenGuard(tail_scale=-1)
    with pytest.raises(ValueError, match="tail_scale"):
        EigenGuard(tail_scale=float("nan"))
    with pytest.raises(ValueError, match="scale"):
        EigenGuard(scale="median")
    with pytest.raises(ValueError, match="eval_mode"):
        EigenGuard(eval_mode="sometimes")


def test_nan_features_raise_a_clear_error():
    x = torch.randn(8, 10)
    x[3, 2] = math.nan
    with pytest.raises(FloatingPointError, match="non-finite"):
        spectral_filter(x, 2)


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="batch"):
        spectral_filter(torch.randn(10), 2)


def test_eval_modes():
    layer = EigenGuard(k=2, eval_mode="identity").eval()
    x = torch.randn(8, 20)
    assert torch.equal(layer(x), x)
    layer.train()
    assert not torch.allclose(layer(x), x)
    batch_layer = EigenGuard(k=2, eval_mode="batch").eval()
    assert torch.allclose(batch_layer(x), svd_definition(x, 2).float(), atol=1e-5)
    assert torch.equal(batch_layer(x[:2]), x[:2])  # B <= k: unchanged, even in eval
    assert "k=2" in repr(batch_layer) and "eval_mode='batch'" in repr(batch_layer)
    default = EigenGuard(k=2)  # the default is batch-independent: each row alone
    assert "eval_mode='running'" in repr(default)
    default.train()(x)
    default.eval()
    assert torch.allclose(default(x)[:1], default(x[:1]), atol=1e-6)
    with pytest.raises(ValueError, match="eval_mode='batch' or eval_mode='identity'"):
        EigenGuard(k=2, track_running_stats=False)


class TwoStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).flatten(1))


def test_guard_inserts_after_a_named_module_and_keeps_state_dict_names():
    torch.manual_seed(0)
    model = TwoStage()
    plain = copy.deepcopy(model)
    keys = set(model.state_dict())
    layer = guard(model, after="stem", k=2)
    assert set(model.state_dict()) - keys == {"stem_eigenguard." + name for name in
                                              ("running_basis", "running_power",
                                               "num_batches_tracked")}
    assert find_guards(model) == [("stem_eigenguard", layer)]
    x = torch.randn(10, 1, 6, 6)
    expected = plain.head(plain.body(spectral_filter(plain.stem(x), 2)).flatten(1))
    assert torch.allclose(model(x), expected, atol=1e-5)
    # the guarded model reloads an unguarded checkpoint and deep-copies with its own layer
    model.load_state_dict(plain.state_dict())
    clone = copy.deepcopy(model)
    assert torch.allclose(clone(x), model(x))
    assert find_guards(clone)[0][1] is not layer


def test_guard_accepts_dotted_paths_and_several_layers():
    model = TwoStage()
    guard(model, after="stem", k=2)
    guard(model, after="body.1", k=3)
    assert {name for name, _ in find_guards(model)} == {"stem_eigenguard", "body.1_eigenguard"}
    with pytest.raises(ValueError, match="already"):
        guard(model, after="stem")
    with pytest.raises(ValueError, match="no such module"):
        guard(model, after="layer9")


# --- running statistics and the batch-independent eval mode ---------------------------------

from eigenguard.layer import running_filter, update_running_subspace  # noqa: E402


def test_running_subspace_is_the_moving_average_of_the_second_moment():
    g = torch.Generator().manual_seed(0)
    d, momentum = 12, 0.3
    basis, power = torch.zeros(0), torch.zeros(0)
    exact = None
    for step in range(5):
        batch = torch.randn(7, d, generator=g, dtype=torch.float64)
        second = batch.T @ batch / 7
        exact = second if exact is None else (1 - momentum) * exact + momentum * second
        basis, power = update_running_subspace(basis, power, batch, momentum, rank=d)
    estimate = (basis.double() * power.double()) @ basis.double().T
    assert basis.shape == (d, d) and power.shape == (d,)
    assert torch.allclose(estimate, exact, atol=1e-5)


@pytest.mark.parametrize("stats_every", [1, 2, 3])
def test_training_folds_every_nth_batch_into_the_running_statistics(stats_every):
    torch.manual_seed(0)
    layer = EigenGuard(k=4, sketch_rank=8, stats_every=stats_every).train()
    batches = [torch.randn(16, 3, 5, 5) for _ in range(7)]
    basis, power = torch.zeros(0), torch.zeros(0)
    for index, batch in enumerate(batches):
        out = layer(batch)
        assert torch.equal(out, spectral_filter(batch, 4))  # training does not depend on it
        if index % stats_every == 0:  # the first batch, then every stats_every-th
            basis, power = update_running_subspace(basis, power, batch.flatten(1), 0.1, rank=8)
    # the update reuses the filter's Gram matrix: same result as the standalone update
    assert torch.allclose(layer.running_basis, basis, atol=1e-5)
    assert torch.allclose(layer.running_power, power, rtol=1e-5)
    assert layer.num_batches_tracked.item() == len(range(0, 7, stats_every))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_stats_every_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="stats_every must be an integer >= 1"):
        EigenGuard(stats_every=bad)


def test_running_subspace_keeps_the_top_r_directions_in_o_of_r_d_memory():
    g = torch.Generator().manual_seed(1)
    strong = torch.randn(3, 500, generator=g, dtype=torch.float64)  # a rank-3 dominant part
    basis, power = torch.zeros(0), torch.zeros(0)
    for _ in range(4):
        batch = torch.randn(32, 3, generator=g, dtype=torch.float64) * 10 @ strong \
            + 0.01 * torch.randn(32, 500, generator=g, dtype=torch.float64)
        basis, power = update_running_subspace(basis, power, batch, 0.5, rank=6)
    assert basis.shape == (500, 6)
    _, _, vh = torch.linalg.svd(strong, full_matrices=False)
    overlap = torch.linalg.svdvals(vh @ basis[:, :3].double())
    assert overlap.min() > 0.999  # the dominant subspace is found


@pytest.mark.parametrize("scale", ["kth", "zero"])
def test_running_filter_from_one_batch_equals_the_batch_filter_on_that_batch(scale):
    x = torch.randn(40, 90, dtype=torch.float64)
    basis, power = update_running_subspace(torch.zeros(0), torch.zeros(0), x, 1.0, rank=16)
    out = running_filter(x, basis.double(), power, k=8, scale=scale)
    assert torch.allclose(out, spectral_filter(x, 8, scale=scale), atol=1e-4)


def test_running_mode_is_batch_independent_and_travels_in_the_state_dict(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = TwoStage()
    layer = guard(model, after="stem", k=3, eval_mode="running", stats_every=1)
    model.train()
    for _ in range(3):
        model(torch.randn(20, 1, 6, 6))
    assert layer.num_batches_tracked.item() == 3
    assert layer.running_basis.shape == (4 * 36, 6) and layer.running_power.shape == (6,)
    model.eval()
    x = torch.randn(10, 1, 6, 6)
    together = model(x)
    alone = torch.cat([model(x[i:i + 1]) for i in range(10)])
    assert torch.allclose(together, alone, atol=1e-5)
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    fresh = TwoStage()
    guard(fresh, after="stem", k=3, eval_mode="running")
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert torch.allclose(fresh.eval()(x), together)


def test_running_mode_without_statistics_says_how_to_get_them():
    layer = EigenGuard(k=2, eval_mode="running").eval()
    with pytest.raises(RuntimeError, match="track_running_stats"):
        layer(torch.randn(4, 8))
    with pytest.raises(ValueError, match="track_running_stats"):
        EigenGuard(eval_mode="running", track_running_stats=False)
    with pytest.raises(ValueError, match="sketch_rank"):
        EigenGuard(k=8, sketch_rank=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_blocked_gram_is_the_float64_product(dtype):
    from eigenguard.layer import GRAM_BLOCK_BYTES, exact_gram
    rows = torch.randn(16, 3 * GRAM_BLOCK_BYTES // (8 * 16) + 5).to(dtype)  # 3 blocks and a rest
    exact = rows.to(torch.float64)
    # an independent float64 reference: the columns summed in another order
    reference = sum(exact[:, i::7] @ exact[:, i::7].T for i in range(7))
    gram = exact_gram(rows)
    assert gram.dtype == torch.float64
    assert torch.allclose(gram, reference, rtol=1e-13, atol=1e-10)
    wide = spectral_filter(torch.cat([rows.float()] * 2), 4)  # B = 32, still several blocks
    assert torch.allclose(wide, svd_definition(torch.cat([rows.float()] * 2), 4).float(),
                          atol=1e-4)


@pytest.mark.parametrize("scale", ["kth", "mean", "zero"])
def test_reference_svd_path_equals_the_fast_path(scale):
    x = torch.cat([low_rank(30, 200, rank=5), torch.randn(50, 200)])
    fast = spectral_filter(x, 16, scale=scale)
    reference = spectral_filter(x, 16, scale=scale, method="svd")
    assert torch.allclose(fast, reference, atol=1e-4)
    assert torch.allclose(reference, svd_definition(x, 16, scale=scale).float(), atol=1e-4)
    with pytest.raises(ValueError, match="method"):
        spectral_filter(x, 4, method="qr")


def test_token_features_are_filtered_per_sample_across_all_tokens():
    x = torch.randn(24, 5, 16, dtype=torch.float64)  # (B, N, D)
    out = spectral_filter(x, 4)
    assert out.shape == x.shape
    assert torch.allclose(out, svd_definition(x, 4), atol=1e-10)
    layer = EigenGuard(k=4, eval_mode="running").train()
    layer(x.float())
    assert layer.running_basis.shape == (80, 8)


def test_nan_features_are_refused_on_every_path():
    x = torch.randn(8, 10)
    x[1, 1] = math.nan
    with pytest.raises(FloatingPointError, match="non-finite"):
        spectral_filter(x, 2, method="svd")
    with pytest.raises(FloatingPointError, match="non-finite"):
        EigenGuard(k=2).train()(x)


def test_guard_inside_sequential_and_module_list_containers():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    plain = copy.deepcopy(seq)
    guard(seq, after="1", k=2)
    assert list(seq._modules) == ["0", "1", "1_eigenguard", "2"]
    x = torch.randn(10, 6)
    assert torch.allclose(seq(x), plain[2](spectral_filter(plain[1](plain[0](x)), 2)), atol=1e-5)

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = Blocks()
    reference = copy.deepcopy(model)
    guard(model, after="blocks.0", k=2)
    assert len(model.blocks) == 2 and hasattr(model, "blocks_0_eigenguard")
    expected = reference.blocks[1](spectral_filter(reference.blocks[0](x), 2))
    assert torch.allclose(model(x), expected, atol=1e-5)


# --- batches without a tail in the module, the rank threshold of the running statistics -----


def test_training_batch_of_k_or_fewer_uses_the_running_filter_or_passes_unchanged():
    torch.manual_seed(0)
    small = torch.randn(3, 3, 5, 5)  # B = 3 <= k = 4
    fresh = EigenGuard(k=4, stats_every=1).train()
    assert torch.equal(fresh(small), small)  # no running statistics yet: unchanged
    assert fresh.num_batches_tracked.item() == 1  # still folded in
    layer = EigenGuard(k=4, stats_every=1).train()
    layer(torch.randn(32, 3, 5, 5))
    basis, power = layer.running_basis.clone(), layer.running_power.clone()
    out = layer(small)
    expected = running_filter(small, basis, power, 4)  # the statistics before this batch
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, small, atol=0.1)  # it is filtered ...
    s_out = torch.linalg.svdvals(out.flatten(1).double())
    assert s_out[0] / s_out[-1] > 1.5  # ... and not whitened (three equal singular values)
    assert layer.num_batches_tracked.item() == 2 and not torch.equal(layer.running_basis, basis)
    s_in = torch.linalg.svdvals(small.flatten(1).double())
    assert torch.allclose(torch.linalg.svdvals(spectral_filter(small, 4).flatten(1).double()),
                          s_in, rtol=1e-5)


def test_running_filter_of_statistics_with_k_or_fewer_directions_is_the_identity():
    x = torch.randn(3, 40, dtype=torch.float64)  # three directions, k = 4
    basis, power = update_running_subspace(torch.zeros(0), torch.zeros(0), x, 1.0, rank=8)
    assert int((power > 0).sum()) == 3
    assert torch.equal(running_filter(x, basis, power, k=4), x)
    assert torch.allclose(running_filter(x, basis, power, k=2), spectral_filter(x, 2), atol=1e-5)


def planted(b, d, singular, seed=0):
    """Features with exactly the given singular values (float64)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(b, len(singular), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, len(singular), generator=g, dtype=torch.float64))
    return (u * torch.tensor(singular, dtype=torch.float64)) @ v.T


def test_running_statistics_keep_every_direction_the_filter_counts():
    # σ_4/σ_1 = 1e-4 and σ_5/σ_1 = 5e-5: above rank_rtol = 1e-5, so the batch filter counts five
    # directions (four equalised, one damped); a threshold of eps32·(r + B) on eigenvalues
    # (σ ratio ~1.5e-3) would drop the last two from the running statistics
    x = planted(20, 64, [1.0, 0.5, 0.25, 1e-4, 5e-5]).float()
    singular = torch.linalg.svdvals(x.double())
    assert int((singular > singular[0] * 1e-5).sum()) == 5
    layer = EigenGuard(k=4, sketch_rank=8).train()
    layer(x)  # the first batch alone makes the statistics
    ratios = (layer.running_power[:5].double() / layer.running_power[0].double()).sqrt()
    assert torch.allclose(ratios, torch.tensor([1.0, 0.5, 0.25, 1e-4, 5e-5], dtype=torch.float64),
                          rtol=1e-3)
    assert torch.equal(layer.running_power[5:], torch.zeros(3))
    # the running filter from this batch is the batch filter on it: σ_4 is the common scale
    ref = svd_definition(x, 4)
    out = layer.eval()(x)
    assert torch.allclose(out.double(), ref, rtol=0, atol=1e-3 * ref.abs().max())
    s_out = torch.linalg.svdvals(out.double())
    assert torch.allclose(s_out[:5], torch.tensor([1e-4] * 4 + [5e-8], dtype=torch.float64),
                          rtol=1e-2)


def test_running_update_threshold_follows_rank_rtol():
    x = planted(20, 64, [1.0, 0.5, 1e-3])
    _, kept = update_running_subspace(torch.zeros(0), torch.zeros(0), x, 1.0, rank=4,
                                      rank_rtol=1e-5)
    _, dropped = update_running_subspace(torch.zeros(0), torch.zeros(0), x, 1.0, rank=4,
                                         rank_rtol=2e-3)
    assert int((kept > 0).sum()) == 3 and int((dropped > 0).sum()) == 2
    layer = EigenGuard(k=2, sketch_rank=4, rank_rtol=2e-3).train()
    layer(x.float())
    assert int((layer.running_power > 0).sum()) == 2


# --- autocast ---------------------------------------------------------------------------------


def bf16_features(b, seed=0):
    """Conv features computed under CPU bfloat16 autocast, as the layer receives them there."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    images = torch.randn(b, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(images)
    assert features.dtype == torch.bfloat16
    return features


def assert_float32_accurate(out, reference):
    """``out`` (bfloat16) is ``reference`` (float32) rounded once: half a bfloat16 ulp, plus
    float32-level slack; bfloat16 products inside the layer are off by many ulps."""
    assert out.dtype == torch.bfloat16
    half_ulp = torch.finfo(torch.bfloat16).eps / 2 * reference.abs()
    error = (out.float() - reference).abs()
    assert (error <= half_ulp + 1e-5 * reference.abs().max()).all(), error.max()
    assert (out == reference.to(torch.bfloat16)).float().mean() > 0.99  # correctly rounded


def test_autocast_does_not_lower_the_precision_of_the_layer():
    x1, x2 = bf16_features(48, seed=0), bf16_features(48, seed=1)
    plain = EigenGuard(k=8, stats_every=1).train()
    cast = copy.deepcopy(plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out1, out2 = cast(x1), cast(x2)
    assert_float32_accurate(out1, plain(x1.float()))  # training: the batch filter
    assert_float32_accurate(out2, plain(x2.float()))  # and two folds of the running update
    assert torch.allclose(cast.running_power, plain.running_power, rtol=1e-6)
    assert torch.allclose(cast.running_basis, plain.running_basis, rtol=0, atol=1e-6)
    for mode in ("batch", "running"):
        cast.eval_mode = plain.eval_mode = mode
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = cast.eval()(x1)
        assert_float32_accurate(out, plain.eval()(x1.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = spectral_filter(x1, 8)
    assert_float32_accurate(out, spectral_filter(x1.float(), 8))
