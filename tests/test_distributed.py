"""EigenGuard under DistributedDataParallel: each process filters its own local batch (gloo, CPU)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from eigenguard.layer import guard, spectral_filter

WORLD = 2


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3))
    guard(model, after="1", k=4)
    return model


def worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = DistributedDataParallel(small_model())
        local = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
        captured = {}
        layer = model.module.get_submodule("1_eigenguard")
        layer.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
        model(local).square().mean().backward()
        local_filter = spectral_filter(captured["x"], 4)
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        gathered = [torch.zeros_like(grads) for _ in range(WORLD)]
        dist.all_gather(gathered, grads)
        # a second step: DDP first broadcasts rank 0's buffers, running statistics included,
        # then each process folds its own batch in (as with BatchNorm)
        layer.register_forward_pre_hook(
            lambda m, args: captured.update(basis=m.running_basis.clone()))
        model(local)
        basis = captured["basis"]
        bases = [torch.zeros_like(basis) for _ in range(WORLD)]
        dist.all_gather(bases, basis)
        results[rank] = dict(
            per_process=torch.allclose(captured["out"], local_filter, atol=1e-6),
            finite=bool(torch.isfinite(grads).all()),
            same_grads=all(torch.allclose(g, gathered[0]) for g in gathered),
            same_stats=all(torch.equal(b, bases[0]) for b in bases))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_processes_filter_their_own_batches_and_agree_on_gradients(tmp_path):
    init_file = tmp_path / "rendezvous"
    with mp.Manager() as manager:
        results = manager.dict()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(worker, args=(str(init_file), results), nprocs=WORLD, join=True)
        results = dict(results)
    assert set(results) == {0, 1}
    for rank, result in results.items():
        assert result == dict(per_process=True, finite=True, same_grads=True, same_stats=True), rank
