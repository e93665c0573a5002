"""The command line: argparse only. Flags generated from the config dataclasses, one error
printer, one root rule, one resume hint; the commands call study.service and study.engine."""
