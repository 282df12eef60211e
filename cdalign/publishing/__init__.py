"""Publishing results: model cards, the Hub push/pull CLI, markdown tables and plots.
Reads reports as plain dicts; never imports the trainer or the evaluation harness."""
