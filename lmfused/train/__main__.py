"""``python -m lmfused.train``."""

from lmfused.train.cli import main

raise SystemExit(main())
