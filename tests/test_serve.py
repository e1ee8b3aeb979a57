"""Serving many adapters at once (minilora/serve.py): every row of a mixed batch equals its adapter run alone
(LoRA of different ranks and targets, DoRA, no adapter), the pool pages adapters in LRU order and counts hits,
KV-cache generation equals GPT.generate, PEFT's mixed batches agree, and bad input is refused by name.
The Triton kernel is tested in tests/test_bgmv.py."""
import copy
import re
import warnings

import pytest
import torch

from minilora import GPT, CheckpointError, GPTConfig, LoRAConfig, attach, merge, save_adapter
from minilora.dora import DoRAConfig
from minilora.qlora import QLoRAConfig
from minilora.serve import (AdapterPool, LoRAServer, ServedAdapter, bgmv_reference, extract, make_routing,
                            sgmv)

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)


def tiny(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # nonzero biases: DoRA must not rescale them
        for n, p in model.named_parameters():
            if n.endswith(".bias") and "ln_" not in n:
                p.normal_(0, 0.1)
    return model


BASE = tiny()


def adapted(config, seed, base=BASE, std=0.3):
    """The base with one adapter attached (sharing the base's weights), A, B (and m) random as after training."""
    model = attach(copy.deepcopy(base, {id(p): p for p in base.parameters()}), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if re.search(r"\.lora_[AB]\.default\.weight$", n):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif n.endswith("lora_magnitude_vector.default"):
                p.mul_(1 + torch.randn(p.shape, generator=g) * std)
    return model


ZOO = {  # different ranks and targets; "fused" is one rank-8 pair (q and v) on c_attn, and LoRA on lm_head
    "r2": adapted(LoRAConfig(r=2, alpha=4), 1),
    "r8-all": adapted(LoRAConfig(r=8, targets="all-linear"), 2),
    "r1-mlp": adapted(LoRAConfig(r=1, alpha=3, targets=["c_fc"], layers=[1], use_rslora=True), 3),
    "fused": adapted(LoRAConfig(r=4, fused_qkv=["q", "v"], targets=["c_attn", "lm_head"]), 4),
    "dora": adapted(DoRAConfig(r=4, targets=["c_attn", "mlp.c_proj"]), 5),
    "dora-all": adapted(DoRAConfig(r=2, targets="all-linear"), 6),
}


def server(n_slots=8, max_rank=8, names=ZOO, **kw):
    s = LoRAServer(BASE, n_slots=n_slots, max_rank=max_rank, **kw)
    for name in names:
        s.add(name, ZOO[name])
    return s


def tokens(B=6, T=10, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def alone(name, x):
    with torch.no_grad():
        return (BASE if name is None else ZOO[name])(x)[0]


def check_rows(out, x, rows, atol=1e-5):
    for i, name in enumerate(rows):
        torch.testing.assert_close(out[i], alone(name, x)[i], atol=atol, rtol=0, msg=f"row {i} ({name})")


# ------------------------------------------------------------------------ a mixed batch = each adapter alone
def test_mixed_batch_rows_equal_each_adapter_alone():
    rows = ["r2", "r8-all", "fused", "r2", "r1-mlp", "r8-all"]
    x = tokens()
    check_rows(server().forward(x, rows), x, rows)


def test_rows_with_no_adapter_equal_the_base_bit_for_bit():
    rows = [None, "r8-all", "__base__", "dora"]
    x = tokens(B=4)
    out = server().forward(x, rows)
    for i in (0, 2):
        assert torch.equal(out[i], alone(None, x)[i])
    assert torch.equal(server().forward(x, [None] * 4), alone(None, x))


def test_ranks_differ_padded_to_max_rank():
    s = server(max_rank=16)  # every adapter is padded: rank 1 ... 8 in slots of 16
    rows = ["r1-mlp", "r2", "fused", "r8-all"]
    x = tokens(B=4)
    check_rows(s.forward(x, rows), x, rows)
    slot = s.pool.resident["r2"]
    A = s.pool.A["transformer.h.0.attn.c_attn"][slot]  # (R, d_in)
    assert A.shape == (16, 32) and A[2:].abs().sum() == 0 and A[:2].abs().sum() > 0  # rank 2, zero padding
    assert s.pool.host_rank["transformer.h.0.mlp.c_fc"][slot] == 0  # r2 does not adapt c_fc
    assert {a: s.adapters[a].rank() for a in ZOO} == {"r2": 2, "r8-all": 8, "r1-mlp": 1, "fused": 8,
                                                      "dora": 4, "dora-all": 2}


def test_dora_rows_equal_dora_alone():
    rows = ["dora", "r2", None, "dora-all", "dora"]
    x = tokens(B=5)
    s = server()
    check_rows(s.forward(x, rows), x, rows)
    assert s.adapters["dora"].method == "dora" and set(s.adapters["dora"].f) == set(s.adapters["dora"].A)


def test_backends_agree_sgmv_equals_bgmv_reference():
    rows = ["dora", "r2", None, "fused", "r8-all", "r2"]
    x = tokens()
    torch.testing.assert_close(server(backend="reference").forward(x, rows), server().forward(x, rows),
                               atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(0)  # and the two products directly, on a random pool with padding rows
    S, R, d_in, d_out = 5, 6, 12, 10
    A, B, s = torch.randn(S, R, d_in, generator=g), torch.randn(S, d_out, R, generator=g), torch.rand(S, generator=g)
    A[-1], B[-1], s[-1] = 0, 0, 0  # the null slot
    slots = [3, 0, 4, 3, 1, 4, 3]
    xx = torch.randn(len(slots), 3, d_in, generator=g)
    route = make_routing(slots, null=4, device="cpu")
    ref = bgmv_reference(xx.reshape(-1, d_in), A, B, s, route.slot.repeat_interleave(3)).view(len(slots), 3, d_out)
    torch.testing.assert_close(sgmv(xx, A, B, s, route, R), ref, atol=1e-5, rtol=0)
    assert route.index.tolist() == [[1, 7, 7], [4, 7, 7], [0, 3, 6]]  # rows grouped by slot 0, 1, 3; null left out


def test_one_batched_product_per_module_not_a_loop_over_adapters(monkeypatch):
    calls = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real(*a))
    s = server()
    x = tokens()
    counts = []
    for rows in (["r8-all"] * 6, ["r8-all", "r2", "r1-mlp", "dora", "dora-all", None]):
        calls.clear()
        s.forward(x, rows)
        counts.append(len(calls))
    assert counts[0] == counts[1] == 2 * 2 * 4  # shrink, expand in each of 4 linears of 2 blocks, whatever the mix


# ------------------------------------------------------------------------ the pool
def test_lru_eviction_order_and_hit_rate_accounting():
    s = server(n_slots=2)
    x = tokens(B=2)
    for batch in (["r2", "r2"], ["fused", None], ["r2", "r2"], ["dora", "dora"], ["fused", "dora"],
                  ["r2", "dora"]):
        check_rows(s.forward(x, batch), x, batch)
    p = s.pool
    # r2 miss, fused miss, r2 hit, dora miss (evicts fused: least recently used), dora hit + fused miss (evicts r2),
    # dora hit + r2 miss: dora was used before fused, but this batch needs it, so fused goes
    assert p.evicted == ["fused", "r2", "fused"]
    assert list(p.resident) == ["dora", "r2"]
    assert (p.hits, p.misses) == (3, 5) and p.hit_rate == 3 / 8
    assert p.transfer_bytes == sum(s.adapters[a].nbytes() for a in ["r2", "fused", "dora", "fused", "r2"])
    st = p.stats()
    assert st["evictions"] == 3 and st["transfer_mib"] == p.transfer_bytes / 2**20 and st["pool_mib"] > 0


def test_a_reused_slot_keeps_nothing_of_its_previous_adapter():
    s = server(n_slots=1, max_rank=8)
    x = tokens(B=3)
    for batch in (["dora-all"] * 3, ["r8-all", None, "r8-all"], ["r1-mlp", None, "r1-mlp"]):
        check_rows(s.forward(x, batch), x, batch)  # all-linear DoRA, then all-linear LoRA, then one c_fc: one slot
    assert s.pool.evicted == ["dora-all", "r8-all"] and not s.pool.dora_slots


def test_pool_and_adapters_stay_on_the_cpu_registry_until_needed():
    s = server(n_slots=2, names=["r2", "fused", "dora"])
    assert not s.pool.A and all(t.device.type == "cpu" for t in s.adapters["r2"].A.values())
    s.forward(tokens(B=1), ["r2"])
    assert set(s.pool.A) == {f"transformer.h.{i}.attn.c_attn" for i in range(2)}  # only what r2 adapts, so far
    assert s.pool.A["transformer.h.0.attn.c_attn"].shape == (3, 8, 32)  # (n_slots + 1, R, d_in): + the null slot


# ------------------------------------------------------------------------ generation
def generate_alone(name, prompt, n, **kw):
    return (BASE if name is None else ZOO[name]).generate(torch.tensor([prompt]), n, temperature=0, **kw)[0].tolist()


def test_kv_cache_generation_equals_uncached_generation():
    rows = ["r8-all", None, "dora", "fused", "r2"]
    prompts = [[5, 9, 1], [3, 3, 7, 2, 8, 1], [4], [60, 2], [7, 7, 7, 7]]  # ragged: left-padded inside
    out = server().generate(prompts, rows, max_new_tokens=12)
    assert out == [generate_alone(n, p, 12) for n, p in zip(rows, prompts)]
    x = tokens(B=5, T=6)  # a tensor in, a tensor out, as GPT.generate
    out = server().generate(x, rows, max_new_tokens=8)
    assert torch.equal(out, torch.stack([torch.tensor(generate_alone(n, p, 8)) for n, p in zip(rows, x.tolist())]))


def test_generation_equals_the_merged_model():
    merged = merge(copy.deepcopy(ZOO["r8-all"]))  # a deep copy: merging writes W0
    x = tokens(B=2, T=5, seed=3)
    out = server(names=["r8-all"]).generate(x, ["r8-all", "r8-all"], max_new_tokens=10)
    assert torch.equal(out, merged.generate(x, 10, temperature=0))


def test_generation_stops_at_eos_and_top_k_1_is_greedy():
    rows, prompts = ["r2", "dora", None], [[1, 2], [3], [4, 5, 6]]
    greedy = server().generate(prompts, rows, max_new_tokens=6)
    eos = greedy[0][2]  # row 0's first new token
    out = server().generate(prompts, rows, max_new_tokens=6, eos_id=eos)
    for o, n, p in zip(out, rows, prompts):
        ref = generate_alone(n, p, 6, eos_id=eos)  # stops when its own row is done
        assert o[:len(ref)] == ref and set(o[len(ref):]) <= {eos}
    g = torch.Generator().manual_seed(0)
    assert server().generate(prompts, rows, 6, temperature=0.8, top_k=1, generator=g) == greedy


# ------------------------------------------------------------------------ adapters from directories, the base untouched
def test_saved_adapter_directories_serve_like_in_memory_models(tmp_path):
    s = LoRAServer(BASE, n_slots=4)
    for name in ("fused", "dora"):
        s.add(name, save_adapter(ZOO[name], tmp_path / name))
    rows, x = ["dora", "fused", None], tokens(B=3)
    check_rows(s.forward(x, rows), x, rows)
    assert not any("lora" in n for n, _ in BASE.named_modules()) and getattr(BASE, "minilora_config", None) is None


def test_serving_never_changes_the_base():
    before = {k: v.clone() for k, v in BASE.state_dict().items()}
    s = server()
    s.forward(tokens(), ["dora", "r8-all", None, "fused", "dora-all", "r2"])
    s.generate([[1, 2]], ["dora-all"], 3)
    assert all(torch.equal(before[k], v) for k, v in BASE.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pool_equals_cpu():
    base = copy.deepcopy(BASE).cuda()
    s = LoRAServer(base, n_slots=3, max_rank=8)
    for name in ("r2", "dora", "fused"):
        s.add(name, ZOO[name])  # adapters on the CPU, pinned; paged into the GPU pool
    rows, x = ["dora", "fused", None, "r2"], tokens(B=4)
    torch.testing.assert_close(s.forward(x, rows).cpu(), server().forward(x, rows), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------ PEFT's mixed batches (adapter_names=)
def test_equals_peft_mixed_batch(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    BASE.save_pretrained(tmp_path / "hf", hf=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
        names = ["r2", "r8-all", "r1-mlp", "dora"]
        paths = [save_adapter(ZOO[name], tmp_path / name) for name in names]
        pm = peft.PeftModel.from_pretrained(hf, paths[0], adapter_name=names[0])
        for name, path in zip(names[1:], paths[1:]):
            pm.load_adapter(path, adapter_name=name)
        rows, x = ["r1-mlp", "r2", "__base__", "r8-all"], tokens(B=4)
        with torch.no_grad():
            theirs = pm(input_ids=x, adapter_names=rows).logits
            with pytest.raises(ValueError, match="DoRA"):  # PEFT's mixed batches refuse DoRA; the server's do not
                pm(input_ids=x, adapter_names=["dora", "r2", "__base__", "r8-all"])
    torch.testing.assert_close(server().forward(x, rows), theirs, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ clear errors
def test_unknown_adapter_name():
    with pytest.raises(ValueError, match=r"no adapter named \['zzz'\].*server.add"):
        server().forward(tokens(B=2), ["r2", "zzz"])
    with pytest.raises(ValueError, match="one per row"):
        server().forward(tokens(B=2), ["r2"])


def test_adapter_for_another_base_is_refused(tmp_path):
    other_cfg = GPTConfig(n_layer=2, n_head=2, n_embd=48, vocab_size=64, block_size=32)
    other = adapted(LoRAConfig(r=2), 1, base=tiny(other_cfg))
    s = LoRAServer(BASE)
    with pytest.raises(ValueError, match=r"made for another base.*\(96, 32\)"):
        s.add("other", other)  # in memory: the shapes differ
    with pytest.raises(CheckpointError, match="made for another model"):
        s.add("other", save_adapter(other, tmp_path / "other"))  # a directory: load_adapter says so
    with pytest.raises(ValueError, match="trained on another base model"):
        s.add("same-shape", adapted(LoRAConfig(r=2), 1, base=tiny(seed=1)))  # same shapes, other weights
    assert not s.adapters


def test_pool_too_small_for_one_batch():
    with pytest.raises(ValueError, match=r"needs 3 distinct adapters but the pool has 2 slots.*n_slots >= 3"):
        server(n_slots=2).forward(tokens(B=4), ["r2", "fused", "r2", "dora"])
    with pytest.raises(ValueError, match="max_rank >= 8"):
        server(max_rank=4, names=["r8-all"])


def test_unservable_adapters_and_bases_are_refused():
    with pytest.raises(ValueError, match="plain GPT"):
        LoRAServer(ZOO["r2"])
    s = LoRAServer(BASE)
    with pytest.raises(ValueError, match="QLoRAConfig"):
        s.add("q", attach(copy.deepcopy(BASE), QLoRAConfig(r=2)))
    with pytest.raises(ValueError, match="embedding=True"):
        s.add("emb", attach(copy.deepcopy(BASE), LoRAConfig(r=2, embedding=True)))
    with pytest.raises(ValueError, match="unmerge"):
        s.add("merged", merge(copy.deepcopy(ZOO["r2"])))
    s.add("a", ZOO["r2"])
    with pytest.raises(ValueError, match="exists"):
        s.add("a", ZOO["r2"])
    with pytest.raises(ValueError, match="block_size"):
        s.generate([[1] * 30], ["a"], max_new_tokens=4)
    with pytest.raises(ValueError, match="n_slots=0"):
        AdapterPool(0, 8, "cpu", torch.float32)


def test_extract_and_add_a_served_adapter():
    ad = extract(ZOO["fused"])["default"]
    assert isinstance(ad, ServedAdapter) and ad.method == "lora" and ad.rank() == 8  # q and v: 2 pairs of rank 4
    s = LoRAServer(BASE)
    s.add("fused", ad)
    rows, x = ["fused", None], tokens(B=2)
    check_rows(s.forward(x, rows), x, rows)
    s.remove("fused")
    with pytest.raises(ValueError, match="no adapter named"):
        s.forward(x, rows)
