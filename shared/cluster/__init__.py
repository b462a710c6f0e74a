"""Starting pdserve processes on this machine and knowing when they serve: `pdserve serve`
(local_cluster.py), the tests and the benchmarks all start clusters through here.

Only commands are started: it imports no server package and no JAX.
"""
