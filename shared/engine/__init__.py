"""What a worker runs on its device, one module per concern:

engine.py           `Engine`: one model config on a mesh; its buckets, compile bookkeeping,
                    params, and the one paged forward every program calls
decode.py           the decode state and its programs: init, insert, generate, release
chunked_prefill.py  the prefill program: packed chunks over a paged pool, the KV gather
prefill.py          `Engine.prefill`: one prompt through that same chunk program
reference.py        the uncached full-sequence forward tests compare everything to
base.py             params type, errors, buckets and sampling rows shared by the above
model/              the Llama-family model (params only; its KV passed in and out)
sampling.py         per-request sampling and logprobs
quantization.py     weight-only int8
mesh.py, params.py  tensor-parallel layout; param init and shardings

Imports JAX and flax; from pdserve only `shared.config`, `shared.logprobs`,
`shared.sampling_params`, `shared.kv.pages` and `shared.kv.prefix` (plain data). It never
reads files or flags: params come in from `shared.weights`, configuration from the caller.
"""
