"""The demo (``demo/app.py``, also a Hugging Face Space) as a library: the LoRAs a visitor may
pick and the bounds of a request (:mod:`~cdalign.demo.catalog`), what the page computes
(:mod:`~cdalign.demo.engine`: aligned vs base, composition through
:class:`~cdalign.composition.ConstrainedComposer`), the page itself (:mod:`~cdalign.demo.page`,
needs the ``demo`` extra: gradio) and a headless browser that screenshots it
(:mod:`~cdalign.demo.browser`). Importing this package loads none of them."""
