"""scripts/cluster: N ingestd hosts, each in its own network namespace, behind HAProxy.

Run it through `scripts/cluster` (`scripts/cluster --help`). One module per role:

- `common.py`: polling against deadlines, the "cannot run here" error, command helpers.
- `network.py`: the namespaces, veth pairs and bridge of one run (unique names, torn down).
- `hosts.py`: one ingestd host: its config, its process inside its namespace, start and stop.
- `balancer.py`: HAProxy from Debian: install, render `haproxy.cfg.template`, run, runtime API.
- `load.py`: keep-alive HTTP clients posting payloads with unique ids, and their ledger.
- `sink.py`: the shared directory sink read back by payload id (landed, lost, duplicated).
- `cli.py`: the commands `up`, `rolling-restart` and `cleanup`.

Every namespace, link and process a run creates carries the run's suffix and is removed in
`finally` (also on Ctrl-C and SIGTERM); only processes this run started are signalled.
"""
