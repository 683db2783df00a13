"""scripts/bench's code, split by role (and its data files: ingestd-*.toml, post.lua, and the
stand-alone nulls3.py and pyload.py that it runs as processes).

- processes: starting, stopping and watching processes (psutil), the machine's CPU
- servers:   the sinks (null S3, S3-like slow S3) and the servers under test (Go peer, ingestd)
- load:      telemetry-like request bodies and the load generator (wrk, or pyload.py)
- scenarios: the scenarios and phases of a run, in order (`Bench`)
- profiling: py-spy stacks grouped into CPU per payload by role (pure)
- promhist:  Prometheus histograms from /metrics and their quantiles (pure)
- report:    tables, issue 10's targets, CPU breakdown, chart, files
"""
