"""Publishing results, the one rendering layer: every table, summary and model card
(``tables``, ``summaries``, ``composition_tables``, ``demo_markdown``, ``cards``, ``tiny_card``),
plots (``plotting``) and the Hub push/pull CLI (``hub``). Pure functions of plain dicts
(reports, results); never imports the trainer, the evaluation harness or composition."""
