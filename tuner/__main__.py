"""`python -m tuner` is `python -m tuner.run`."""
import sys

from tuner.run import main

sys.exit(main())
