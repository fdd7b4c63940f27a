"""Hugging Face interop for the Llama baseline: to_hf(model) -> LlamaForCausalLM, from_hf(hf_model) -> Llama.

Both models use nn.Linear layouts and rotate-half RoPE, so weights map one to one (no permutation).
`transformers` is an optional dependency: it is imported inside the functions.
ModelConfig.dropout is not exported: LlamaConfig has no residual dropout (its attention_dropout drops attention
probabilities, another thing), and both models compute the same logits in eval mode.
"""

from __future__ import annotations

import inspect

from models.config import ModelConfig
from models.llama import Llama

# our parameter name -> Hugging Face name; {i} is the layer index
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.up_proj.weight",
    "ffn.w3.weight": "mlp.down_proj.weight",
}


def _name_map(cfg: ModelConfig) -> dict[str, str]:
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(cfg.n_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in _LAYER_NAMES.items()})
    if not cfg.tied:
        names["head.weight"] = "lm_head.weight"
    return names


def hf_config(cfg: ModelConfig):
    """The transformers.LlamaConfig of a llama ModelConfig (rope_parameters in v5, rope_theta before)."""
    import transformers

    fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.d_ffn,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tied,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    )
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig).parameters:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        fields["rope_theta"] = cfg.rope_theta
    return transformers.LlamaConfig(**fields)


def to_hf(model: Llama):
    """A transformers.LlamaForCausalLM computing the same logits (fp32, within 1e-5)."""
    import transformers

    cfg = model.cfg
    hf_model = transformers.LlamaForCausalLM(hf_config(cfg))
    ours = model.state_dict()
    state = {theirs: ours[name].detach().clone() for name, theirs in _name_map(cfg).items()}
    if cfg.tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf_model.load_state_dict(state, strict=True)
    return hf_model.to(next(model.parameters()).dtype)


def _rope_theta(hf_cfg) -> float:
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"rope_type={kind!r}: only the default rotary embedding is supported")
    return float(theta)


def from_hf(hf_model) -> Llama:
    """Our Llama with the weights and shape of a transformers.LlamaForCausalLM."""
    c = hf_model.config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("attention_bias / mlp_bias=True: our Llama has no biases")
    if c.hidden_act != "silu":
        raise ValueError(f"hidden_act={c.hidden_act!r}: our Llama uses silu (SwiGLU)")
    if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
        raise ValueError(f"head_dim={c.head_dim}: must be hidden_size / num_attention_heads")
    cfg = ModelConfig(
        arch="llama", vocab_size=c.vocab_size, hidden=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        ffn_mult=c.intermediate_size / c.hidden_size, tied=bool(c.tie_word_embeddings),
        max_seq_len=c.max_position_embeddings, rope_theta=_rope_theta(c), norm_eps=c.rms_norm_eps,
    )
    if cfg.d_ffn != c.intermediate_size:
        raise ValueError(f"intermediate_size={c.intermediate_size} is not representable as round(ffn_mult * hidden)")
    theirs = hf_model.state_dict()
    model = Llama(cfg)
    state = {ours: theirs[name] for ours, name in _name_map(cfg).items()}
    if cfg.tied:
        state["head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(next(hf_model.parameters()).dtype)
