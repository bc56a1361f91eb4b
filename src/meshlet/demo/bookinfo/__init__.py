"""The Bookinfo services: productpage, details, reviews (v1, v2, v3) and ratings.

Run one with ``python -m meshlet.demo.bookinfo <service>`` (see ``__main__``). How they build
on each other: ``service`` turns HTTP into ``Request``/``Reply`` values and back and makes the
upstream calls; ``propagation`` picks the headers each service passes on; ``details``,
``ratings``, ``reviews`` and ``productpage`` are the services as ``App``s; ``page`` renders
productpage's HTML. Standard library only.
"""
