"""Llama baseline: head tying, dispatch, bounds, and that it learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import GPT2, TPB, Llama, ModelConfig, build_model

VOCAB = 53


def llama_config(**overrides) -> ModelConfig:
    fields = dict(arch="llama", vocab_size=VOCAB, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    return ModelConfig(**{**fields, **overrides})


def test_build_model_dispatches_on_arch():
    assert type(build_model(llama_config())) is Llama
    assert type(build_model(llama_config(arch="gpt2"))) is GPT2
    assert type(build_model(ModelConfig(arch="tpb", hidden=32, lane_count=2, lane_heads=2, vocab_size=VOCAB))) is TPB


def test_models_refuse_a_config_of_another_arch():
    with pytest.raises(ValueError, match="arch='gpt2': Llama needs arch='llama'"):
        Llama(llama_config(arch="gpt2"))


def test_tied_and_untied_heads():
    tied, untied = build_model(llama_config(tied=True)), build_model(llama_config(tied=False))
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    difference = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert difference == VOCAB * 32


def test_logits_shape_and_sequence_bound():
    model = build_model(llama_config())
    assert model(torch.zeros(3, 16, dtype=torch.long)).shape == (3, 16, VOCAB)
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bf16_autocast_keeps_attention_in_bf16(monkeypatch):
    """Rotary tables are fp32 buffers: they must not promote q, k back to fp32 under autocast."""
    model = build_model(llama_config())
    sdpa, seen = F.scaled_dot_product_attention, []

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.zeros(1, 8, dtype=torch.long))
    assert seen == [(torch.bfloat16,) * 3] * 2


def test_a_few_adamw_steps_fit_one_batch():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model(llama_config())
    idx = torch.randint(0, VOCAB, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), abs=0.2)
    assert losses[-1] < 0.5 * losses[0]
