"""`python -m protege check PRESET [a.b=value ...]` (also the `protege` command)."""

from protege.cli import main

raise SystemExit(main())
