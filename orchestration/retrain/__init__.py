"""retrain: `sslstream retrain`, safe to call from any scheduler.

    job.py        the decision flow: snapshot -> nothing new? -> lease -> train -> register
    exits.py      exit codes (EXIT_*) and RetrainExit
    champion.py   the registry as retrain sees it (champion, versions by run key, bookkeeping)
    torchrun.py   training under torchrun while this process keeps the lease
    lease.py      Lease: acquire, heartbeat, release, takeover after expiry
    stores.py     lease stores: local file system, S3 (conditional writes), GCS (generations)
    runkey.py     run key = model + snapshot id + config hash

May import: orchestration.train, orchestration.evaluate, orchestration.tracking,
orchestration.schema, orchestration.runtime, orchestration.errors, pipelines, models.
Imported by: orchestration.cli.
"""
