"""`python -m rewards score ...`: see rewards/cli.py."""

from .cli import main

raise SystemExit(main())
