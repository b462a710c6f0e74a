"""`--slots auto` / `--max-seq-len auto`: decode capacity from the devices' memory.

The arithmetic, per device (the tightest device decides):

    budget   = kv_memory_fraction x device memory - params on the device - headroom
    per slot = max_seq_len x layers x 2 (K and V) x cache heads on the device x head_dim
               x bytes per element
    slots    = floor(budget / per slot)           (--slots auto)
    max_seq_len = floor(budget / (slots x per token)), at most the model's context
                                                  (--max-seq-len auto with --slots N)

`kv_memory_fraction` is the share of each device's memory pdserve may use at all (vLLM's
`gpu_memory_utilization`); `headroom` is left for XLA's compiled programs and their
temporaries. A backend that reports no memory statistics (the CPU) makes `auto` an error
that asks for a number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from shared.config import ConfigError, ModelConfig

# max_seq_len found by auto sizing is rounded down to this many tokens.
SEQ_ALIGN = 16


@dataclasses.dataclass(frozen=True, slots=True)
class CapacityPlan:
    device_bytes: int  # memory of the tightest device
    fraction: float
    params_bytes: int  # params on the most loaded device
    headroom_bytes: int
    kv_bytes_per_token: int  # per device: every layer's K and V of one position
    slots: int
    max_seq_len: int

    @property
    def budget_bytes(self) -> int:
        return int(self.fraction * self.device_bytes) - self.params_bytes - self.headroom_bytes

    @property
    def kv_bytes(self) -> int:
        return self.slots * self.max_seq_len * self.kv_bytes_per_token

    def describe(self) -> str:
        """The arithmetic, for the startup log."""
        mib = 2**20
        return (
            f"KV budget per device = {self.fraction:g} x {self.device_bytes / mib:.0f} MiB - "
            f"params {self.params_bytes / mib:.1f} MiB - headroom "
            f"{self.headroom_bytes / mib:.0f} MiB = {self.budget_bytes / mib:.1f} MiB; "
            f"KV per slot = {self.max_seq_len} tokens x {self.kv_bytes_per_token} B = "
            f"{self.max_seq_len * self.kv_bytes_per_token / mib:.2f} MiB; "
            f"slots = {self.slots} ({self.kv_bytes / mib:.1f} MiB of KV per device)"
        )


def kv_bytes_per_token(config: ModelConfig, itemsize: int, cache_heads_per_device: int) -> int:
    """Bytes one cached position takes on one device: K and V of every layer."""
    return config.num_layers * 2 * cache_heads_per_device * config.head_dim * itemsize


def device_memory(stats: Sequence[Mapping[str, int] | None], platform: str) -> int:
    """The smallest `bytes_limit` among the devices' `memory_stats()`."""
    limits = [s.get("bytes_limit") for s in stats if s]
    if len(limits) != len(stats) or not all(limits):
        raise ConfigError(
            f"--slots auto / --max-seq-len auto size the KV cache from the devices' memory, "
            f"and this backend ({platform}) reports no memory statistics; give --slots N "
            "and --max-seq-len N"
        )
    return min(limits)


def plan_capacity(
    *,
    device_bytes: int,
    params_bytes: int,
    bytes_per_token: int,
    fraction: float,
    headroom_bytes: int,
    slots: int | None,
    max_seq_len: int | None,
    context_limit: int,
    min_seq_len: int,
) -> CapacityPlan:
    """Solve for whichever of `slots` / `max_seq_len` is None (both: the model's whole
    context, as many slots as fit). Raises ConfigError naming the numbers when nothing
    fits."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"--kv-memory-fraction={fraction} must be in (0, 1]")
    plan = CapacityPlan(
        device_bytes,
        fraction,
        params_bytes,
        headroom_bytes,
        bytes_per_token,
        slots or 0,
        max_seq_len or 0,
    )
    budget = plan.budget_bytes
    if budget <= 0:
        raise ConfigError(f"no memory is left for the KV cache: {plan.describe()}")
    if max_seq_len is None and slots is not None:
        fitted = min(budget // (slots * bytes_per_token), context_limit)
        fitted -= fitted % SEQ_ALIGN
        if fitted <= min_seq_len:
            raise ConfigError(
                f"{slots} slots leave room for {fitted} tokens each, not more than the "
                f"largest prefill bucket ({min_seq_len}): lower --slots ({plan.describe()})"
            )
        return dataclasses.replace(plan, max_seq_len=int(fitted))
    seq = max_seq_len if max_seq_len is not None else context_limit
    fitted_slots = budget // (seq * bytes_per_token)
    if fitted_slots < 1:
        raise ConfigError(
            f"not even one slot of {seq} tokens fits: lower --max-seq-len or raise "
            f"--kv-memory-fraction ({dataclasses.replace(plan, max_seq_len=seq).describe()})"
        )
    return dataclasses.replace(plan, slots=int(fitted_slots), max_seq_len=seq)


def plan_pages(
    *,
    device_bytes: int,
    params_bytes: int,
    bytes_per_token: int,
    fraction: float,
    headroom_bytes: int,
    page_size: int,
) -> int:
    """`--kv-pages auto`: the KV pages the budget holds (the scratch page included)."""
    plan = CapacityPlan(device_bytes, fraction, params_bytes, headroom_bytes, bytes_per_token, 0, 0)
    pages = plan.budget_bytes // (page_size * bytes_per_token)
    if pages < 2:
        raise ConfigError(f"no room for a KV page pool: {plan.describe()}")
    return int(pages)
