"""The public Python client of the Generate API, `pdserve generate` and `pdserve bench`.

generator.py  `GeneratorClient` (sync) and `AsyncGeneratorClient` (asyncio)
cli.py        `pdserve generate`
loadgen/      the load generator behind `pdserve bench`

Imports only grpc and `shared.rpc` (and `pdserve generate-local`'s flag helper); the
client classes are re-exported here: `from shared.client import GeneratorClient`.
"""

from shared.client.generator import (
    AsyncGeneratorClient,
    Chunk,
    GenerateError,
    GeneratorClient,
    build_request,
)

__all__ = ["AsyncGeneratorClient", "Chunk", "GenerateError", "GeneratorClient", "build_request"]
