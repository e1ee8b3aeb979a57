"""PagedAdamW (minilora/paged_adamw.py): torch.optim.AdamW's numbers, with the state kept in CPU memory.

On the CPU, torch.optim.AdamW's default is its single-tensor implementation (foreach kernels are chosen only
for CUDA tensors: torch/optim/optimizer.py::_default_to_fused_or_foreach), and PagedAdamW performs the same
operations in the same order, so the parameters agree bit for bit, whatever the chunk size.

The paging pipeline (streams, events, pinned moments) runs for CUDA parameters only; the `standin_cuda` tests run it
on CPU parameters with tests/cuda_standins.py in place of torch.cuda's streams and events, which also check that
its waits order every two streams' accesses to the same memory, so CI without a GPU executes and checks it."""
import copy

import pytest
import torch

from cuda_standins import Stream, StandInCuda
from minilora import paged_adamw
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


# ------------------------------------------------------------------ the paging pipeline on the CPU, with stand-ins
# mixed dtypes (a page buffer each); at chunk_size 256 several chunks per parameter, 8 + 2 + 4 + 1 = 15 in all
PAGED = [((37, 51), torch.float32), ((300,), torch.bfloat16), ((129, 7), torch.float32), ((5,), torch.bfloat16)]
MOMENTS = ("exp_avg", "exp_avg_sq")


@pytest.fixture
def standin_cuda(monkeypatch):
    """PagedAdamW's CUDA path for CPU parameters: pages() true, torch.cuda's streams and events the stand-ins."""
    monkeypatch.setattr(paged_adamw, "pages", lambda p: True)
    return StandInCuda(monkeypatch)


def paged_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_() for shape, dtype in PAGED]


def groups(ps):  # weight decay on and off: both of adamw_update's branches
    return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]


def set_grads(ps, g):
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def paged_step(cuda, opt, ps, g):
    """Gradients written (as by the backward) and step() queued on the default stream; leaving `with` checks that
    the host may read the moments and the page buffers may be freed."""
    with cuda:
        set_grads(ps, g)
        opt.step()


def pipeline(n):
    """The copy stream's transfers for n chunks, as the module docstring draws them: in 0 | in 1 | out 0 | in 2 |
    out 1 | … | out n-1, each two copies (m and v)."""
    order = ["in"]  # chunk 0
    for i in range(n):
        order += (["in"] if i + 1 < n else []) + ["out"]  # in i+1 is queued before out i, in i+2 after it
    return [x for x in order for _ in MOMENTS]


@pytest.mark.parametrize("chunk_size", [256, 2**20])
def test_standin_cuda_paged_step_equals_single_tensor_adamw_and_keeps_state_on_host(standin_cuda, chunk_size):
    ours, theirs = paged_params(), paged_params()
    kw = dict(lr=1e-2, betas=(0.9, 0.95))
    opt = PagedAdamW(groups(ours), chunk_size=chunk_size, **kw)
    ref = torch.optim.AdamW(groups(theirs), foreach=False, **kw)
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for step in range(3):
        paged_step(standin_cuda, opt, ours, g_ours)
        set_grads(theirs, g_ref)
        ref.step()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), step
        moments = [opt.state[p][k] for p in ours for k in MOMENTS]
        if step == 0:
            host = moments
        assert all(m is h for m, h in zip(moments, host))  # the same host tensors each step: written back, not swapped
        want = [ref.state[p][k] for p in theirs for k in MOMENTS]
        assert all(m.is_pinned() and torch.equal(m, w) for m, w in zip(moments, want)), step
    n = sum(-(-p.numel() // chunk_size) for p in ours)
    default, *copy_streams = standin_cuda.streams
    assert len(copy_streams) == 3 and all(s.log == pipeline(n) for s in copy_streams)  # one per step, as drawn
    assert not {"in", "out"} & set(default.log)  # every transfer on the copy stream


def test_standin_cuda_loads_torch_adamw_state_pinned_on_host_and_continues_identically(standin_cuda):
    ours, theirs = paged_params(), paged_params()
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        set_grads(theirs, g)
        ref.step()
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    opt = PagedAdamW(groups(ours), lr=1e-2, chunk_size=256)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert all(opt.state[p][k].is_pinned() for p in ours for k in MOMENTS)  # on_host's CUDA branch
    g_ours, g_ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(2):
        paged_step(standin_cuda, opt, ours, g_ours)
        set_grads(theirs, g_ref)
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert all(torch.equal(opt.state[a][k], ref.state[b][k]) for a, b in zip(ours, theirs) for k in MOMENTS)


@pytest.mark.parametrize("who, skips, message", [
    ("default", "wait_event", "no event or wait_stream"),  # an update reads its slot before the copy-in arrived
    ("side", "wait_event", "no event or wait_stream"),  # a write-back reads the slot its update still writes
    ("side", "wait_stream", "no event or wait_stream"),  # a copy-in writes memory the default stream may still use
    ("host", "synchronize", "synchronize"),  # step() returns with write-backs to the moments in flight
])
def test_standins_fail_a_paged_step_that_leaves_out_a_wait(standin_cuda, monkeypatch, who, skips, message):
    real = getattr(Stream, skips)

    def left_out(stream, *args):  # does nothing when `who` calls it
        if who != "host" and (stream is standin_cuda.default) != (who == "default"):
            real(stream, *args)

    monkeypatch.setattr(Stream, skips, left_out)
    ps = paged_params()
    with pytest.raises(AssertionError, match=message):
        paged_step(standin_cuda, PagedAdamW(ps, chunk_size=256), ps, torch.Generator().manual_seed(1))


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
