"""Data shipped with cdalign and the code that reads it: prompt sets
(:mod:`~cdalign.data.prompt_sets`), the shapes world of the embedded tiny model
(:mod:`~cdalign.data.shapes`), the model-card template and the tiny model's files."""
