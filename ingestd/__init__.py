"""ingestd: an HTTP ingestion daemon that batches JSON telemetry into S3 (or a directory).

Data flow, module by module: app (HTTP) -> validation -> records -> jobqueue (bounded
multiprocessing queue) -> uploader (batching -> sinks / s3sink), with the supervisor owning
processes and signals, spool keeping what is not yet stored, and health reading the board.
"""

__version__ = "0.1.0"
