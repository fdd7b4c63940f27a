"""Hugging Face interop: our Llama and transformers.LlamaForCausalLM give the same logits (no download)."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model
from models.hf import from_hf, hf_config, to_hf
from tests.models.tpb_oracle import randomize

transformers = pytest.importorskip("transformers")

VOCAB = 97


def llama_config(tied: bool) -> ModelConfig:
    return ModelConfig(
        arch="llama", vocab_size=VOCAB, hidden=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_mult=2.5,
        tied=tied, max_seq_len=32, rope_theta=5000.0, norm_eps=1e-6,
    )


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [True, False])
def test_export_gives_same_logits(tied):
    torch.manual_seed(0)
    model = build_model(llama_config(tied))
    randomize(model)
    hf_model = to_hf(model).eval()
    with torch.no_grad():
        ours, theirs = model(tokens()), hf_model(tokens()).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert hf_model.config.tie_word_embeddings == tied
    shared = hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    assert shared == tied


@pytest.mark.parametrize("tied", [True, False])
def test_import_gives_same_logits(tied):
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config(llama_config(tied))).eval()
    randomize(hf_model, seed=1)
    if tied:  # randomize drew the tied matrix once: both names still point to one tensor
        assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    model = from_hf(hf_model)
    with torch.no_grad():
        ours, theirs = model(tokens()), hf_model(tokens()).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (model.head.weight is model.tok_emb.weight) == tied


@pytest.mark.parametrize("tied", [True, False])
def test_round_trips_are_exact(tied):
    torch.manual_seed(0)
    model = build_model(llama_config(tied))
    randomize(model)
    back = from_hf(to_hf(model))
    assert back.cfg == model.cfg
    for (name, p), (name_back, q) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert name == name_back and torch.equal(p, q), name

    hf_model = transformers.LlamaForCausalLM(hf_config(llama_config(tied)))
    hf_back = to_hf(from_hf(hf_model))
    theirs, theirs_back = hf_model.state_dict(), hf_back.state_dict()
    assert theirs.keys() == theirs_back.keys()
    for name in theirs:
        assert torch.equal(theirs[name], theirs_back[name]), name


def test_import_refuses_what_our_llama_cannot_express():
    cfg = hf_config(llama_config(False))
    cfg.attention_bias = True
    with pytest.raises(ValueError, match="attention_bias"):
        from_hf(transformers.LlamaForCausalLM(cfg))
