"""The KV wire format between prefill and decode workers.

codec.py      a `Prefix` -> manifest + checksummed chunks + trailer (the sender's side)
assembler.py  one stream -> a validated `Prefix`, or a typed `KvError` (fails closed)
inbox.py      the decode worker's receiving side, one entry per lease

Imports `shared.engine` (the `Prefix` it carries) and `shared.rpc`; never the transport
(the transport imports this) and never a server.
"""
