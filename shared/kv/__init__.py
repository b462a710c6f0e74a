"""Host-side KV bookkeeping: which page of a device pool holds which positions, and what
a prefill hands to decode. Plain Python and numpy: it imports no JAX and nothing of pdserve
but config, logprobs and sampling_params (the engine, the workers and the transport
import it).

pages.py         `FreePages` (every pool's free list) and the decode worker's allocator
prefix_cache.py  the prefill worker's page pool: pages of running prefills, cached blocks
prefix_hash.py   chained hashes of page-aligned token blocks (the orchestrator's index too)
prefix.py        `Prefix`: a prompt's KV, true length, first token and sampling
"""
