"""PagedAdamW (minilora/paged_adamw.py): torch.optim.AdamW's numbers, with the state kept in CPU memory.

On the CPU, torch.optim.AdamW's default is its single-tensor implementation (foreach kernels are chosen only
for CUDA tensors: torch/optim/optimizer.py::_default_to_fused_or_foreach), and PagedAdamW performs the same
operations in the same order, so the parameters agree bit for bit, whatever the chunk size."""
import copy

import pytest
import torch

from minilora.paged_adamw import PagedAdamW

SHAPES = [(37, 51), (1000,), (300, 129), (5,)]


def params(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device).requires_grad_() for s in SHAPES]


def run(opt, ps, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        opt.step()


def copies(ps):
    return [p.detach().clone().requires_grad_() for p in ps]


@pytest.mark.parametrize("foreach", [False, None])  # None: AdamW's default, the single-tensor path on CPU
@pytest.mark.parametrize("chunk_size", [100, 2**20])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_equals_torch_adamw_bit_for_bit_on_cpu(foreach, chunk_size, weight_decay):
    ours, theirs = params(), params()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    run(PagedAdamW(ours, chunk_size=chunk_size, **kw), ours, 4)
    run(torch.optim.AdamW(theirs, foreach=foreach, **kw), theirs, 4)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_param_groups_with_their_own_hyperparameters():
    ours, theirs = params(), params()
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "lr": 3e-3}]  # noqa: E731
    run(PagedAdamW(groups(ours), lr=1e-2, weight_decay=0.0, chunk_size=100), ours, 3)
    run(torch.optim.AdamW(groups(theirs), lr=1e-2, weight_decay=0.0), theirs, 3)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_state_has_adamw_layout_on_the_cpu():
    ps = params()
    opt = PagedAdamW(ps, chunk_size=64)
    run(opt, ps, 2)
    for p in ps:
        st = opt.state[p]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and st["step"].item() == 2
        assert st["exp_avg"].device.type == "cpu" and st["exp_avg"].shape == p.shape and st["exp_avg"].dtype == p.dtype


def test_state_dict_round_trip_continues_identically():
    ps, resumed = params(), params()
    opt = PagedAdamW(ps, lr=1e-2, chunk_size=50)
    run(opt, ps, 3, seed=1)
    saved = copy.deepcopy(opt.state_dict())  # as written to disk: state_dict() holds the live tensors
    with torch.no_grad():
        for a, b in zip(resumed, ps):
            a.copy_(b)
    opt2 = PagedAdamW(resumed, lr=1e-2, chunk_size=50)
    opt2.load_state_dict(saved)
    run(opt, ps, 2, seed=2)
    run(opt2, resumed, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(ps, resumed))


def test_loads_torch_adamw_state():
    ours, theirs = params(), params()
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    run(ref, theirs, 3)
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    opt = PagedAdamW(ours, lr=1e-2, chunk_size=33)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    run(ref, theirs, 2, seed=5)
    run(opt, ours, 2, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_params_without_grad_are_skipped_and_closure_runs():
    ps = params()
    opt = PagedAdamW(ps)
    before = ps[0].detach().clone()
    ps[1].grad = torch.ones_like(ps[1])
    assert opt.step(lambda: 3.0) == 3.0
    assert torch.equal(ps[0], before) and ps[0] not in opt.state


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="chunk_size"):
        PagedAdamW(params(), chunk_size=0)
    p = torch.randn(4, 6).t().requires_grad_()  # not contiguous
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="contiguous"):
        PagedAdamW([p]).step()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the paged path runs on GPU parameters")


@cuda
@pytest.mark.parametrize("chunk_size", [64, 1000, 2**20])
def test_cuda_equals_single_tensor_adamw_and_keeps_state_on_cpu(chunk_size):
    ours, theirs = params("cuda"), params("cuda")
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt = PagedAdamW(ours, chunk_size=chunk_size, **kw)
    run(opt, ours, 4)
    run(torch.optim.AdamW(theirs, foreach=False, **kw), theirs, 4)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))  # elementwise CUDA kernels: chunking changes no bit
    for p in ours:
        assert opt.state[p]["exp_avg"].device.type == "cpu" and opt.state[p]["exp_avg"].is_pinned()


@cuda
def test_cuda_optimizer_state_takes_no_gpu_memory_between_steps():
    ps = [torch.randn(1024, 1024, device="cuda", requires_grad=True) for _ in range(4)]
    for p in ps:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt = PagedAdamW(ps, chunk_size=2**16)
    opt.step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # AdamW would hold 2 × 16 MiB here
    assert all(opt.state[p]["exp_avg"].abs().sum() > 0 for p in ps)  # the state came back to the CPU
