"""What every serving process shares, so that servers never import each other.

runtime.py              a worker's life: load, warm up, serve, drain (`run_worker`)
prefill_loop.py         the prefill engine thread and its KV push (prefill + colocated roles)
prefill_scheduler.py    which prompts' chunks the prefill engine runs next
worker_config.py        worker flags -> a frozen `WorkerConfig` (the chart tests parse with it)
orchestrator_config.py  orchestrator flags -> a frozen `OrchestratorConfig`
local_generate.py       `pdserve generate-local`: one engine in this process, no servers

May import every other part of `shared`; never a server package.
"""
