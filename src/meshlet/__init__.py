"""meshlet: a service mesh in Python.

How the pieces build on each other (see docs and ``../shared/DESIGN.md``):

* ``meshlet.errors`` -- the small exception family every layer raises and the CLI prints.
* ``meshlet.proxy`` -- the data plane. Envoy v3 resources (from a bootstrap file, later from an
  ADS stream) are compiled into immutable tables; an asyncio shell moves bytes and asks pure
  decision code (routing, balancing, retries, outlier ejection, faults) what to do.
* ``meshlet.cli`` -- the ``meshlet`` command; it translates errors into exit codes once.
"""

__version__ = "0.1.0"
