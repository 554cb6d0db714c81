"""``python -m monai_gradicon <command>``: see :mod:`monai_gradicon.cli`."""

from monai_gradicon.cli import main

raise SystemExit(main())
