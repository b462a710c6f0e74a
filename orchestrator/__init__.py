"""The orchestrator (`pdserve orchestrator`): the only thing frontends talk to. It runs no
model and imports no JAX, flax or orbax (tests/test_layout.py checks its start-up).

main.py        the process: flags, model info (tokenizer, chat template), serve, drain
config.py      orchestrator flags -> a frozen `OrchestratorConfig`
app.py         an orchestrator assembled from its config (main and the tests build it)
servicer.py    the public gRPC Generate: protos <-> the frontend's domain objects
openai_*.py    the OpenAI-compatible HTTP API on the same frontend: routes (openai_api),
               endpoints (openai_requests), streams and SSE (openai_stream), errors,
               logprobs' shapes, schemas
frontend.py    validate, tokenize, stream text, account: what a caller can observe
flow.py        one request's journey: lease, token stream, prefill, resume on failure
admission.py   the queue: requests wait, in arrival order, for a decode slot (what no
               decode worker could ever hold is refused at once)
placement.py   where a request goes: decode by free pages, prefill by cached prefix
prefix_index.py  the orchestrator's guess at each prefill worker's prefix cache
prefix_blocks.py its block size: the prefill workers' page size, from their load reports
registry.py    which workers exist, are healthy, and how loaded each one is
outbox.py, limits.py, text.py, auth.py, connect.py, http_server.py: their one job each

Imports `shared` (never engine, weights' tensor readers, kv_transfer's device side, or
another server).
"""
