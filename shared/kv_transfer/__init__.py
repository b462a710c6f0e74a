"""Moving a prompt's KV from a prefill worker to a decode worker.

codec.py      a `Prefix` -> manifest + checksummed chunks + trailer (the sender's side)
assembler.py  one stream -> a validated `Prefix`, or a typed `KvError` (fails closed)
inbox.py      the decode worker's receiving side, one entry per lease

Imports `shared.kv` (the `Prefix` it carries), `shared.sampling_params` and `shared.rpc`;
never JAX, never the transport (the transport imports this) and never a server.
"""
