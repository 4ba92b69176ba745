#!/usr/bin/env python3
"""Launch one p2pfm node: ``python node.py --config node.toml [--resume]``.

The same as ``p2pfm node --config node.toml``; see docs/node.md.
"""

import sys

from p2pfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["node", *sys.argv[1:]]))
