"""Assembles an orchestrator from its config; `main` serves it, tests build it in-process."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry

from orchestrator.admission import SlotBroker
from orchestrator.config import OrchestratorConfig
from orchestrator.flow import FlowSettings, GenerateFlow
from orchestrator.frontend import Frontend, FrontendLimits
from orchestrator.placement import LeastLoadedPolicy, PlacementPolicy, PrefixAwarePolicy
from orchestrator.prefix_index import PrefixIndex
from orchestrator.registry import Connector, Sources, WorkerRegistry
from shared.metrics import OrchestratorMetrics
from shared.weights.model_info import ModelInfo


@dataclasses.dataclass(slots=True)
class Orchestrator:
    registry: WorkerRegistry
    broker: SlotBroker
    frontend: Frontend
    metrics: OrchestratorMetrics

    async def start(self) -> None:
        await self.registry.start()
        self.broker.start()

    async def stop(self) -> None:
        await self.broker.stop()
        await self.registry.stop()


def build_orchestrator(
    config: OrchestratorConfig,
    connector: Connector,
    model_info: ModelInfo,
    registry: CollectorRegistry,
    policy: PlacementPolicy | None = None,
) -> Orchestrator:
    metrics = OrchestratorMetrics(registry)
    sources = Sources(
        config.prefill,
        config.decode,
        config.colocated,
        config.prefill_dns,
        config.decode_dns,
        config.colocated_dns,
    )
    workers = WorkerRegistry(
        connector,
        sources,
        metrics,
        health_interval_s=config.health_interval_s,
        dns_refresh_s=config.dns_refresh_s,
    )
    policy = policy or placement_policy(config)
    broker = SlotBroker(workers, policy, metrics, config.max_queue)
    model = model_info.config
    settings = FlowSettings(
        model.eos_id, config.lease_ttl_s, config.prefill_retries, config.decode_retries
    )
    flow = GenerateFlow(workers, broker, policy, metrics, settings)
    limits = FrontendLimits(
        config.max_tokens_limit,
        max_stop_strings=config.max_stop_strings,
        max_stop_chars=config.max_stop_chars,
        max_unsent_tokens=config.max_unsent_tokens,
    )
    frontend = Frontend(flow, model_info.tokenizer, model, limits, metrics, model_info.chat)
    return Orchestrator(workers, broker, frontend, metrics)


def placement_policy(config: OrchestratorConfig) -> PlacementPolicy:
    """The policy `--prefill-routing` names (orchestrator/placement.py)."""
    if config.prefill_routing == "least-loaded":
        return LeastLoadedPolicy()
    # Blocks of the prefill workers' page size, learnt from their load reports.
    index = PrefixIndex(None, config.prefix_index_blocks, config.model)
    return PrefixAwarePolicy(index, config.prefix_affinity_max_queue)
