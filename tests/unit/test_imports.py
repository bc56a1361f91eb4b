"""The proxy's import path stays lean (DESIGN.md: 40 MiB RSS per sidecar leaves no room).

`meshlet proxy` shares the `meshlet` CLI with the control-plane commands; loading the CLI and
the static proxy must not drag in pydantic, grpc, the control plane or the API schemas.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = (
    "pydantic",
    "grpc",
    "meshlet.api",
    "meshlet.control",
    "sqlite3",
    "prometheus_client",
    "urllib.request",
    "http.client",
    "jwt",  # PyJWT (and cryptography's RSA): only once a jwt_authn filter is compiled
)


def test_the_static_proxy_path_imports_nothing_heavy():
    code = (
        "import sys, json\n"
        "import meshlet.cli.main, meshlet.cli.proxy\n"
        "import meshlet.proxy.bootstrap, meshlet.proxy.config, meshlet.proxy.server\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == []
