"""The project's common Python package: code more than one pdserve process runs. It never
imports a server package (prefill_server, decode_server, orchestrator).

config.py           frozen model, engine and prefill-scheduling configuration (presets too)
sampling_params.py  a request's sampling parameters (plain data, no JAX)
metrics.py          every Prometheus metric, one module, one prefix (`pdserve_`)
tokenizer.py        text <-> token ids, incremental detokenization
chat.py             chat messages -> prompt text with a model's chat template (Jinja)
logprobs.py         a sampled token's logprob and alternatives (plain data)

engine/       device code: the jitted runner, the model and its layers, sampling, int8
kv/           host-side KV bookkeeping: page pools, the prefix cache, `Prefix` (no JAX)
kv_transfer/  moving KV between workers: the wire codec, the receiving assembler, inbox
weights/      where params come from: orbax checkpoints, HF / GGUF import, `pdserve convert`
transport/    how processes call each other: typed clients, gRPC, the in-process fake
serving/      a worker process's life: flags, load, warm up, serve, drain; capacity
cluster/      starting pdserve processes and reading their ready line (`pdserve serve`,
              the tests, the benchmarks)
client/       the public Python client, `pdserve generate`, the load generator
rpc/          code generated from protos/ (never edited by hand)

Layering, enforced by tests/test_layout.py: kv, sampling_params, config and logprobs import
no JAX; engine imports only those; weights imports engine; kv_transfer imports kv (never
engine); transport imports kv_transfer; serving may import all of those; cluster and
client import no JAX.
"""
