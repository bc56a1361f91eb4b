"""The Bookinfo demo: four small services, their manifests, and the image map that runs them.

* ``meshlet.demo.bookinfo`` holds the services (``python -m meshlet.demo.bookinfo <service>``),
  written with the standard library only so that a pod costs one small process.
* ``manifests/`` holds Kubernetes-shaped manifests mirroring Istio's Bookinfo sample (our own
  text): the services and deployments, the ingress Gateway with its VirtualService, and the
  DestinationRules with every subset Istio's tasks route to.
* ``images.yaml`` maps the container images those manifests name to the commands that run our
  Python services (``meshlet.demo.images`` reads it).
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

MANIFESTS = ("bookinfo.yaml", "gateway.yaml", "destination-rules.yaml")


def manifest(name: str) -> Traversable:
    """One of the shipped manifests (``bookinfo.yaml``, ``gateway.yaml``,
    ``destination-rules.yaml``); read it with ``.read_text()``."""
    if name not in MANIFESTS:
        raise ValueError(f"no demo manifest {name!r}; the demo ships {', '.join(MANIFESTS)}")
    return files(__name__) / "manifests" / name


def image_map() -> Traversable:
    """The shipped image map, ``images.yaml``."""
    return files(__name__) / "images.yaml"
