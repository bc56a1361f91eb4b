"""``python -m meshlet``: the ``meshlet`` command, for when the script is not on PATH."""

from meshlet.cli.main import main

raise SystemExit(main())
