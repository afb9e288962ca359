#!/usr/bin/env python3
"""Train the bundled toy ternary block-diffusion model and export it as GGUF (I2_S).

The entry point of the `toytrain` package next to this file (the recipe: toytrain/cli.py);
`python scripts/train_toy_dlm.py --help` lists the options.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # toytrain (already there when run as a script)
    sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the repository's dlmnumba first

from toytrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
