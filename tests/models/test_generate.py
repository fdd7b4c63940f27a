"""Incremental decoding over a static KV cache (models.generate): every architecture, at every position,
equals the full forward pass; greedy generation equals Hugging Face's on the exported Llama."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model
from models.layers import KVCache
from models.tpb import add_to_own_slice
from tests.models.tpb_oracle import randomize

B, T, VOCAB = 2, 14, 61


def tpb(recipe: str, **kw) -> ModelConfig:
    fields = dict(arch="tpb", recipe=recipe, vocab_size=VOCAB, hidden=32, n_heads=4, n_kv_heads=2, max_seq_len=24,
                  lane_count=4, lane_depth=4, tp_blocks=1, n_classic_layers=1, lane_heads=2, lane_kv_heads=1,
                  lane_ffn_mult=1.5, tied=False)
    return ModelConfig(**{**fields, **kw})


KRAKEN = dict(comm=True, comm_start=0, comm_interleave=0, comm_length=1)
CONFIGS = {
    "llama": ModelConfig(arch="llama", vocab_size=VOCAB, hidden=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         max_seq_len=24, tied=False),
    "llama_mha_tied": ModelConfig(arch="llama", vocab_size=VOCAB, hidden=32, n_layers=2, n_heads=4, n_kv_heads=4,
                                  max_seq_len=24),
    "gpt2": ModelConfig(arch="gpt2", vocab_size=VOCAB, hidden=32, n_layers=3, n_heads=4, ffn_mult=4.0,
                        max_seq_len=24, tied=False),
    "sandwich": tpb("sandwich"),
    "burger": tpb("burger"),
    "sandwich_comm": tpb("sandwich", **KRAKEN),
    "burger_comm_mean": tpb("burger", comm=True, comm_start=1, comm_interleave=1, comm_length=2,
                            comm_reduction="mean"),
    "sandwich_mixing": tpb("sandwich", tp_blocks=2, n_classic_layers=2, **KRAKEN),  # block mixing (4.3)
    "burger_mixing": tpb("burger", tp_blocks=3, n_classic_layers=1, lane_depth=3,
                         comm=True, comm_start=0, comm_interleave=0, comm_length=2),
    "burger_no_classic": tpb("burger", tp_blocks=2, n_classic_layers=0, **KRAKEN),
}


def model_of(name: str):
    torch.manual_seed(0)
    model = build_model(CONFIGS[name]).eval()
    randomize(model)
    return model


def tokens(n: int = T) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_logits_equal_full_forward(name):
    model, idx = model_of(name), tokens()
    with torch.no_grad():
        full = model(idx)  # [B, T, V]
        cache = model.new_cache(B, T + 2)
        # a 5-token prefill (causal, pos 0), one token at a time, then a chunk of 3 (masked, pos > 0)
        chunks = [(0, 5), *((p, p + 1) for p in range(5, 11)), (11, 14)]
        steps = [model(idx[:, a:b], cache=cache, pos=a) for a, b in chunks]
    inc = torch.cat(steps, dim=1)
    assert full.abs().max() > 0.1
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2", "burger_mixing"])
def test_generate_greedy_and_sampled(name):
    model, prompt = model_of(name), tokens(4)
    out = model.generate(prompt, 8, temperature=0)
    assert out.shape == (B, 12) and torch.equal(out[:, :4], prompt)
    # greedy = argmax of the full forward at every step (no cache involved)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    state = torch.get_rng_state()
    a = model.generate(prompt, 8, temperature=0.8, top_k=5, seed=3)
    assert torch.equal(a, model.generate(prompt, 8, temperature=0.8, top_k=5, seed=3))
    assert torch.equal(torch.get_rng_state(), state)  # a seeded draw leaves the global RNG alone
    assert not torch.equal(a, model.generate(prompt, 8, temperature=0.8, top_k=5, seed=4))
    top1 = model.generate(prompt, 8, temperature=1.0, top_k=1, seed=0)  # top_k 1 is greedy
    assert torch.equal(top1, out)


def test_generate_refuses_bad_input():
    model = model_of("llama")
    with pytest.raises(ValueError, match="max_seq_len=24"):
        model.generate(tokens(20), 5)
    with pytest.raises(ValueError, match="temperature=-1"):
        model.generate(tokens(2), 1, temperature=-1)
    assert torch.equal(model.generate(tokens(3), 0), tokens(3))


def test_cache_is_static():
    model = model_of("sandwich_mixing")
    cache = model.new_cache(B, 10)
    cfg = model.cfg
    # per block: 4 lane layers ([L*B, kvl, S, hdl]) then 2 classic layers ([B, nkv, S, hd])
    assert len(cache) == cfg.tp_blocks * (cfg.lane_depth + cfg.n_classic_layers)
    assert cache[0].k.shape == (4 * B, 1, 10, 4) and cache[4].k.shape == (B, 2, 10, 8)
    ptrs = [c.k.data_ptr() for c in cache]
    with torch.no_grad():
        model(tokens(3), cache=cache, pos=0)
        model(tokens(1), cache=cache, pos=3)
    assert [c.k.data_ptr() for c in cache] == ptrs
    with pytest.raises(ValueError, match="cache length 10"):
        KVCache(1, 1, 10, 4, torch.float32, "cpu").update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 9)


def test_own_slice_of_a_lane_subset():
    """A tensor-parallel rank's lanes first .. first + l - 1 write their slices like the full model's."""
    x, f = torch.randn(4, 3, 8), torch.randn(4, 3, 2)
    full = add_to_own_slice(x, f)
    for first in (0, 2):
        torch.testing.assert_close(add_to_own_slice(x[first:first + 2], f[first:first + 2], first),
                                   full[first:first + 2], rtol=0, atol=0)


def test_greedy_equals_hf_generate():
    transformers = pytest.importorskip("transformers")
    from models.hf import to_hf

    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=40, tied=False)
    model = build_model(cfg).eval()
    randomize(model)
    with torch.no_grad():  # scale the head up: distinct argmaxes, no near-ties
        model.head.weight.mul_(3)
    hf_model = to_hf(model).eval()
    prompt = tokens(5)
    ours = model.generate(prompt, 20, temperature=0)
    theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                               min_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert isinstance(hf_model, transformers.LlamaForCausalLM)
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, 5:].tolist())) > 3  # not one repeated token


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "gpt2", "burger_mixing"])
def test_incremental_logits_on_cuda(name):
    model, idx = model_of(name).cuda(), tokens().cuda()
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(B, T)
        inc = torch.cat([model(idx[:, :5], cache=cache, pos=0),
                         *(model(idx[:, p:p + 1], cache=cache, pos=p) for p in range(5, T))], dim=1)
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-4)
    assert torch.equal(model.generate(idx[:, :4], 6, temperature=0).cpu(),
                       model_of(name).generate(idx[:, :4].cpu(), 6, temperature=0))
