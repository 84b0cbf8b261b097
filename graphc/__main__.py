"""`python -m graphc`: the command line (graphc.tools.cli), as the `graphc` script runs it."""
from graphc.tools.cli import main

raise SystemExit(main())
