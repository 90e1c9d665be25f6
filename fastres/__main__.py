"""`fastres COMMAND ...` (or `python -m fastres COMMAND ...`): one entry point for every tool.

Each command is the module a user may also run alone (`python -m fastres.train ...`); it is
imported only once chosen, so `fastres --help` answers without importing torch. `reproduce`
and `bench` live in the checkout (`scripts/`, `bench/`), as `pip install -e .` leaves it.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

# command: (module or checkout script, what it does)
COMMANDS = {
    "train": ("fastres.train", "train a ResNet or plain net with the paper's recipe, or --resume one"),
    "evaluate": ("fastres.evaluate", "test error of a run, a checkpoint or exported weights"),
    "export": ("fastres.export", "a run's weights as a plain state dict and its JSON"),
    "predict": ("fastres.predict", "top-k classes of image files"),
    "report": ("fastres.report", "tables and figures from finished runs"),
    "reproduce": ("scripts/reproduce.py", "the paper's CIFAR-10 table and Fig. 6 from real runs, in one command"),
    "bench": ("bench/throughput.py", "iterations/s side by side with a plain PyTorch baseline"),
    "cache": ("fastres.cache", "the decoded-data cache, listed or cleared"),
}
CHECKOUT = Path(__file__).resolve().parents[1]


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "usage: fastres COMMAND [options]   (fastres COMMAND --help for its options)\n\ncommands:\n" + \
        "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"fastres: error: unknown command {name!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    sys.argv = [f"fastres {name}", *rest]
    if target.endswith(".py"):
        script = CHECKOUT / target
        if not script.is_file():
            print(f"fastres: error: `fastres {name}` runs {target} of a checkout (pip install -e .); "
                  f"{script} is not there", file=sys.stderr)
            return 2
        sys.path.insert(0, str(CHECKOUT))
        runpy.run_path(str(script), run_name="__main__")  # the script exits with its own status
        return 0
    from fastres.cli import run_main

    if name == "train" and ("-h" in rest or "--help" in rest):  # the parser alone: no torch to import
        from fastres.config import build_parser

        return run_main(lambda argv: build_parser().parse_args(argv) and 0, rest)
    return run_main(importlib.import_module(target).main, rest)


if __name__ == "__main__":
    sys.exit(main())
