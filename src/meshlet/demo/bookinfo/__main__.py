"""``python -m meshlet.demo.bookinfo <service>``: run one Bookinfo service in this process.

Configuration comes from the pod's environment: ``POD_IP`` (bind address, default 127.0.0.1),
``PORT`` (default 9080), ``POD_NAME`` (default the host name), ``SERVICE_VERSION`` (reviews:
v1, v2 or v3; ``--version`` wins), and ``DETAILS_URL``, ``REVIEWS_URL``, ``RATINGS_URL``
(default ``http://<service>:9080``). Outbound calls honour ``HTTP_PROXY`` and ``NO_PROXY``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from meshlet.demo.bookinfo.details import Details
from meshlet.demo.bookinfo.productpage import ProductPage
from meshlet.demo.bookinfo.ratings import Ratings
from meshlet.demo.bookinfo.reviews import FLAVORS, Reviews
from meshlet.demo.bookinfo.service import App, Settings, serve, upstream_url

SERVICES = ("productpage", "details", "reviews", "ratings")


def build_app(service: str, version: str | None, settings: Settings, env: Mapping[str, str]) -> App:
    if service == "productpage":
        return ProductPage(
            details_url=upstream_url(env, "details"),
            reviews_url=upstream_url(env, "reviews"),
            ratings_url=upstream_url(env, "ratings"),
        )
    if service == "details":
        return Details()
    if service == "ratings":
        return Ratings()
    if service == "reviews":
        return Reviews(
            flavor=FLAVORS[version or "v1"],
            podname=settings.pod_name,
            ratings_url=upstream_url(env, "ratings"),
        )
    raise ValueError(f"unknown service {service!r}")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshlet.demo.bookinfo", description="Run one Bookinfo service."
    )
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument(
        "--version",
        choices=sorted(FLAVORS),
        default=None,
        help="the reviews version (default: $SERVICE_VERSION, else v1)",
    )
    args = parser.parse_args(argv)
    version = args.version or env.get("SERVICE_VERSION") or None
    if args.service == "reviews" and version is not None and version not in FLAVORS:
        parser.error(f"SERVICE_VERSION={version!r}: reviews has versions v1, v2, v3")
    try:
        settings = Settings.from_env(env)
    except ValueError:
        parser.error(f"PORT={env.get('PORT')!r} is not a port number")
    try:
        return serve(build_app(args.service, version, settings, env), settings)
    except OSError as e:
        print(
            f"{args.service}: cannot listen on {settings.pod_ip}:{settings.port}: {e}",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
