"""Code every pdserve process shares. It never imports a server package.

config.py     frozen model and engine configuration (presets included)
metrics.py    every Prometheus metric, one module, one prefix (`pdserve_`)
tokenizer.py  text <-> token ids, incremental detokenization
chat.py       chat messages -> prompt text with a model's chat template (Jinja)

engine/       what a worker runs on its device: the engine, the model, sampling, int8
weights/      where params come from: orbax checkpoints, Hugging Face import, `pdserve convert`
kv/           the KV wire format: codec, the receiving assembler, the decode worker's inbox
transport/    how processes call each other: typed clients, gRPC, the in-process fake
serving/      what every serving process shares: worker runtime, prefill loop, flags
client/       the public Python client, `pdserve generate`, the load generator
rpc/          code generated from protos/ (never edited by hand)

Layering, enforced by tests/test_layout.py: engine imports only config; weights imports
engine; kv imports engine; transport imports kv; serving may import all of those; client
imports only rpc (and serving.local_generate, lazily, for `pdserve generate-local`).
"""
