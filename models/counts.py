"""Analytic model figures: pure functions of a ModelConfig (no model is ever built).

Parameter layout (must equal `sum(p.numel() for p in build_model(cfg).parameters())`), with
H = hidden, V = vocab_size, and the embedding included (a tied head is counted once):

    llama : tok_emb [V,H] + n_layers x dense_layer(H) + final norm [H] + head [V,H] (untied)
            dense_layer: attn_norm H, wq H*H, wk/wv H*kv*hd each, wo H*H, ffn_norm H,
                         w1/w2 H*F each, w3 F*H     (hd = H/n_heads, F = d_ffn = ffn_dim or round(ffn_mult H))
    gpt2  : wte [V,H] + wpe [max_seq_len,H] + n_layers x (LayerNorms 4H, c_attn 3H*H+3H,
            c_proj H*H+H, c_fc H*F+F, c_proj F*H+H) + ln_f 2H + head [V,H] (untied)
    tpb   : tok_emb [V,H] + tp_blocks x (lane_depth x L x lane_layer
                                         + comm pairs x L x h (one RMSNorm per (send, receive) pair)
                                         + n_classic_layers x dense_layer(H))
            + final norm [H] + head [V,H] (untied)
            lane_layer: attn_norm h, wq h*h, wk/wv h*kvl*hdl each, wo h*h, ffn_norm h,
                        w1/w2 h*Fl each, w3 Fl*out        (out = h for sandwich, H/L for burger;
                                                           Fl = lane_d_ffn = lane_ffn_dim or round(lane_ffn_mult h))

The count is linear in each FFN width (F or Fl) at a fixed hidden size: the budget solver uses that.

Synchronisations per decode step (report sections 3.3 and 4.5): a dense layer under tensor
parallelism reduces twice (after attention, after the FFN); a Tensor Parallel Block once, at
its merge. So llama / gpt2: 2 x n_layers; tpb: tp_blocks x (1 + 2 x n_classic_layers).
"""

from __future__ import annotations

from models.config import ModelConfig

# --- parameters ---


def _dense_layer_params(cfg: ModelConfig) -> int:
    """One Llama decoder layer at the model hidden size (llama layers and tpb classic layers)."""
    h, f = cfg.hidden, cfg.d_ffn
    kv_dim = cfg.n_kv_heads * (h // cfg.n_heads)
    attention = h * h + 2 * h * kv_dim + h * h  # wq, wk, wv, wo
    ffn = 2 * h * f + f * h  # w1 (gate), w2 (up), w3 (down)
    return attention + ffn + 2 * h  # + attn_norm, ffn_norm


def _lane_layer_params(cfg: ModelConfig) -> int:
    """One layer of ONE lane (multiply by lane_count for the stacked weights)."""
    h, f, out = cfg.lane_hidden, cfg.lane_d_ffn, cfg.lane_out
    kv_dim = cfg.lane_kv_heads * (h // cfg.lane_heads)
    attention = h * h + 2 * h * kv_dim + h * h
    ffn = 2 * h * f + f * out
    return attention + ffn + 2 * h


def _gpt2_layer_params(cfg: ModelConfig) -> int:
    h, f = cfg.hidden, cfg.d_ffn
    attention = (h * 3 * h + 3 * h) + (h * h + h)  # c_attn, c_proj (with biases)
    mlp = (h * f + f) + (f * h + h)  # c_fc, c_proj
    return attention + mlp + 4 * h  # + ln1, ln2 (weight and bias)


def _embedding_params(cfg: ModelConfig) -> int:
    """Token embedding plus the LM head when it is not tied (a tied head is counted once)."""
    table = cfg.vocab_size * cfg.hidden
    return table if cfg.tied else 2 * table


def param_count(cfg: ModelConfig) -> int:
    """Total trainable parameters, embedding included, tied head counted once."""
    h = cfg.hidden
    if cfg.arch == "llama":
        return _embedding_params(cfg) + cfg.n_layers * _dense_layer_params(cfg) + h
    if cfg.arch == "gpt2":
        positions = cfg.max_seq_len * h
        return _embedding_params(cfg) + positions + cfg.n_layers * _gpt2_layer_params(cfg) + 2 * h
    lanes = cfg.lane_depth * cfg.lane_count * _lane_layer_params(cfg)
    comm_norms = len(cfg.comm_schedule()) * cfg.lane_count * cfg.lane_hidden
    classic = cfg.n_classic_layers * _dense_layer_params(cfg)
    return _embedding_params(cfg) + cfg.tp_blocks * (lanes + comm_norms + classic) + h


def embedding_params(cfg: ModelConfig) -> int:
    """Token embedding, untied head and GPT-2's learned position table."""
    positions = cfg.max_seq_len * cfg.hidden if cfg.arch == "gpt2" else 0
    return _embedding_params(cfg) + positions


def non_embedding_params(cfg: ModelConfig) -> int:
    """param_count without the embedding tables (token, untied head, GPT-2 positions)."""
    return param_count(cfg) - embedding_params(cfg)


def ffn_shape(cfg: ModelConfig) -> tuple[int, int, float]:
    """(FFN width, the width it multiplies, nominal ratio) of the layers holding most parameters:
    the lanes for tpb (lane_d_ffn, lane_hidden, lane_ffn_mult), every layer for llama / gpt2
    (d_ffn, hidden, ffn_mult). The ratio width / base is the report's 2.0 when nothing is fitted."""
    if cfg.arch == "tpb":
        return cfg.lane_d_ffn, cfg.lane_hidden, cfg.lane_ffn_mult
    return cfg.d_ffn, cfg.hidden, cfg.ffn_mult


def ffn_ratio(cfg: ModelConfig) -> float:
    width, base, _ = ffn_shape(cfg)
    return width / base


# --- decode-step figures (inputs of analysis/decode.py) ---


def sync_count(cfg: ModelConfig) -> int:
    """Synchronisations per decode step under tensor parallelism (report eq. 9 and 10)."""
    if cfg.arch != "tpb":
        return 2 * cfg.n_layers
    return cfg.tp_blocks * (1 + 2 * cfg.n_classic_layers)


def weight_bytes(cfg: ModelConfig, bytes_per_param: float = 2) -> int:
    """Bytes of all weights (bf16 by default): what a decode step reads besides the KV cache."""
    return round(param_count(cfg) * bytes_per_param)


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_el: float = 2) -> int:
    """KV-cache bytes added per token of context (per sequence of the batch).

    Every lane keeps its own cache: a lane layer stores 2 x lane_kv_heads x lane head dim.
    """
    dense = 2 * cfg.n_kv_heads * (cfg.hidden // cfg.n_heads)
    if cfg.arch == "gpt2":
        dense = 2 * cfg.hidden  # multi-head attention: n_kv_heads is ignored
    if cfg.arch != "tpb":
        return round(cfg.n_layers * dense * bytes_per_el)
    lane = 2 * cfg.lane_kv_heads * (cfg.lane_hidden // cfg.lane_heads)
    per_block = cfg.lane_count * cfg.lane_depth * lane + cfg.n_classic_layers * dense
    return round(cfg.tp_blocks * per_block * bytes_per_el)


# --- training FLOPs ---


def _matmul_params(cfg: ModelConfig) -> int:
    """Weights used in matrix multiplies: no norms, biases, position table or embedding lookup;
    the LM head is always included (a tied head still costs its matmul)."""
    head = cfg.vocab_size * cfg.hidden
    if cfg.arch == "llama":
        return cfg.n_layers * (_dense_layer_params(cfg) - 2 * cfg.hidden) + head
    if cfg.arch == "gpt2":
        h, f = cfg.hidden, cfg.d_ffn
        return cfg.n_layers * (4 * h * h + 2 * h * f) + head
    lane = cfg.lane_count * cfg.lane_depth * (_lane_layer_params(cfg) - 2 * cfg.lane_hidden)
    classic = cfg.n_classic_layers * (_dense_layer_params(cfg) - 2 * cfg.hidden)
    return cfg.tp_blocks * (lane + classic) + head


def _attention_width_sum(cfg: ModelConfig) -> int:
    """Sum over attention layers of the query width (heads x head dim) a token attends with."""
    if cfg.arch != "tpb":
        return cfg.n_layers * cfg.hidden
    lanes = cfg.lane_count * cfg.lane_depth * cfg.lane_hidden
    return cfg.tp_blocks * (lanes + cfg.n_classic_layers * cfg.hidden)


def flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Training FLOPs (forward + backward) per token at a given context length.

        flops = 6 * N_matmul + 12 * sum_layers(d_attn) * context

    Same convention as the notes (decoder_only_transformer_notes.txt, section 3, eq. 3.2:
    F = 12 B D L S (S + (2 + E) D)): a matmul costs 2 FLOPs per weight per token forward and
    twice that backward (6 N); attention scores and value re-weighting cost 2 * d_attn * S each
    forward per token and layer (12 d_attn S with the backward), with no causal halving.
    N_matmul counts every weight used in a matmul, the LM head included (also when tied), and
    no norms, biases or embedding lookups. Lanes attend separately, each at its own width.
    """
    if context < 1:
        raise ValueError(f"context={context}: must be >= 1")
    return 6 * _matmul_params(cfg) + 12 * _attention_width_sum(cfg) * context


def describe(cfg: ModelConfig, context: int | None = None) -> dict[str, int | float]:
    """The figures above for logging (context defaults to cfg.max_seq_len)."""
    context = context or cfg.max_seq_len
    params = param_count(cfg)
    return {
        "params": params,
        "params_non_embedding": params - embedding_params(cfg),
        "ffn_ratio": ffn_ratio(cfg),
        "hidden": cfg.hidden,
        "lane_hidden": cfg.lane_hidden,
        "depth": cfg.depth,
        "syncs": sync_count(cfg),
        "weight_bytes": weight_bytes(cfg),
        "kv_bytes_per_token": kv_bytes_per_token(cfg),
        "flops_per_token": flops_per_token(cfg, context),
    }
