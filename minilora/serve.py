"""Serving many LoRA adapters on one base model at once: S-LoRA (Sheng et al. 2023, arXiv 2311.03285) with
Punica's batched LoRA kernels (Chen et al. 2023, arXiv 2310.18547), in miniature.

Row i of a batch names an adapter a = a(i), or none. Every adapted linear computes, for each token x of row i,

    h = W0 x + b + s_a · B_a A_a x                              LoRA (lora.py), s_a = alpha/r
    h = f_a ⊙ (W0 x + b + s_a · B_a A_a x) + (1 − f_a) ⊙ b       DoRA (dora.py), f_a = m_a / ‖W0 + s_a·B_a A_a‖ (d_out,)

with one base product W0 x for the whole batch and the adapter part as a gather plus batched matmuls: nothing
is merged into W0, and there is no Python loop over adapters (lora.adapter_rows and PEFT's adapter_names= loop).
No adapter: s = 0, f = 1, so h = W0 x + b. Nothing trains here; base and adapters are frozen.

Where the adapters live (S slots, R = max_rank, per adapted module with base weight W0 (d_out, d_in)):
    registry (CPU)  every added adapter: A (r, d_in), B (d_out, r), s, f (DoRA): a ServedAdapter
    pool (device)   A (S+1, R, d_in)   B (S+1, d_out, R)   scaling (S+1,)   rank (S+1,)   f (S+1, d_out)
A rank-r adapter is zero-padded to R (zero rows of A, zero columns of B add exactly 0); a module an adapter does
not adapt has rank 0 in its slot. Slot S holds no adapter (rank 0, f = 1). A batch's adapters are paged in from
the registry when it arrives, least recently used evicted first (AdapterPool). S-LoRA instead pages each rank
row separately (Unified Paging), so a rank-4 adapter takes 4 rows, not R; padding is simpler and wastes (R − r)/R.

Two ways to compute s_a B_a A_a x for all rows (LoRAServer(backend=...)):
    "torch"   rows sorted by slot into U segments of ≤ L rows, padded: (U, L·T, d_in) @ (U, d_in, r) @ (U, r, d_out),
              r the largest rank among the batch's adapters in that module (Punica's SGMV, as padded bmm);
    "triton"  kernels/bgmv.py: each token reads A[a], B[a] by index, up to its own rank (Punica's BGMV);
    "auto"    triton on CUDA (or with TRITON_INTERPRET=1), else torch. bgmv_reference is the equation, per token.
Generation runs the GPT's own submodules (wte, wpe, h[i].ln_1, attn.c_attn, ...) with a KV cache; gpt.py is untouched.
"""
from __future__ import annotations

import copy
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attach import load_adapter
from .dora import DoRAConfig, DoRALinear
from .lora import LoRAConfig, LoRALayer

BASE = "__base__"  # a row with no adapter, as lora.adapter_rows and PEFT name it (None works too)


@dataclass
class ServedAdapter:
    """One adapter as the registry keeps it, in CPU memory; keys are module names (transformer.h.0.attn.c_attn)."""
    method: str  # "lora" or "dora"
    A: dict  # module -> A (r, d_in); a fused c_attn (fused_qkv) is one rank g·r pair, as LoRALinear.factors
    B: dict  # module -> B (d_out, r)
    scaling: dict  # module -> s = alpha/r (or alpha/√r)
    f: dict  # module -> DoRA's f = m/‖W0 + s·BA‖ (d_out,), fixed at inference; {} for LoRA

    def rank(self) -> int:
        return max(A.size(0) for A in self.A.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.A, self.B, self.f) for t in d.values())


def extract(model: nn.Module, names=None) -> dict[str, ServedAdapter]:
    """{name: ServedAdapter} for LoRA/DoRA adapters `names` (default: all) of a model they are attached to."""
    configs = getattr(model, "lora_configs", {})
    names = list(configs) if names is None else list(names)
    for name in names:
        config = configs.get(name)
        if type(config) not in (LoRAConfig, DoRAConfig):  # QLoRA/QDoRA: trained on a 4-bit base; AdaLoRA: P Λ Q
            attached = getattr(model, "minilora_config", None)
            raise ValueError(f"adapter {name!r}: {type(config).__name__ if config else 'not found'} (the model has "
                             f"{type(attached).__name__ if attached else 'no method'} attached, LoRA adapters "
                             f"{sorted(configs)}); the server serves LoRAConfig and DoRAConfig adapters on the plain "
                             f"base: serve others with their own model")
        if config.embedding or config.bias != "none":
            raise ValueError(f"adapter {name!r} has embedding={config.embedding}, bias={config.bias!r}: the server "
                             f"adds updates to linears only, the base's embedding and biases shared; not served")
    out = {n: ServedAdapter("dora" if type(configs[n]) is DoRAConfig else "lora", {}, {}, {}, {}) for n in names}
    with torch.no_grad():
        for module, m in model.named_modules():
            if not isinstance(m, LoRALayer):
                continue
            if m.merged:
                raise ValueError(f"{module} has adapter {m.merged!r} merged into W0; minilora.unmerge(model) first")
            for name in set(names) & m.scaling.keys():
                B, A = m.factors(name)  # (d_out, r), (r, d_in)
                ad = out[name]
                ad.A[module], ad.B[module] = A.detach().cpu().clone(), B.detach().cpu().clone()
                ad.scaling[module] = float(m.scaling[name])
                if isinstance(m, DoRALinear):
                    ad.f[module] = m.scale(name).detach().float().cpu()  # m/‖W0 + s·BA‖, as DoRALinear.forward
    return out


# ------------------------------------------------------------------------ the device pool
class AdapterPool:
    """n_slots adapters on `device`, padded to max_rank; one slot more (`null`) holds no adapter. fetch() pages a
    batch's adapters in, evicting the least recently used; hits/misses count one lookup per distinct adapter."""

    def __init__(self, n_slots: int, max_rank: int, device, dtype):
        if n_slots < 1 or max_rank < 1:
            raise ValueError(f"n_slots={n_slots}, max_rank={max_rank}: both must be at least 1")
        self.n_slots, self.max_rank, self.null = n_slots, max_rank, n_slots
        self.device, self.dtype = torch.device(device), dtype
        self.A, self.B, self.scaling, self.rank, self.f = {}, {}, {}, {}, {}  # module -> pool tensor (see top)
        self.host_rank = {}  # module -> rank (S+1,) on the CPU: read without waiting for the device
        self.resident: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, least recently used first
        self.free = list(range(n_slots - 1, -1, -1))
        self.dora_slots: set[int] = set()
        self.hits = self.misses = self.transfer_bytes = 0
        self.transfer_s = 0.0
        self.evicted: list[str] = []  # in eviction order

    def _allocate(self, module, d_out, d_in):
        S, R, kw = self.n_slots + 1, self.max_rank, dict(device=self.device, dtype=self.dtype)
        self.A[module] = torch.zeros(S, R, d_in, **kw)  # (S+1, R, d_in)
        self.B[module] = torch.zeros(S, d_out, R, **kw)  # (S+1, d_out, R)
        self.scaling[module] = torch.zeros(S, **kw)
        self.rank[module] = torch.zeros(S, dtype=torch.int32, device=self.device)
        self.f[module] = torch.ones(S, d_out, **kw)  # (S+1, d_out); 1: not DoRA
        self.host_rank[module] = torch.zeros(S, dtype=torch.int32)

    def _load(self, adapter: ServedAdapter, slot: int):
        t0 = time.perf_counter()
        for module in self.A:  # clear the slot in every module: rank 0 adds nothing
            self.A[module][slot].zero_()
            self.B[module][slot].zero_()
            self.f[module][slot].fill_(1)
            self.scaling[module][slot], self.rank[module][slot], self.host_rank[module][slot] = 0, 0, 0
        for module, A in adapter.A.items():
            if module not in self.A:
                self._allocate(module, adapter.B[module].size(0), A.size(1))
            r = A.size(0)
            self.A[module][slot, :r].copy_(A, non_blocking=True)  # host -> device: (r, d_in) into (R, d_in)
            self.B[module][slot, :, :r].copy_(adapter.B[module], non_blocking=True)  # (d_out, r) into (d_out, R)
            self.scaling[module][slot], self.rank[module][slot], self.host_rank[module][slot] = \
                adapter.scaling[module], r, r
            if module in adapter.f:
                self.f[module][slot].copy_(adapter.f[module], non_blocking=True)
        if adapter.f:
            self.dora_slots.add(slot)
        else:
            self.dora_slots.discard(slot)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies are done: the time below is the transfer's
        self.transfer_s += time.perf_counter() - t0
        self.transfer_bytes += adapter.nbytes()

    def fetch(self, names: list, registry: dict) -> list[int]:
        """The slot of each row's adapter (None: `null`), after paging in the ones not resident."""
        needed = list(dict.fromkeys(n for n in names if n is not None))
        if len(needed) > self.n_slots:
            raise ValueError(f"this batch needs {len(needed)} distinct adapters but the pool has {self.n_slots} "
                             f"slots; create the server with n_slots >= {len(needed)}, or split the batch")
        missing = [n for n in needed if n not in self.resident]
        self.hits, self.misses = self.hits + len(needed) - len(missing), self.misses + len(missing)
        for n in needed:
            if n in self.resident:
                self.resident.move_to_end(n)  # recently used; the batch's own adapters are never evicted below
        for n in missing:
            if not self.free:
                old, slot = self.resident.popitem(last=False)  # least recently used, not needed by this batch
                self.evicted.append(old)
                self.free.append(slot)
            slot = self.free.pop()
            self._load(registry[n], slot)
            self.resident[n] = slot
        return [self.null if n is None else self.resident[n] for n in names]

    def drop(self, name: str):
        if (slot := self.resident.pop(name, None)) is not None:
            self.free.append(slot)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def stats(self) -> dict:
        return dict(hits=self.hits, misses=self.misses, hit_rate=self.hit_rate, evictions=len(self.evicted),
                    transfer_s=self.transfer_s, transfer_mib=self.transfer_bytes / 2**20, pool_mib=self.nbytes() / 2**20)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.A, self.B, self.scaling, self.rank, self.f)
                   for t in d.values())


# ------------------------------------------------------------------------ one batch's routing, and the products
@dataclass
class Routing:
    """Which slot each row reads, and the rows grouped by slot: made once per batch, used by every layer."""
    slot: torch.Tensor  # (B,) slot of each row (pool.null: no adapter)
    used: torch.Tensor  # (U,) the distinct slots the batch uses, without null
    used_cpu: torch.Tensor  # the same, on the CPU
    index: torch.Tensor  # (U, L) the rows reading slot used[u], then padding (B)
    rows: torch.Tensor  # (n,) the rows with an adapter, as they appear in index (row-major)
    flat: torch.Tensor  # (n,) where each of them sits in index.flatten(): index.flatten()[flat] = rows
    has_dora: bool


def make_routing(slots: list[int], null: int, device, dora_slots=()) -> Routing:
    slot = torch.tensor(slots, dtype=torch.long)  # (B,)
    order = torch.argsort(slot, stable=True)  # rows grouped by slot, in row order within a group
    order = order[slot[order] != null]  # rows with no adapter take no part
    used, counts = torch.unique_consecutive(slot[order], return_counts=True)  # (U,), (U,)
    seg = torch.repeat_interleave(torch.arange(used.numel()), counts)  # segment of each grouped row
    pos = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[seg]  # position within its segment
    index = torch.full((used.numel(), int(counts.max()) if used.numel() else 0), len(slots), dtype=torch.long)
    index[seg, pos] = order  # (U, L)
    flat = seg * index.size(1) + pos  # integer indices (not a mask), so sgmv never waits for the device
    return Routing(slot.to(device), used.to(device), used, index.to(device), order.to(device), flat.to(device),
                   bool(set(dora_slots) & set(used.tolist())))


def bgmv_reference(x, A, B, scaling, slots):
    """y_n = scaling[a_n] · B[a_n] (A[a_n] x_n) for each token n, a_n = slots[n]: the equation, one gather per token.
    x (N, d_in), A (S, R, d_in), B (S, d_out, R), scaling (S,), slots (N,) -> (N, d_out). Keeps (N, R, d_in)."""
    h = torch.bmm(A[slots], x[:, :, None])  # (N, R, d_in) @ (N, d_in, 1) -> (N, R, 1)
    return torch.bmm(B[slots], h)[:, :, 0] * scaling[slots][:, None]  # (N, d_out, R) @ (N, R, 1) -> (N, d_out)


def sgmv(x, A, B, scaling, route: Routing, r: int):
    """The same for x (B, T, d_in), rows grouped by adapter: U padded bmm's; returns (B, T, d_out), 0 on rows
    with no adapter. r: the largest rank among the batch's adapters here (ranks past it are zero padding)."""
    Bsz, T, d_in = x.shape
    U, L = route.index.shape
    X = torch.cat([x, x.new_zeros(1, T, d_in)])[route.index].view(U, L * T, d_in)  # (U, L·T, d_in), padding = 0
    A_u, B_u = A[route.used, :r], B[route.used, :, :r]  # (U, r, d_in), (U, d_out, r)
    h = torch.bmm(X, A_u.transpose(1, 2))  # (U, L·T, d_in) @ (U, d_in, r) -> (U, L·T, r)
    y = torch.bmm(h, B_u.transpose(1, 2)) * scaling[route.used].view(U, 1, 1)  # (U, L·T, r) @ (U, r, d_out)
    out = x.new_zeros(Bsz, T, B.size(1))
    out[route.rows] = y.view(U * L, T, -1)[route.flat]  # back to each row's place; padding rows dropped
    return out


# ------------------------------------------------------------------------ the server
class LoRAServer:
    """One frozen base GPT plus many adapters; forward() and generate() serve a batch whose rows name adapters.

        server = LoRAServer(GPT.from_pretrained(BASE_DIR), n_slots=8, max_rank=16)
        server.add("sql", "runs/sql-adapter")          # a saved adapter directory (minilora's or PEFT's)
        server.add("chat", model)                      # or a model with LoRA/DoRA attached (its active adapter)
        server.generate(prompts, ["sql", None, "chat"], max_new_tokens=20)   # None: the base alone
    """

    def __init__(self, base: nn.Module, n_slots: int = 8, max_rank: int = 16, backend: str = "auto"):
        if getattr(base, "minilora_config", None) is not None or any(isinstance(m, LoRALayer) for m in base.modules()):
            raise ValueError("the server's base must be the plain GPT; pass a fresh GPT.from_pretrained(...) "
                             "(or minilora.merge_and_unload(model) of one you fine-tuned fully)")
        if backend not in ("auto", "torch", "triton", "reference"):
            raise ValueError(f"backend={backend!r}: choose 'auto', 'torch', 'triton' or 'reference'")
        self.base = base.eval().requires_grad_(False)
        w = base.transformer.wte.weight
        if backend == "auto":  # (the device test first: importing triton takes seconds)
            from .kernels import use_triton
            on_triton = w.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
            backend = "triton" if on_triton and use_triton(w) else "torch"
        self.backend = backend  # resolved: "torch", "triton" or "reference"
        self.pool = AdapterPool(n_slots, max_rank, w.device, w.dtype)
        self.adapters: dict[str, ServedAdapter] = {}  # the registry, in CPU memory

    # ---------------------------------------------------------------- adapters
    def add(self, name: str, source, adapter_name: str | None = None) -> ServedAdapter:
        """Register adapter `name` from a saved adapter directory, a model with LoRA/DoRA attached (its adapter
        `adapter_name`, default the active one) or a ServedAdapter. The base must be this server's."""
        if name in self.adapters or name == BASE:
            raise ValueError(f"adapter {name!r} exists (or is reserved); remove() it first or pick another name")
        if isinstance(source, ServedAdapter):
            adapter = source
        elif isinstance(source, nn.Module):
            adapter_name = adapter_name or getattr(getattr(source, "minilora_config", None), "adapter_name", None)
            adapter = extract(source, [adapter_name])[adapter_name]
        else:  # a directory: load into a copy of the base that shares its weights (only the modules are copied)
            shared = {id(t): t for t in [*self.base.parameters(), *self.base.buffers()]}
            skeleton = load_adapter(copy.deepcopy(self.base, shared), Path(source))  # CheckpointError: wrong base
            adapter = next(iter(extract(skeleton, [skeleton.minilora_config.adapter_name]).values()))
        self._check_shapes(name, adapter)
        if isinstance(source, nn.Module):
            self._check_base(name, source, adapter)
        if self.pool.device.type == "cuda":  # pinned host memory: the pool's copies run asynchronously
            adapter = ServedAdapter(adapter.method, _pinned(adapter.A), _pinned(adapter.B), adapter.scaling, adapter.f)
        self.adapters[name] = adapter
        return adapter

    def remove(self, name: str):
        self._known([name])
        del self.adapters[name]
        self.pool.drop(name)

    def _check_shapes(self, name, adapter):
        for module, A in adapter.A.items():
            try:
                d_out, d_in = self.base.get_submodule(module).weight.shape
            except AttributeError:
                raise ValueError(f"adapter {name!r} adapts {module}, which this base does not have: it was made "
                                 f"for another base model") from None
            r, B = A.size(0), adapter.B[module]
            if (A.size(1), B.shape) != (d_in, (d_out, r)):
                raise ValueError(f"adapter {name!r} was made for another base: {module} has A {tuple(A.shape)}, "
                                 f"B {tuple(B.shape)}, this base's W0 is ({d_out}, {d_in})")
            if r > self.pool.max_rank:
                raise ValueError(f"adapter {name!r} has rank {r} in {module} but the pool is padded to max_rank "
                                 f"{self.pool.max_rank}; create the server with max_rank >= {r}")

    def _check_base(self, name, model, adapter):
        def same(a, b):
            return a is b or (a is not None and b is not None and a.shape == b.shape and (
                a.data_ptr() == b.data_ptr() or torch.equal(a, b.to(a.device))))
        for module in adapter.A:
            theirs, mine = model.get_submodule(module).base_layer, self.base.get_submodule(module)
            if not (same(theirs.weight, mine.weight) and same(theirs.bias, mine.bias)):
                raise ValueError(f"adapter {name!r}: {module}'s base weights differ from the server's base, so the "
                                 f"adapter was trained on another base model; serve it on that one")

    def _known(self, names):
        if unknown := sorted({n for n in names if n is not None} - self.adapters.keys()):
            raise ValueError(f"no adapter named {unknown}; this server has {sorted(self.adapters)[:20]}; "
                             f"add it with server.add(name, directory_or_model)")

    def route(self, adapters: list) -> Routing:
        """Page in the adapters of a batch (one name, None or "__base__" per row) and group its rows by slot."""
        names = [None if a in (None, BASE) else a for a in adapters]
        self._known(names)
        slots = self.pool.fetch(names, self.adapters)
        return make_routing(slots, self.pool.null, self.pool.device, self.pool.dora_slots)

    # ---------------------------------------------------------------- the forward
    def _linear(self, name: str, module: nn.Linear, x, route: Routing):
        y = module(x)  # W0 x + b: one (d_in -> d_out) product for every row of the batch
        if name not in self.pool.A or not route.used.numel():
            return y
        r = int(self.pool.host_rank[name][route.used_cpu].max())  # largest rank among the batch's adapters here
        if r == 0:
            return y
        A, B, s = self.pool.A[name], self.pool.B[name], self.pool.scaling[name]
        if self.backend == "torch":
            z = y + sgmv(x, A, B, s, route, r)  # (B, T, d_out)
        else:
            tokens = route.slot.repeat_interleave(x.size(1))  # (B·T,) the slot of every token
            if self.backend == "triton":
                from .kernels.bgmv import bgmv_triton
                delta = bgmv_triton(x.reshape(-1, x.size(-1)), A, B, s, self.pool.rank[name], tokens)
            else:
                delta = bgmv_reference(x.reshape(-1, x.size(-1)), A, B, s, tokens)
            z = y + delta.view_as(y)  # (B·T, d_out) -> (B, T, d_out)
        if route.has_dora:  # h = f ⊙ z + (1 − f) ⊙ b per row, f = 1 on rows that are not DoRA
            f = self.pool.f[name][route.slot][:, None, :]  # (B, 1, d_out)
            z = f * z if module.bias is None else f * z + (1 - f) * module.bias
        return z

    def _forward(self, idx, pos, route: Routing, cache=None, t0: int = 0, key_valid=None):
        """Logits (B, T, V) of tokens idx (B, T) at positions pos (B, T), the T steps after t0 cached ones.
        cache: per layer (k, v), each (B, nh, L, hs), written at t0..t0+T-1; key_valid (B, ≥ t0+T): False = padding."""
        tr, cfg = self.base.transformer, self.base.config
        B, T = idx.shape
        C, nh = cfg.n_embd, cfg.n_head
        mask = None
        if key_valid is not None or (t0 > 0 and T > 1):  # else: plain causal (t0 = 0), or one query seeing all
            q_t, k_t = torch.arange(t0, t0 + T, device=idx.device), torch.arange(t0 + T, device=idx.device)
            mask = (k_t[None, :] <= q_t[:, None]).expand(B, 1, T, t0 + T)  # (B, 1, T, t0+T) causal
            if key_valid is not None:  # no padding keys, but a padding query sees itself (no empty row: no NaN)
                mask = mask & key_valid[:, None, None, :t0 + T] | (k_t[None, :] == q_t[:, None])
        x = tr.wte(idx) + tr.wpe(pos)  # (B, T, C) + (B, T, C)
        for i, block in enumerate(tr.h):
            at = f"transformer.h.{i}."
            qkv = self._linear(at + "attn.c_attn", block.attn.c_attn, block.ln_1(x), route)  # (B, T, 3C)
            q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in qkv.split(C, dim=2))  # (B, nh, T, hs)
            if cache is not None:
                ck, cv = cache[i]  # (B, nh, L, hs)
                ck[:, :, t0:t0 + T], cv[:, :, t0:t0 + T] = k, v
                k, v = ck[:, :, :t0 + T], cv[:, :, :t0 + T]  # (B, nh, t0+T, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t0 == 0)
            y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
            x = x + self._linear(at + "attn.c_proj", block.attn.c_proj, y, route)
            h = F.gelu(self._linear(at + "mlp.c_fc", block.mlp.c_fc, block.ln_2(x), route), approximate="tanh")
            x = x + self._linear(at + "mlp.c_proj", block.mlp.c_proj, h, route)  # (B, T, 4C) -> (B, T, C)
        return self._linear("lm_head", self.base.lm_head, tr.ln_f(x), route)  # (B, T, C) @ (C, V) -> (B, T, V)

    @torch.no_grad()
    def forward(self, idx: torch.Tensor, adapters: list) -> torch.Tensor:
        """Logits (B, T, V) of idx (B, T), row i with adapter adapters[i]: = that adapter's model(idx)[0][i]."""
        if len(adapters) != idx.size(0):
            raise ValueError(f"{len(adapters)} adapter names for a batch of {idx.size(0)} rows; give one per row")
        if idx.size(1) > self.base.config.block_size:
            raise ValueError(f"{idx.size(1)} positions > block_size {self.base.config.block_size}; crop the input")
        idx = idx.to(self.pool.device)
        pos = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
        return self._forward(idx, pos, self.route(adapters))

    __call__ = forward

    @torch.no_grad()
    def generate(self, prompts, adapters: list, max_new_tokens: int, temperature: float = 0.0, top_k=None,
                 eos_id=None, generator=None):
        """GPT.generate for a mixed batch, with a KV cache: row i extended as adapters[i] alone would extend it.
        prompts: a (B, T) tensor (returns (B, T + new), as GPT.generate) or B token lists of any lengths (left-padded
        inside; returns B lists). temperature=0: greedy. Stops early when every row has produced eos_id."""
        rows = prompts.tolist() if torch.is_tensor(prompts) else [list(map(int, p)) for p in prompts]
        cfg, dev = self.base.config, self.pool.device
        if len(adapters) != len(rows) or not rows or min(map(len, rows)) == 0:
            raise ValueError(f"{len(rows)} prompts (each needs a token) and {len(adapters)} adapter names: give one "
                             f"non-empty prompt per adapter name")
        if (longest := max(map(len, rows))) + max_new_tokens - 1 > cfg.block_size:  # the last token is not read
            raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens - 1} read new ones > block_size "
                             f"{cfg.block_size}; crop the prompt or ask for fewer tokens")
        route = self.route(adapters)
        B, T, L = len(rows), longest, longest + max_new_tokens
        lens = torch.tensor([len(p) for p in rows], device=dev)
        idx = torch.tensor([[0] * (T - len(p)) + p for p in rows], device=dev)  # (B, T), left-padded
        key_valid = torch.ones(B, L, dtype=torch.bool, device=dev)
        key_valid[:, :T] = torch.arange(T, device=dev) >= T - lens[:, None]  # (B, T): False on padding
        pos = (key_valid[:, :T].cumsum(1) - 1).clamp_min(0)  # each row counts its own tokens from 0
        hs = cfg.n_embd // cfg.n_head
        cache = [tuple(torch.empty(B, cfg.n_head, L, hs, device=dev, dtype=self.pool.dtype) for _ in "kv")
                 for _ in range(cfg.n_layer)]
        ragged = key_valid if min(map(len, rows)) < T else None
        logits = self._forward(idx, pos, route, cache, 0, ragged)[:, -1]  # prefill: (B, V) at each row's last token
        out, done = idx, torch.zeros(B, dtype=torch.bool, device=dev)
        for t in range(max_new_tokens):
            nxt = _pick(logits.float(), temperature, top_k, generator)  # (B, 1)
            if eos_id is not None:
                nxt = nxt.masked_fill(done.view(-1, 1), eos_id)
                done |= nxt.view(-1) == eos_id
            out = torch.cat([out, nxt], dim=1)
            if t == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            logits = self._forward(nxt, (lens + t)[:, None], route, cache, T + t, ragged)[:, -1]  # one step
        if torch.is_tensor(prompts):
            return out
        return [p + new for p, new in zip(rows, out[:, T:].tolist())]


def _pinned(tensors: dict) -> dict:
    """The tensors as views of one page-locked buffer: one pinned allocation per adapter, not one per tensor."""
    if all(t.is_pinned() for t in tensors.values()):
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors.values()]).pin_memory()
    sizes = [t.numel() for t in tensors.values()]
    return {k: v.view(t.shape) for (k, t), v in zip(tensors.items(), flat.split(sizes))}


def _pick(logits, temperature, top_k, generator):
    """The next token from (B, V) logits, as GPT.generate picks it."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
