"""The public Python client of the Generate API, `pdserve generate` and `pdserve bench`.

generator.py  `GeneratorClient` (sync) and `AsyncGeneratorClient` (asyncio)
cli.py        `pdserve generate`
output.py     the JSON-lines schema `pdserve generate --json` and `generate-local --json` print
loadgen/      the load generator behind `pdserve bench`

Imports only grpc and `shared.rpc`: a frontend installs pdserve without loading JAX. The
client classes are re-exported here: `from shared.client import GeneratorClient`.
"""

from shared.client.generator import (
    AsyncGeneratorClient,
    Chunk,
    ClientTls,
    GenerateError,
    GeneratorClient,
    build_request,
)

__all__ = [
    "AsyncGeneratorClient",
    "Chunk",
    "ClientTls",
    "GenerateError",
    "GeneratorClient",
    "build_request",
]
