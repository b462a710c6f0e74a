"""The wire formats: generated code is current, protos follow the house habits, and every
server answers health checks and reflection (what grpcurl needs)."""

from __future__ import annotations

import asyncio
import filecmp
import importlib.util
import re
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared.transport.server import decode_service, prefill_service, start_server
from shared.transport.types import TransportConfig

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos").rglob("*.proto"))


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path: Path) -> None:
    fresh = _generator().generate(tmp_path)
    committed = ROOT / "shared" / "rpc"
    names = sorted(str(p.relative_to(tmp_path)) for p in fresh)
    on_disk = sorted(
        str(p.relative_to(committed))
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert names == on_disk, "shared/rpc is stale: run `python protos/generate.py`"
    for name in names:
        assert filecmp.cmp(tmp_path / name, committed / name, shallow=False), (
            f"shared/rpc/{name} is stale: run `python protos/generate.py`"
        )


def test_generated_imports_are_package_relative() -> None:
    from shared.rpc.pdserve.v1 import kv_pb2, worker_pb2_grpc

    assert kv_pb2.KvTransfer.DESCRIPTOR.full_name == "pdserve.v1.KvTransfer"
    assert hasattr(worker_pb2_grpc, "DecodeWorkerStub")


FIELD = re.compile(r"^\s*(?:repeated\s+|optional\s+)?[\w.]+\s+\w+\s*=\s*\d+;")
ENUM_VALUE = re.compile(r"^\s*[A-Z][A-Z0-9_]*\s*=\s*\d+;")


@pytest.mark.parametrize("path", PROTOS, ids=lambda p: p.name)
def test_every_field_has_a_comment_and_messages_a_next_id(path: Path) -> None:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if FIELD.match(line) or ENUM_VALUE.match(line) or line.strip().startswith("rpc "):
            assert lines[i - 1].strip().startswith("//"), f"{path.name}:{i + 1} needs a comment"
        if line.startswith("message "):
            assert lines[i - 1].startswith("// Next ID:"), f"{path.name}:{i + 1} needs Next ID"


def test_health_and_reflection_on_a_served_worker() -> None:
    async def main() -> None:
        services = [decode_service(object()), prefill_service(object())]  # type: ignore[arg-type]
        server = await start_server("127.0.0.1:0", services, TransportConfig())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for name in ("", "pdserve.v1.DecodeWorker", "pdserve.v1.PrefillWorker"):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
                await server.set_serving(False)
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                async for answer in stub.ServerReflectionInfo(iter([request])):
                    listed = {s.name for s in answer.list_services_response.service}
                assert {
                    "pdserve.v1.DecodeWorker",
                    "pdserve.v1.PrefillWorker",
                    "grpc.health.v1.Health",
                } <= listed
                request = reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="pdserve.v1.DecodeWorker"
                )
                async for answer in stub.ServerReflectionInfo(iter([request])):
                    assert answer.file_descriptor_response.file_descriptor_proto
        finally:
            await server.stop(None)

    asyncio.run(main())
