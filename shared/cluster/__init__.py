"""Starting pdserve processes on this machine and knowing when they serve: `pdserve serve`
(local_cluster.py), the tests and the benchmarks all start clusters through here.

* ready.py: the ready line a process prints once it serves, formatted and parsed.
* processes.py: one `pdserve ...` child (dies with its parent), its ready line, stopping it.
* cluster.py: `Cluster.start(ClusterSpec(...))`: workers and an orchestrator on loopback.
* faults.py: `FaultCluster` (kill, freeze, drain and restart workers) and `TlsSetup`.
* accounting.py, metrics.py: what is still held after a run; a process's /metrics.
* certificates.py: a throwaway CA and its leaves, for TLS in tests and local runs.

Only commands are started: it imports no server package and no JAX.
"""
