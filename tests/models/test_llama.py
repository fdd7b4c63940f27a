"""Llama baseline: head tying, dispatch, bounds, and that it learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import GPT2, TPB, Llama, ModelConfig, build_model, layers
from models.layers import apply_rotary

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


def test_bf16_autocast_keeps_rotary_in_bf16_and_attends_in_fp32_on_cpu(monkeypatch):
    """Rotary tables are fp32 buffers: they must not promote q, k to fp32 under autocast. The attention
    core itself runs in fp32 on CPU on purpose (the CPU flash kernel's bf16 backward is ~10x slower at
    small shapes) and hands bf16 back to the output projection."""
    model = build_model(llama_config())
    sdpa, seen, rotated = F.scaled_dot_product_attention, [], []

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    def spy_rotary(x, rope):
        out = apply_rotary(x, rope)
        rotated.append(out.dtype)
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(layers, "apply_rotary", spy_rotary)
    outputs = []
    model.layers[0].attn.wo.register_forward_hook(lambda module, args, out: outputs.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.zeros(1, 8, dtype=torch.long))
    assert rotated == [torch.bfloat16] * 4  # q and k of 2 layers
    assert seen == [(torch.float32,) * 3 + (False,)] * 2
    assert outputs == [torch.bfloat16]


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
