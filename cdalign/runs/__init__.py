"""Run infrastructure: what a run writes and how (files and folders written whole or not
at all, checkpoint folders, the run folder's markers, refusal, overwrite, recorded config and
``log.jsonl``, the typed run report), the processes it runs on (sharding, collectives,
shutdown, stopping on a signal), and what it caches between runs (reward statistics, keyed by
fingerprints). No math of METHOD.md lives here (that is :mod:`cdalign.core`); nothing here
knows a trainer, a composer or the evaluation harness: a caller says which fields a resume
compares and which may differ."""
