"""The decode worker (`pdserve decode`) and the colocated worker (`pdserve worker --role
colocated`): requests held in slots, stepped together.

main.py            the decode process: flags, model, warm-up, serve, drain
service.py         the `DecodeHandler`: reservations, KV arrivals, token streams
loop.py            the engine thread: inserts between steps, a step, finishes
scheduler.py       `DecodeBatch`: live rows, page growth and preemption for each step
slots.py           the slot table: a lease's lifecycle (reserved -> live -> free)
worker.py          a decode worker assembled from those parts
colocated.py       prefill and decode in one process: the prefill loop feeding this loop
local_generate.py  `pdserve generate-local`: one engine in this process, no servers

Imports `shared`. colocated.py alone may import `prefill_server` (its loop and service:
it composes the two roles); nothing else of one server imports another.
"""
