"""A worker process's life, shared by every role (prefill, decode, colocated).

runtime.py        load the model, warm up, serve the role's services, drain (`run_worker`)
worker_config.py  worker flags -> a frozen `WorkerConfig` (the chart tests parse with it)
capacity.py       slots, max_seq_len and KV pages from the devices' memory (`auto`)
lifetime.py       a child process dies with the pdserve parent that started it

May import every other part of `shared` except cluster and client; never a server package.
"""
