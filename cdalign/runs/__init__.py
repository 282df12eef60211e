"""Run infrastructure: run folders, the typed run report, stopping on a signal."""
