"""The report's findings on figures 16-22 as data: CLAIMS, one row a claim.

Each row names the figure, the sweep whose runs test it, the claim as the report words it, the groups
(selectors on run params), the relation expected between them and, for "no large difference" claims,
the equivalence margin in nats. Nothing here is written by hand but the claims: analysis/verdicts.py
judges each row on our runs (`judge(claim, runs, metric, curves)`) and writes the Findings section.

    relation                           expected of groups a and b (the verdicts: analysis/verdicts.py)
    a < b                              a's final estimate below b's, at each value of x when x is given
    increasing in x / decreasing in x  "a < b" between consecutive x values of group a
    equivalent / differs               a - b within the margin / the seed bands apart
    rises more                         a's loss rises more than b's from the first x to the last
    wider spread                       a's seed range above b's at every x
    qualitative                        curve shapes, spikes: listed, not judged
"""

from __future__ import annotations

from dataclasses import dataclass

RELATIONS = ("a < b", "increasing in x", "decreasing in x", "equivalent", "differs", "rises more",
             "wider spread", "qualitative")
OPS = ("==", "!=", ">=", "<=", ">", "<")

Selector = tuple[tuple[str, str, object], ...]
"""(column, op, value) conditions, all of which a run meets."""


@dataclass(frozen=True)
class Claim:
    figure: str
    sweep: str
    text: str
    relation: str
    a: Selector = ()
    b: Selector = ()
    x: str | None = None
    """Pairs are formed at each value of x ("a < b", "equivalent"), or along x (increasing / decreasing)."""
    each: str | None = None
    """Judge separately within each value of this column (e.g. the recipe)."""
    where: Selector = ()
    """Conditions on every run of the claim."""
    margin: float | None = None
    """Equivalence margin in nats (equivalent, differs)."""
    note: str = ""

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"claim {self.figure} {self.text!r}: relation {self.relation!r}, allowed: {RELATIONS}")
        if self.relation in ("equivalent", "differs") and self.margin is None:
            raise ValueError(f"claim {self.figure} {self.text!r}: relation {self.relation} needs a margin")
        for column, op, _ in (*self.a, *self.b, *self.where):
            if op not in OPS:
                raise ValueError(f"claim {self.figure}: selector {column} {op}: allowed ops {OPS}")


def _sel(**conditions) -> Selector:
    """Equality selector from keywords: _sel(arch="tpb") -> (("architecture.arch", "==", "tpb"),)."""
    return tuple((f"architecture.{k}", "==", v) for k, v in conditions.items())


TPB, LLAMA = _sel(arch="tpb"), _sel(arch="llama")
SANDWICH, BURGER = _sel(arch="tpb", recipe="sandwich"), _sel(arch="tpb", recipe="burger")
MARGIN = 0.05
"""Nats: "no large difference" at the report's scale (train losses near 3 after 1B tokens) and ours."""
RECIPE = "architecture.recipe"

CLAIMS: tuple[Claim, ...] = (
    # --- fig. 16 (section 5.3.3): dataset size
    Claim("fig16", "dataset_size", "Llama always converges better than Burger", "a < b",
          LLAMA, TPB, x="tokens"),
    Claim("fig16", "dataset_size", "Figure 16b highlights at log scale important variance for burger",
          "wider spread", TPB, LLAMA, x="tokens", note="seed range of the repeated points (4B, 6B)"),
    Claim("fig16", "dataset_size", "important spikes in the training during the high learning rate time frames",
          "qualitative", note="curve shape: look at loss_curves.png"),
    # --- fig. 17 (section 5.3.4): learning rate, scheduler, variance
    Claim("fig17a", "lr_range", "higher learning rates converge faster to a given training loss",
          "decreasing in x", x="protocol.lr", note="judged on the final loss of each learning rate"),
    Claim("fig17a", "lr_range", "[higher learning rates converge faster] at the cost of spikes in training loss",
          "qualitative", note="curve shape: look at fig17a_lr_range.png"),
    Claim("fig17b", "variance", "no unexpected behavior nor spike in any of the results", "qualitative",
          note="curve shape: look at fig17b_variance.png"),
    Claim("fig17c", "variance", "WSD scheduler appears to provide better end of training results than cosine",
          "a < b", (("protocol.schedule", "==", "wsd"),), (("protocol.schedule", "==", "cosine"),),
          each="architecture.arch"),
    Claim("fig17d", "variance", "The extremum distance appears mostly positive above 490 training steps "
          "[of 1000]", "differs", LLAMA, TPB, each="protocol.schedule", margin=MARGIN,
          note="the report's separation step is 49% of the run; ours is in the 'stays > 0 from' column"),
    Claim("fig17d", "variance", "The distance increases up to 700 steps, at which point it mostly plateaus; "
          "shared between both schedulers", "qualitative", note="look at fig17d_extremum_distance.png"),
    # --- fig. 18 (section 6.2): lane count
    Claim("fig18", "lane_count", "The similar results using 1 lane was expected as no prepare/merge happened",
          "equivalent", SANDWICH, BURGER, where=(("architecture.lane_count", "==", 1),), margin=MARGIN),
    Claim("fig18", "lane_count", "Sandwiches outperform burgers at every lane [count > 1]", "a < b",
          SANDWICH, BURGER, x="architecture.lane_count", where=(("architecture.lane_count", ">=", 2),)),
    Claim("fig18", "lane_count", "Results confirm using more lanes increases the loss", "increasing in x",
          TPB, x="architecture.lane_count", each=RECIPE),
    Claim("fig18", "lane_count", "[different hyper parameters explain] the difference between [the Llama "
          "Baseline] and the 1 Lane Baseline (sandwich)", "differs", LLAMA, SANDWICH + (
              ("architecture.lane_count", "==", 1),), margin=MARGIN),
    Claim("fig18", "lane_count", "[different hyper parameters explain] the difference between [the Llama "
          "Baseline] and the 1 Lane Baseline (burger)", "differs", LLAMA, BURGER + (
              ("architecture.lane_count", "==", 1),), margin=MARGIN),
    Claim("fig18", "lane_count", "there isn't much different between 1 and 8 lanes", "equivalent",
          (("architecture.lane_count", "==", 1),), (("architecture.lane_count", "==", 8),), each=RECIPE,
          where=TPB, margin=MARGIN),
    # --- fig. 19 (section 6.3): lane aspect ratio
    Claim("fig19", "aspect_ratio", "sandwiches achieve the same loss with a lower lane aspect ratio",
          "qualitative", note="the recipes' aspect ratios do not coincide: compare the curves of fig19"),
    # --- fig. 20 (section 6.4): TP blocks
    Claim("fig20", "tp_blocks", "the number of tensor parallel blocks does not appear to influence a lot on the "
          "final training loss", "equivalent", TPB, x="architecture.tp_blocks", each=RECIPE, margin=MARGIN,
          note="every pair of TP-block counts"),
    Claim("fig20", "tp_blocks", "the sandwiches are systematically better in that experience", "a < b",
          SANDWICH, BURGER, x="architecture.tp_blocks"),
    # --- fig. 21 (section 6.5): classic layers per TP block
    Claim("fig21", "classic_layers", "using more decoder layers increases the training loss for a given number "
          "of tensor parallel blocks", "increasing in x", TPB, x="architecture.n_classic_layers", each=RECIPE),
    Claim("fig21", "classic_layers", "This phenomenon is much more pronounced within the sandwiches than the "
          "burgers", "rises more", SANDWICH, BURGER, x="architecture.n_classic_layers",
          note="rise = loss at the most classic layers minus loss at the fewest"),
    # --- fig. 22 (section 6.6): delayed communication
    Claim("fig22a", "delayed_comm", "Training losses are much higher than the other experiments", "qualitative",
          note="a comparison across sweeps: compare this ranking with lane_count's"),
    Claim("fig22b", "delayed_comm", "longer communications are performing better", "decreasing in x",
          TPB, x="architecture.comm_length", where=(("architecture.comm", "==", True),),
          note="each length pools every (start, interleave): its band spans them all"),
)
