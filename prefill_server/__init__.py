"""The prefill worker (`pdserve prefill`): prompts -> KV caches and first tokens.

main.py       the process: flags, model, warm-up, serve, drain
service.py    the `PrefillHandler`: a request's checks, then the loop
loop.py       the engine thread: chunked prefill calls, first tokens, KV read-out, push
scheduler.py  which prompts' chunks the next call runs (shortest remaining, aging)
kv_push.py    the KV push to the decode worker a request names (gRPC)

Imports `shared`; never another server package.
"""
