"""A worker process's life, shared by every role (prefill, decode, colocated).

runtime.py        load the model, size the engine, warm up, run the role (`run_worker`)
worker_server.py  the role's gRPC server and /metrics, its ready line, signals and drain
flags.py          every worker flag, declared once (the roles that read it, its chart key)
worker_config.py  worker flags -> a frozen `WorkerConfig` (the chart tests parse with it)
capacity.py       slots, max_seq_len and KV pages from the devices' memory (`auto`)
lifetime.py       a child process dies with the pdserve parent that started it

May import every other part of `shared` except client and cluster (but for the ready
line's one stdlib module, shared/cluster/ready.py); never a server package.
"""
