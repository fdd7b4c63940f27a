"""Typed configs of the data pipeline (`conf/data/`) and the training protocol (`conf/protocol/`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

NON_RESULT = {"result": False}
"""Field metadata of a setting that never changes a run's result (speed, checkpointing, cache folder): the one
list, read by the run key (orchestrator/runkey.py) and the configurations of a ranking (analysis/ranking.py)."""
SOURCES = ("stdlib", "hub", "files")
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("fp32", "bf16")
COMPILE_SETTINGS = ("auto", "true", "false")


@dataclass
class DataConfig:
    source: str = "stdlib"
    """stdlib (the running interpreter's standard library sources) | hub (datasets hub id) | files."""
    name: str = "stdlib"
    """Readable name of the data set (used in run names and cache folders)."""
    hub_id: str = ""
    """datasets hub id, e.g. HuggingFaceTB/smollm-corpus (source=hub)."""
    hub_config: str = ""
    """datasets config name, e.g. fineweb-edu-dedup (source=hub)."""
    split: str = "train"
    files: list[str] = field(default_factory=list)
    """Local files (source=files): .txt, .jsonl/.json or .parquet."""
    text_field: str = "text"
    """Column holding the text (jsonl / parquet / hub)."""
    max_docs: int = 0
    """Use at most this many documents (0 = all)."""
    max_bytes: int = 0
    """Use at most this many bytes of utf-8 text, whole documents in corpus order (0 = all)."""
    max_tokens: int = 0
    """Tokenize whole documents in corpus order until train + test hold at least this many tokens, then stop (a
    hub source is streamed: never downloaded whole); 0 = no bound. For a hub source left at 0 the planner sets
    it from the sweep (trainers/prepare.py: largest steps x batch_tokens + test_tokens + a margin)."""
    tokenizer: str = "bpe"
    """bpe (byte-level BPE trained on the corpus and cached) | a path or hub id for AutoTokenizer."""
    vocab_size: int = 4096
    """Vocabulary of the trained BPE tokenizer (a pretrained tokenizer brings its own)."""
    test_tokens: int = 65536
    """Tokens held out for the eval loss: whole documents drawn at random (fixed by seed) until at least
    this many tokens are held out."""
    seed: int = 0
    """Fixes the data order: the document shuffle before packing, the held-out documents and the order
    in which the train windows are served. Independent of protocol.seed (which changes only the init)."""
    reshuffle: bool = False
    """Re-permute the train windows each epoch (epoch e uses a permutation seeded from (seed, e));
    false: every epoch serves the same permutation."""
    cache_dir: str = field(default="", metadata=NON_RESULT)
    """Where tokenized, packed arrays are cached ('' = $TPB_CACHE or ~/.cache/tpb-sweeps)."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r}: allowed: {', '.join(SOURCES)}")
        if self.source == "hub" and not self.hub_id:
            raise ValueError("data.hub_id is empty: source=hub needs a datasets hub id")
        if self.source == "files" and not self.files:
            raise ValueError("data.files is empty: source=files needs at least one file")
        if self.vocab_size < 256:
            raise ValueError(f"data.vocab_size={self.vocab_size}: must be >= 256 (byte-level BPE)")
        if self.test_tokens < 1:
            raise ValueError(f"data.test_tokens={self.test_tokens}: must be >= 1")
        for name in ("max_docs", "max_bytes", "max_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}={getattr(self, name)}: must be >= 0 (0 = all)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"data.seed={self.seed!r}: must be an integer >= 0")
        if not isinstance(self.reshuffle, bool):
            raise ValueError(f"data.reshuffle={self.reshuffle!r}: allowed: true, false")


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps (each of batch_tokens tokens)."""
    context: int = 128
    """Tokens per sequence (packed blocks)."""
    batch_tokens: int = 4096
    """Effective batch in tokens; gradient accumulation = batch_tokens / (micro_batch x context x world)."""
    micro_batch: int = 32
    """Sequences per forward pass on one process."""
    lr: float = 3e-3
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not norms, biases, embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    schedule: str = "cosine"
    """cosine | wsd | constant."""
    warmup_frac: float = 0.1
    cosine_cycles: float = 1.0
    """Cosine cycles over the run: 1 = one full half-cosine; < 1 = truncated cosine."""
    decay_frac: float = 0.2
    """WSD: fraction of the run spent in the final decay."""
    min_lr_frac: float = 0.0
    """Floor of the schedule, as a fraction of lr."""
    precision: str = "bf16"
    """fp32 | bf16 (autocast; on CPU too: AMX makes bf16 matmuls fast)."""
    eval_every: int = 50
    """Eval loss on the held-out split every N steps (and at the end); 0 = only at the end."""
    eval_batches: int = 4
    ckpt_every: int = field(default=50, metadata=NON_RESULT)
    """Checkpoint every N steps (and at the end)."""
    keep_ckpts: int = field(default=2, metadata=NON_RESULT)
    seed: int = 0
    threads: int = field(default=0, metadata=NON_RESULT)
    """torch intra-op threads per process (0 = leave torch's default)."""
    compile: str = field(default="auto", metadata=NON_RESULT)
    """auto | true | false: torch.compile the model's forward (in place: checkpoints keep their keys). It fuses
    the elementwise work around the matmuls and pays off on long runs only (the first steps wait for it,
    ~40 s on CPU); auto compiles a run expected to train eagerly for 10 minutes or more (the rule and its
    measurement: analysis/planning.py COMPILE_AUTO_MIN_S; the dry run prints the decision)."""
    measure_decode: bool = field(default=False, metadata=NON_RESULT)
    """When the run finishes, time single-device decoding of its final weights in the job process (batch 1, a
    16-token prompt, 32 new tokens: analysis/decode_fill.py) and log it as metrics decode_ms_per_token, ...
    A measurement, not a result: out of the run key, so a run that finished before is skipped, not measured:
    `python -m analysis decode-fill --sweep NAME` measures finished runs from their checkpoints."""

    def __post_init__(self) -> None:
        for name in ("steps", "context", "batch_tokens", "micro_batch", "eval_batches", "keep_ckpts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"protocol.{name}={value!r}: must be a positive integer")
        for name in ("eval_every", "ckpt_every", "threads", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"protocol.{name}={getattr(self, name)}: must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"protocol.schedule={self.schedule!r}: allowed: {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"protocol.precision={self.precision!r}: allowed: {', '.join(PRECISIONS)}")
        if self.lr <= 0:
            raise ValueError(f"protocol.lr={self.lr}: must be > 0")
        for name in ("warmup_frac", "decay_frac", "min_lr_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"protocol.{name}={getattr(self, name)}: must be in [0, 1]")
        if self.schedule == "wsd" and self.warmup_frac + self.decay_frac > 1.0:
            raise ValueError(
                f"protocol.warmup_frac + protocol.decay_frac = {self.warmup_frac + self.decay_frac}: "
                "must be <= 1 for the wsd schedule"
            )
        if not isinstance(self.measure_decode, bool):
            raise ValueError(f"protocol.measure_decode={self.measure_decode!r}: allowed: true, false")
        self.compile = str(self.compile).lower()  # true / false from YAML or an override arrive as "True"
        if self.compile not in COMPILE_SETTINGS:
            raise ValueError(f"protocol.compile={self.compile!r}: allowed: {', '.join(COMPILE_SETTINGS)}")
        if self.cosine_cycles <= 0:
            raise ValueError(f"protocol.cosine_cycles={self.cosine_cycles}: must be > 0")

    def grad_accum(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step; raises when the effective batch cannot be reached exactly."""
        per_micro = self.micro_batch * self.context * world_size
        if self.batch_tokens % per_micro:
            raise ValueError(
                f"protocol.batch_tokens={self.batch_tokens} is not a multiple of micro_batch x context x "
                f"world_size = {self.micro_batch} x {self.context} x {world_size} = {per_micro}"
            )
        return self.batch_tokens // per_micro


def non_result_fields(cls: type) -> frozenset[str]:
    """Fields of a config dataclass marked NON_RESULT."""
    return frozenset(f.name for f in fields(cls) if f.metadata.get("result") is False)


def non_result_params() -> frozenset[str]:
    """The NON_RESULT fields as MLflow param names: protocol.threads, data.cache_dir, ..."""
    return frozenset({*(f"protocol.{n}" for n in non_result_fields(TrainConfig)),
                      *(f"data.{n}" for n in non_result_fields(DataConfig))})
