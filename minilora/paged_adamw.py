"""Paged AdamW: the optimizer state lives in CPU memory and visits the GPU a chunk at a time.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, §3 "Paged Optimizers") keeps the Adam state in NVIDIA unified
memory, so that when a long batch's activations spike, state pages are evicted to the CPU instead of the run
dying out of memory, and paged back when the optimizer step needs them. Here the paging is explicit and
always on, so it can be read: exp_avg and exp_avg_sq never stay on the GPU between steps.

Update, torch.optim.AdamW's single-tensor code operation for operation (Loshchilov & Hutter, arXiv 1711.05101):
    θ ← θ·(1 − lr·λ)                                        decoupled weight decay (skipped when λ = 0)
    m ← lerp(m, g, 1 − β1)                                  m = β1·m + (1 − β1)·g
    v ← v·β2 + (1 − β2)·g·g
    θ ← θ − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)
Every operation is elementwise, so updating a tensor chunk by chunk gives the same bits as all at once. On the
CPU (where torch.optim.AdamW defaults to this single-tensor path) the results equal AdamW's bit for bit
(tests/test_paged_adamw.py). On CUDA AdamW defaults to its foreach kernels, whose order differs in the last bit.

The pipeline for CUDA parameters, two GPU buffers per state, chunk i in buffer slot i % 2:
    copy stream:     in 0 | in 1 | (wait update 0) out 0 | in 2 | (wait update 1) out 1 | in 3 ...
    compute stream:       (wait in 0) update 0 |  (wait in 1) update 1 |  (wait in 2) update 2 ...
`in i+1` is queued before `out i`, so it runs while chunk i updates; `in i+2` follows `out i` on the copy
stream, so a slot is refilled only after its last chunk was written back. The CPU tensors are pinned, so
both copies are asynchronous DMA; at the end of step() the host waits for the last write-back, so the
state on the CPU is complete whenever Python can look at it (state_dict, checkpoints).

`pages(p)` says which parameters take this path. tests/test_paged_adamw.py makes it true for CPU parameters and
replaces torch.cuda's streams and events with stand-ins (tests/cuda_standins.py) that run the pipeline on the CPU
and check the ordering above, so CI without a GPU executes it too.
"""
from __future__ import annotations

import torch


def pages(p: torch.Tensor) -> bool:
    """Whether step() pages p's moments through p's device: CUDA parameters. A CPU parameter's moments are already
    where it is, so they update in place."""
    return p.is_cuda


def on_host(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """t in CPU memory, as p's moments: pinned when step() pages them, the only host memory a GPU copies to and
    from asynchronously."""
    t = t.to("cpu")
    return t.pin_memory() if pages(p) else t


def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step on matching (chunks of) parameter, gradient and the two moments, in place."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)  # θ·(1 − lr·λ)
    m.lerp_(g, 1 - beta1)  # m = β1·m + (1 − β1)·g
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = β2·v + (1 − β2)·g²
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)  # √v̂ + ε, v̂ = v / (1 − β2^t)
    p.addcdiv_(m, denom, value=-(lr / bias_correction1))  # θ − lr · m̂ / (√v̂ + ε), m̂ = m / (1 − β1^t)


class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose exp_avg / exp_avg_sq sit in CPU memory (pinned for CUDA parameters) and are paged onto
    the parameter's GPU in chunks of `chunk_size` elements per step, overlapped on a side CUDA stream.
    GPU memory for optimizer state: 4 buffers of chunk_size elements during step(), none between steps."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, chunk_size=2**20):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas) or chunk_size < 1:
            raise ValueError(f"lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}, "
                             f"chunk_size={chunk_size}: need lr, eps, weight_decay ≥ 0, 0 ≤ β < 1, chunk_size ≥ 1")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.chunk_size = chunk_size  # elements per page: 2^20 fp32 = 4 MiB per buffer

    def _state(self, p):
        state = self.state[p]
        if not state:  # AdamW's layout, so state dicts move between the two; the moments on the CPU
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = on_host(torch.zeros(p.shape, dtype=p.dtype), p)
            state["exp_avg_sq"] = on_host(torch.zeros(p.shape, dtype=p.dtype), p)
        return state

    def _chunks(self):
        """(param, grad, m, v, hyperparameters) per chunk: flat views of at most chunk_size elements."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or not p.is_contiguous():
                    raise ValueError(f"PagedAdamW pages flat views: parameter {tuple(p.shape)} is sparse or not "
                                     "contiguous; make it contiguous (p.data = p.data.contiguous())")
                state = self._state(p)
                state["step"] += 1
                hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"], step=state["step"].item())
                flat = [t.view(-1) for t in (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for s in range(0, p.numel(), self.chunk_size):
                    yield *(t[s:s + self.chunk_size] for t in flat), hyper

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        chunks = list(self._chunks())
        on_cpu = [c for c in chunks if not pages(c[0])]
        for p, g, m, v, hyper in on_cpu:  # CPU parameters: the state is already where they are
            adamw_update(p, g, m, v, **hyper)
        on_gpu = [c for c in chunks if pages(c[0])]
        if on_gpu:
            self._paged(on_gpu)
        return loss

    def _paged(self, chunks):
        compute = torch.cuda.current_stream(chunks[0][0].device)
        copy = torch.cuda.Stream(chunks[0][0].device)
        copy.wait_stream(compute)  # the buffers below come from the compute stream's memory pool
        buffers = {}  # (device, dtype) -> (2 slots, 2 moments, chunk_size) on the GPU

        def page_in(i):
            p, _, m, v, _ = chunks[i]
            key = (p.device, p.dtype)
            if key not in buffers:
                buffers[key] = torch.empty(2, 2, self.chunk_size, device=p.device, dtype=p.dtype)
            slot = buffers[key][i % 2, :, :p.numel()]  # (2, n): this chunk's m and v on the GPU
            with torch.cuda.stream(copy):
                slot[0].copy_(m, non_blocking=True)
                slot[1].copy_(v, non_blocking=True)
                arrived[i] = torch.cuda.Event()
                arrived[i].record(copy)
            return slot

        arrived = {}  # chunk i -> event recorded on the copy stream once its moments are in slot i % 2
        slots = {0: page_in(0)}  # (bound after `arrived`: page_in records into it)
        for i, (p, g, m, v, hyper) in enumerate(chunks):
            if i + 1 < len(chunks):
                slots[i + 1] = page_in(i + 1)  # prefetch the next chunk while this one updates
            compute.wait_event(arrived.pop(i))
            slot = slots.pop(i)
            adamw_update(p, g, slot[0], slot[1], **hyper)  # on the compute stream
            updated = torch.cuda.Event()
            updated.record(compute)
            with torch.cuda.stream(copy):  # write back once the update is done
                copy.wait_event(updated)
                m.copy_(slot[0], non_blocking=True)
                v.copy_(slot[1], non_blocking=True)
        compute.wait_stream(copy)  # later GPU work (and the buffers' reuse) comes after the last write-back
        copy.synchronize()  # and the host sees complete CPU state once step() returns

    def load_state_dict(self, state_dict):
        """Optimizer.load_state_dict moves state to each parameter's device; the moments go back to the CPU."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in state:
                    state[k] = on_host(state[k], p)
