"""What a worker runs on its device: the `Engine` (engine.py) with its two model modes
(model/), chunked prefill over a paged pool (chunked_prefill.py), per-request sampling
(sampling.py) and weight-only int8 (quantization.py).

Imports JAX and flax; from pdserve only `shared.config` and `shared.logprobs`. It never
reads files or flags: params come in from `shared.weights`, configuration from the caller.
"""
