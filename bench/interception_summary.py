#!/usr/bin/env python3
"""Moved: the helpers of the interception rig are sluicegate.benchrig.summary
(`python -m sluicegate.benchrig.summary table OUT`). Kept so that old commands still work;
run it with the python that has sluicegate (.venv/bin/python)."""

import sys

from sluicegate.benchrig.summary import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
