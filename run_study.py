#!/usr/bin/env python3
"""DIP study service: the entry script. The command line itself is study/cli/ (see
`python run_study.py --help`)."""
import sys

from study.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
