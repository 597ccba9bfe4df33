"""``python -m dermpipe``: the same as the ``dermpipe`` command."""

from dermpipe.cli import main

raise SystemExit(main())
