"""`pdserve bench`: a load generator for the public Generate API.

workload.py  what to send (lengths, prompts, arrival times), seeded
runner.py    how to send it (open-loop Poisson or closed-loop), one record per request
report.py    records -> latency percentiles, throughput, goodput under SLOs
plots.py     records -> PNG latency CDFs and latency over time
cli.py       the `pdserve bench` command

Nothing here imports JAX or a server: it is a client of the public API only.
"""
