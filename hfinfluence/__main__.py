"""`python -m hfinfluence` and `accelerate launch -m hfinfluence`: the same as the `hfinfluence` command."""

from .cli import main

raise SystemExit(main())
