"""How workers call each other: typed client Protocols (base.py), domain types (types.py),
a grpc.aio implementation (grpc_transport.py, grpc_servicers.py, server.py) and an
in-process fake with fault injection (fake.py). Servers import this; it imports no server.
"""
