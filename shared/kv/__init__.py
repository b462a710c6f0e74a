"""The KV of prompts: the wire format between prefill and decode workers, and the prefill
worker's prefix cache.

codec.py         a `Prefix` -> manifest + checksummed chunks + trailer (the sender's side)
assembler.py     one stream -> a validated `Prefix`, or a typed `KvError` (fails closed)
inbox.py         the decode worker's receiving side, one entry per lease
prefix_cache.py  the prefill worker's page pool: pages of running prefills, cached blocks
prefix_hash.py   chained hashes of page-aligned token blocks (the orchestrator's index too)

Imports `shared.engine` (the `Prefix` it carries) and `shared.rpc`; never the transport
(the transport imports this) and never a server.
"""
