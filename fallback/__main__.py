"""`python -m fallback` runs the CLI."""

from fallback.cli import main

raise SystemExit(main())
