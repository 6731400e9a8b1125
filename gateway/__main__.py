"""``python -m gateway`` is ``keygate``."""

from gateway.cli import main

raise SystemExit(main())
