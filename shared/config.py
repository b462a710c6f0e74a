"""Frozen, validated configuration: the one place flags, env and files are read.

Every component takes one of these objects; none reads the environment itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Literal

DType = Literal["float32", "bfloat16"]
AttentionImpl = Literal["auto", "xla", "pallas"]


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the value and the limit."""


@dataclasses.dataclass(slots=True, frozen=True)
class RopeScaling:
    """Llama 3 style RoPE frequency scaling (`rope_type: llama3` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ConfigError(f"rope_scaling.factor={self.factor} must be >= 1.0")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(
                f"rope_scaling needs 0 < low_freq_factor ({self.low_freq_factor}) "
                f"< high_freq_factor ({self.high_freq_factor})"
            )


QuantWeights = Literal["int8"]


@dataclasses.dataclass(slots=True, frozen=True)
class Quantization:
    """Weight-only quantization of the served params; activations stay in the compute dtype.

    Every dense kernel (attention projections, MLP) is int8. With `block_size` None each
    has one float32 scale per output channel (AQT's absmax calibration); with a block size
    each run of `block_size` weights along the contracting axis has its own float32 scale
    and offset (`w = q * scale + offset`), the layout of llama.cpp's 32-weight blocks, so a
    GGUF's Q4/Q5/Q8 blocks are served as they are, without rounding them again.
    `embedding` stores the embedding table int8 the same way along its rows (a tied LM
    head reads the same table, so for tied models it also decides the head); `lm_head` does
    the same for an untied LM head kernel. Part of the model config because it is a property
    of the weights: a pre-quantized checkpoint is int8 whatever a server's flags say, and
    int8 KV caches differ from float ones, so the fingerprint must differ too.
    """

    weights: QuantWeights = "int8"
    embedding: bool = True
    lm_head: bool = True
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.weights != "int8":
            raise ConfigError(f"quantization weights={self.weights!r}: only 'int8' is supported")
        if self.block_size is not None and self.block_size <= 0:
            raise ConfigError(f"quantization block_size={self.block_size} must be > 0")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # Per-channel int8 keeps the dict (and so the fingerprint) it had before blocks.
        if data["block_size"] is None:
            del data["block_size"]
        return data


@dataclasses.dataclass(slots=True, frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder. Hashable, so jitted code can close over it."""

    name: str
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 2048
    # Seeded random init: the std of the embedding and the gain on 1/sqrt(fan_in) kernels.
    # The `tiny` preset uses a large scale so that greedy choices are decisive.
    init_embed_std: float = 0.02
    init_kernel_gain: float = 1.0
    bos_id: int | None = 256
    eos_id: int | None = 257
    quantization: Quantization | None = None

    def __post_init__(self) -> None:
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field}={getattr(self, field)} must be > 0")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be a positive even number (RoPE)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                f"{self.num_kv_heads} (grouped-query attention)"
            )
        for field in ("bos_id", "eos_id"):
            value = getattr(self, field)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"{field}={value} is outside the vocabulary [0, {self.vocab_size})"
                )
        block = self.quantization.block_size if self.quantization else None
        if block is not None:
            for name, size in self.contracting_sizes().items():
                if size % block:
                    raise ConfigError(
                        f"int8 blocks of {block} do not divide {name} ({size}); use "
                        "per-channel int8 (--quantize int8) for this model"
                    )

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def contracting_sizes(self) -> dict[str, int]:
        """The sizes the int8 weights are read along: every kernel's input, and the
        embedding's width (the tied head contracts it)."""
        return {
            "d_model": self.d_model,
            "num_heads * head_dim": self.num_heads * self.head_dim,
            "ffn_dim": self.ffn_dim,
        }

    def param_count(self) -> int:
        d, h, kv, hd, f, v = (
            self.d_model,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.ffn_dim,
            self.vocab_size,
        )
        attn = d * h * hd * 2 + d * kv * hd * 2
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else v * d
        return v * d + self.num_layers * per_layer + d + head

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # Float models keep the dict (and so the fingerprint) they had before quantization
        # existed.
        if self.quantization is None:
            del data["quantization"]
        else:
            data["quantization"] = self.quantization.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        scaling = data.pop("rope_scaling", None)
        quant = data.pop("quantization", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        return cls(
            **data,
            rope_scaling=RopeScaling(**scaling) if scaling else None,
            quantization=Quantization(**quant) if quant else None,
        )

    def fingerprint(self) -> str:
        """Stable hash of the architecture; part of the KV wire format's model fingerprint."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # Named presets -------------------------------------------------------------------

    @classmethod
    def tiny(cls) -> ModelConfig:
        """~3M parameters, byte-level vocabulary: the embedded default and the test model."""
        return cls(
            name="tiny",
            vocab_size=320,
            d_model=256,
            num_layers=4,
            num_heads=8,
            num_kv_heads=2,
            head_dim=32,
            ffn_dim=768,
            rope_theta=10000.0,
            max_position_embeddings=1024,
            init_embed_std=1.0,
            init_kernel_gain=2.0,
        )

    @classmethod
    def small(cls) -> ModelConfig:
        """~110M parameters, Llama-2-like shapes: the benchmark model."""
        return cls(
            name="small",
            vocab_size=32000,
            d_model=768,
            num_layers=12,
            num_heads=12,
            num_kv_heads=12,
            head_dim=64,
            ffn_dim=2048,
            rope_theta=10000.0,
            max_position_embeddings=2048,
            bos_id=1,
            eos_id=2,
        )


MODEL_PRESETS = {"tiny": ModelConfig.tiny, "small": ModelConfig.small}


def model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}"
        ) from None


@dataclasses.dataclass(slots=True, frozen=True)
class EngineConfig:
    """How an engine is laid out: slots, prefill buckets, cache length, dtype, and the
    paged KV cache of its decode state.

    `max_slots` bounds the requests decoded together; `max_seq_len` bounds one request
    (prompt + generated). The KV of every slot lives in one pool of `num_pages` pages of
    `page_size` positions (None: enough for every slot at `max_seq_len`, plus the scratch
    page; fewer pages hold fewer *live* tokens, not fewer slots). `attention`: the decode
    attention kernel, `auto` = Pallas on TPU, XLA elsewhere.
    """

    max_slots: int = 8
    prefill_buckets: tuple[int, ...] = (16, 32, 64, 128)
    max_seq_len: int = 256
    dtype: DType = "float32"
    page_size: int = 16
    num_pages: int | None = None
    attention: AttentionImpl = "auto"

    def __post_init__(self) -> None:
        if self.max_slots <= 0:
            raise ConfigError(f"max_slots={self.max_slots} must be > 0")
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size={self.page_size} must be a power of two")
        if self.num_pages is not None and self.num_pages < 2:
            raise ConfigError(
                f"num_pages={self.num_pages} must be >= 2 (one scratch page and one to use)"
            )
        if self.attention not in ("auto", "xla", "pallas"):
            raise ConfigError(f"attention={self.attention!r}: choose auto, xla or pallas")
        if not self.prefill_buckets:
            raise ConfigError("prefill_buckets must name at least one length")
        if list(self.prefill_buckets) != sorted(set(self.prefill_buckets)):
            raise ConfigError(f"prefill_buckets={self.prefill_buckets} must be strictly increasing")
        if self.prefill_buckets[0] <= 0:
            raise ConfigError(f"prefill_buckets={self.prefill_buckets} must be positive")
        if self.prefill_buckets[-1] >= self.max_seq_len:
            raise ConfigError(
                f"the largest prefill bucket ({self.prefill_buckets[-1]}) must be smaller than "
                f"max_seq_len ({self.max_seq_len}) so at least one token can be generated; "
                "raise max_seq_len or drop the bucket"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        request_pages = -(-self.max_seq_len // self.page_size)
        if self.num_pages is not None and self.num_pages - 1 < request_pages:
            # Smaller, and a request admitted by the length limit could never finish: it
            # would be preempted over and over once it outgrew the pool.
            raise ConfigError(
                f"num_pages={self.num_pages} holds {self.num_pages - 1} pages of "
                f"{self.page_size}, fewer than one request of max_seq_len={self.max_seq_len} "
                f"needs ({request_pages} + the scratch page): raise the pages or "
                "lower max_seq_len"
            )

    @property
    def max_prompt_len(self) -> int:
        return self.prefill_buckets[-1]

    @property
    def pages_per_block(self) -> int:
        """A page table's block (about 128 positions): the Pallas kernel's compute block;
        a table row is a whole number of them."""
        return max(1, 128 // self.page_size)

    def read_pages_per_block(self, platform: str) -> int:
        """Pages the XLA attention reads per loop iteration on `platform`: a table block,
        or on CPU about 64 positions (a divisor of the block: both are powers of two).
        On XLA:CPU the smaller read keeps a step's gathered K/V nearer the cache (3 MiB
        at 32 rows of SmolLM2): SmolLM2's step at 16-32 rows took 4-12% less, at 8 the
        same (bench/probes/attention_block_probe.py)."""
        if platform != "cpu":
            return self.pages_per_block
        return max(1, min(self.pages_per_block, 64 // self.page_size))

    @property
    def max_pages_per_slot(self) -> int:
        """Page-table width: `max_seq_len` positions, rounded up to whole blocks."""
        pages = -(-self.max_seq_len // self.page_size)
        return -(-pages // self.pages_per_block) * self.pages_per_block

    @property
    def total_pages(self) -> int:
        """Pages in the pool, the scratch page included."""
        if self.num_pages is not None:
            return self.num_pages
        return self.max_slots * -(-self.max_seq_len // self.page_size) + 1

    def bucket_for(self, length: int) -> int:
        """The smallest bucket that holds `length` tokens."""
        for bucket in self.prefill_buckets:
            if length <= bucket:
                return bucket
        raise ConfigError(
            f"prompt of {length} tokens is longer than the largest prefill bucket "
            f"({self.prefill_buckets[-1]})"
        )

    @classmethod
    def default_dtype_for_platform(cls, platform: str) -> DType:
        """float32 on CPU (bfloat16 is several times slower there), bfloat16 on TPU/GPU."""
        return "float32" if platform == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True, slots=True)
class PrefillSettings:
    """How the prefill engine batches work (flags of prefill and colocated workers).

    `chunk`: tokens of one prompt per row and call (None: the largest prefill bucket).
    `max_rows`: prompts packed into one call (1: one prompt at a time, no packing).
    `prefix_cache_bytes`: the most memory idle cached prefix pages may hold (0: no prefix
    cache). `aging_s`: a prompt waiting this long goes first whatever its length.
    """

    chunk: int | None = None
    max_rows: int = 4
    prefix_cache_bytes: int = 64 << 20
    aging_s: float = 2.0
    batch_tokens: int = 0  # colocated: the mixed call's budget (decode_server/loop.py)
    colocated: str = "auto"  # colocated: "mixed" into decode steps, its own "thread", "auto"

    def __post_init__(self) -> None:
        if self.chunk is not None and self.chunk <= 0:
            raise ValueError(f"prefill chunk={self.chunk} must be > 0")
        if self.max_rows <= 0:
            raise ValueError(f"prefill max_rows={self.max_rows} must be > 0")
        if self.colocated not in ("auto", "mixed", "thread"):
            raise ValueError(f"colocated prefill {self.colocated!r}: auto, mixed or thread")
        if self.prefix_cache_bytes < 0 or self.aging_s < 0 or self.batch_tokens < 0:
            raise ValueError("prefix_cache_bytes, aging_s and batch_tokens must be >= 0")
