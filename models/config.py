"""Model configuration: one dataclass for every architecture, validated on construction.

Shapes at a glance (H = model hidden size, L = lane_count, h = lane hidden size):

    llama / gpt2 : embedding [V, H] -> n_layers x decoder(H) -> norm -> head
    tpb          : embedding [V, H] -> tp_blocks x [ TPB(L lanes x lane_depth layers at h),
                                                     n_classic_layers x decoder(H) ] -> norm -> head
                   sandwich: h = H / L (split / concatenate)
                   burger  : h = H     (broadcast / each lane writes its own H/L feature slice)

FFN widths: d_ffn = ffn_dim or round(ffn_mult * H) (dense layers), lane_d_ffn = lane_ffn_dim or
round(lane_ffn_mult * h) (lanes); 0 means "from the multiplier", which stays the nominal ratio.

The budget solver (models/budget.py) changes `hidden` (or `lane_hidden` for sandwich, through
`hidden = lane_count * lane_hidden`) and then, unless budget_fit=hidden, the FFN widths `ffn_dim` /
`lane_ffn_dim`; every other field is a fixed choice of the sweep. `hidden=None` says "to be solved":
such a config is validated for everything that does not depend on the hidden size and is only an
input of the solver (models.budget.solve), which returns it with a hidden size; the model
builders and the derived widths (d_ffn, lane_hidden, ...) need one.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("llama", "gpt2", "tpb")
RECIPES = ("sandwich", "burger")
REDUCTIONS = ("sum", "mean")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer (>= 1)")


def _heads_fit(prefix: str, hidden: int | None, heads: int, kv_heads: int, rope: bool) -> None:
    """Heads divide the hidden size, KV heads divide the heads, RoPE needs an even head dim.

    hidden=None (to be solved) checks the KV heads only: the solver picks a hidden size that keeps
    the other two rules (models.budget.hidden_step)."""
    if hidden is not None and hidden % heads:
        raise ValueError(
            f"{prefix}heads={heads} does not divide the hidden size {hidden}: "
            f"choose heads among the divisors of {hidden} or another hidden size"
        )
    if heads % kv_heads:
        raise ValueError(f"{prefix}kv_heads={kv_heads}: must divide {prefix}heads={heads}")
    if hidden is not None and rope and (hidden // heads) % 2:
        raise ValueError(
            f"{prefix}heads={heads} with hidden {hidden} gives an odd head dimension "
            f"{hidden // heads}: rotary embeddings need an even head dimension"
        )


@dataclass
class ModelConfig:
    arch: str = "llama"
    """llama | gpt2 | tpb (hybrid Tensor Parallel Block model)."""
    vocab_size: int = 4096
    hidden: int | None = 256
    """Model hidden size H (embedding, classic layers). Sandwich lanes work at H / lane_count.
    None = to be solved for a parameter budget (models.budget.solve); a model needs a number."""
    n_layers: int = 4
    """Decoder layers of llama / gpt2 (unused by tpb, which uses tp_blocks x (lanes + classic))."""
    n_heads: int = 4
    """Attention heads of dense layers (llama, gpt2, tpb classic layers)."""
    n_kv_heads: int = 4
    """KV heads of dense layers (grouped-query attention); must divide n_heads."""
    ffn_mult: float = 2.0
    """d_ffn = round(ffn_mult * H) for dense layers (report section 6: 2; GPT-2: 4), unless ffn_dim is set."""
    ffn_dim: int = 0
    """Explicit d_ffn of dense layers (0 = round(ffn_mult * H)); the budget solver may set it."""
    tied: bool = True
    """LM head shares the embedding matrix (counted once)."""
    max_seq_len: int = 2048
    """Longest context: size of GPT-2's learned position table and of the RoPE cache."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    """Dropout probability (nanoGPT style) on the output of every attention and FFN before it is added to the
    residual stream, lane layers included; active in train mode only (eval and generate() ignore it). 0 = off,
    the same numbers and random draws as a model without dropout."""

    # --- Tensor Parallel Blocks (arch == "tpb") ---
    recipe: str = "sandwich"
    """sandwich (split / concatenate) | burger (broadcast / sample + concatenate)."""
    lane_count: int = 4
    """Number of parallel lanes L in a Tensor Parallel Block (report section 4.1: lane_count). Lanes do not
    synchronise between prepare and merge (only delayed messages, see comm), so at inference L = G x k lanes
    spread over G devices; sandwich lanes work at hidden / L, burger lanes at hidden (table 3)."""
    lane_depth: int = 3
    """Depth D of each lane: decoder layers one lane applies in sequence between prepare and merge
    (section 4.1: n_layers_lane / lane_depth)."""
    tp_blocks: int = 1
    """Tensor Parallel Blocks repeated along the depth, each followed by n_classic_layers dense layers
    (section 4.3: TP_block_repetition); one synchronisation per block at decode (eq. 10)."""
    n_classic_layers: int = 1
    """Classic dense decoder layers at the model hidden size after each TP block (section 4.3: block mixing);
    0 = lanes only. They use n_heads / n_kv_heads / ffn_mult and add 2 synchronisations each (eq. 10)."""
    lane_heads: int = 4
    """Attention heads of each lane layer; they divide lane_hidden (hidden / L for sandwich, hidden for
    burger) with an even head dimension for RoPE."""
    lane_kv_heads: int = 1
    """KV heads of each lane layer (grouped-query attention); must divide lane_heads. Every lane keeps its
    own KV cache."""
    lane_ffn_mult: float = 2.0
    """d_ffn of a lane layer = round(lane_ffn_mult * lane_hidden), unless lane_ffn_dim is set."""
    lane_ffn_dim: int = 0
    """Explicit d_ffn of a lane layer (0 = round(lane_ffn_mult * lane_hidden)); the budget solver may set it."""

    # --- delayed communication between lanes (report section 4.2) ---
    comm: bool = False
    """Delayed communication between lanes (section 4.2): starting at lane depth comm_start and every
    comm_interleave + 1 layers, each lane broadcasts its hidden states, received comm_length layers deeper
    by every other lane (summed, or averaged with comm_reduction=mean, then RMSNorm). Needs lane_count >= 2;
    off = lanes exchange nothing until the merge."""
    comm_start: int = 0
    """First lane depth (0-based layer index) whose output is sent to the other lanes."""
    comm_interleave: int = 0
    """Layers skipped between two sends: sends happen every comm_interleave + 1 layers."""
    comm_length: int = 1
    """A message sent after layer d is received (added, then RMSNorm) after layer d + comm_length."""
    comm_reduction: str = "sum"
    """sum (the report's) | mean (sum divided by lane_count - 1)."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}: unknown architecture, allowed: {', '.join(ARCHS)}")
        for name in ("vocab_size", "hidden", "n_heads", "n_kv_heads", "max_seq_len"):
            if name != "hidden" or self.hidden is not None:  # None: to be solved
                _positive(name, getattr(self, name))
        for name in ("ffn_dim", "lane_ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r}: must be an integer >= 0 (0 = from the multiplier)")
        if self.ffn_mult <= 0 or (self.hidden is not None and self.d_ffn < 1):
            raise ValueError(f"ffn_mult={self.ffn_mult}: must give d_ffn = round(ffn_mult * hidden) >= 1")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r}: must be a number in [0, 1) (0 = no dropout)")
        self.dropout = float(self.dropout)
        if self.comm_reduction not in REDUCTIONS:
            raise ValueError(f"comm_reduction={self.comm_reduction!r}: allowed: {', '.join(REDUCTIONS)}")
        if self.arch != "tpb":
            _positive("n_layers", self.n_layers)
            # GPT-2 is multi-head attention: n_kv_heads does not apply to it.
            kv_heads = self.n_heads if self.arch == "gpt2" else self.n_kv_heads
            _heads_fit("n_", self.hidden, self.n_heads, kv_heads, rope=self.arch == "llama")
            return
        self._validate_tpb()

    def _validate_tpb(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r}: unknown recipe, allowed: {', '.join(RECIPES)}")
        for name in ("lane_count", "lane_depth", "tp_blocks", "lane_heads", "lane_kv_heads"):
            _positive(name, getattr(self, name))
        if not isinstance(self.n_classic_layers, int) or self.n_classic_layers < 0:
            raise ValueError(f"n_classic_layers={self.n_classic_layers!r}: must be an integer >= 0")
        if self.lane_ffn_mult <= 0 or (self.hidden is not None and self.lane_d_ffn < 1):
            raise ValueError(
                f"lane_ffn_mult={self.lane_ffn_mult}: must give round(lane_ffn_mult * lane_hidden) >= 1"
            )
        if self.hidden is not None and self.hidden % self.lane_count:
            raise ValueError(
                f"lane_count={self.lane_count} does not divide hidden={self.hidden}: "
                f"the {self.recipe} recipe needs hidden to be a multiple of lane_count"
            )
        lane_hidden = None if self.hidden is None else self.lane_hidden
        _heads_fit("lane_", lane_hidden, self.lane_heads, self.lane_kv_heads, rope=True)
        if self.n_classic_layers:
            _heads_fit("n_", self.hidden, self.n_heads, self.n_kv_heads, rope=True)
        if self.comm:
            self._validate_comm()

    def _validate_comm(self) -> None:
        if self.lane_count < 2:
            raise ValueError(f"comm=true needs lane_count >= 2 (got lane_count={self.lane_count})")
        if not isinstance(self.comm_start, int) or not 0 <= self.comm_start < self.lane_depth:
            raise ValueError(
                f"comm_start={self.comm_start!r}: must be in [0, lane_depth - 1] = [0, {self.lane_depth - 1}]"
            )
        if not isinstance(self.comm_interleave, int) or self.comm_interleave < 0:
            raise ValueError(f"comm_interleave={self.comm_interleave!r}: must be an integer >= 0")
        _positive("comm_length", self.comm_length)

    # --- derived shapes ---
    @property
    def d_ffn(self) -> int:
        """FFN width of dense layers: ffn_dim, or round(ffn_mult * hidden) when ffn_dim is 0."""
        return self.ffn_dim or round(self.ffn_mult * self.hidden)

    @property
    def lane_hidden(self) -> int:
        """Width of a lane layer: H / L for sandwich, H for burger; H for llama / gpt2, whose one "lane" is
        the whole model (so callers need no special case for the dense baselines)."""
        if self.arch == "tpb" and self.recipe == "sandwich":
            return self.hidden // self.lane_count
        return self.hidden

    @property
    def lane_d_ffn(self) -> int:
        """FFN width of a lane layer: lane_ffn_dim, or round(lane_ffn_mult * lane_hidden) when it is 0."""
        return self.lane_ffn_dim or round(self.lane_ffn_mult * self.lane_hidden)

    @property
    def lane_out(self) -> int:
        """Features a lane's FFN W3 writes: lane_hidden (sandwich; llama / gpt2: H) or H / L (burger)."""
        if self.arch == "tpb" and self.recipe == "burger":
            return self.hidden // self.lane_count
        return self.lane_hidden

    @property
    def comm_period(self) -> int:
        return self.comm_interleave + 1

    def comm_schedule(self) -> list[tuple[int, int]]:
        """(send depth, receive depth) pairs inside one lane; messages past the lane depth are dropped."""
        if self.arch != "tpb" or not self.comm:
            return []
        sends = range(self.comm_start, self.lane_depth, self.comm_period)
        return [(d, d + self.comm_length) for d in sends if d + self.comm_length < self.lane_depth]

    @property
    def depth(self) -> int:
        """Sequential layers a token goes through (lane layers count once)."""
        if self.arch != "tpb":
            return self.n_layers
        return self.tp_blocks * (self.lane_depth + self.n_classic_layers)

    def label(self) -> str:
        """Short readable name, e.g. burger-L4-d12-b1-c1."""
        if self.arch != "tpb":
            return f"{self.arch}-H{'?' if self.hidden is None else self.hidden}-n{self.n_layers}"
        name = f"{self.recipe}-L{self.lane_count}-d{self.lane_depth}-b{self.tp_blocks}-c{self.n_classic_layers}"
        if self.comm:
            name += f"-s{self.comm_start}i{self.comm_interleave}l{self.comm_length}"
        return name
