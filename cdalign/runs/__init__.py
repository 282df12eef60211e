"""Run infrastructure: what a run writes and how (files and folders written whole or not
at all, checkpoint folders), the processes it runs on (sharding, collectives, shutdown),
and what it caches between runs (reward statistics, keyed by fingerprints). No math of
METHOD.md lives here (that is :mod:`cdalign.core`); nothing here knows a trainer, a
composer or the evaluation harness."""
