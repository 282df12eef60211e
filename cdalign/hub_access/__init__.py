"""Reading from the Hugging Face Hub, in one place: snapshots of model and dataset repos
with the commit they resolved to, single files (:mod:`~cdalign.hub_access.downloads`), and
reward-model folders fetched file pattern by file pattern
(:mod:`~cdalign.hub_access.model_files`). Imports no other part of cdalign, so data,
models and rewards all read the Hub through it. (Writing to the Hub, model cards and
pushes, is :mod:`cdalign.publishing`.)"""
