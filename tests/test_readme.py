"""Every command that README.md and docs/*.md show parses: its entry point exists, `--help`
answers, and each `--flag` it names is one of that parser's options.

A command is a line of a fenced code block (in a `text` or `console` block only the lines
that start with `$ `), continued over trailing backslashes. Those naming an entry point are
checked: `python -m fastres.<module>`, `python scripts/<x>.py`, `python bench/<x>.py`,
`torchrun ... -m fastres.<module>` and `fastres <subcommand>`. Their argv is parsed by the
entry point's own parser, which `main()` builds: `argparse.ArgumentParser.parse_args` is
patched to parse for real and then stop, so no entry point does any work. Inline code spans
(`python -m fastres.evaluate RUN_DIR [--data PATH]`) hold placeholders, not argv, so only
their flags are checked. Nothing here trains or reads data.
"""

from __future__ import annotations

import argparse
import bisect
import importlib
import importlib.util
import itertools
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from fastres.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBCOMMANDS = {"bench": "bench/throughput.py", "reproduce": "scripts/reproduce.py"}  # `fastres X`: else fastres.X
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    entry: str  # "fastres.train", "scripts/reproduce.py", ...
    argv: tuple[str, ...]
    inline: bool  # from an inline code span: placeholders, so flags only

    def __str__(self) -> str:
        return f"{self.where}: {self.entry} {shlex.join(self.argv)}"


def code_lines(text: str) -> Iterator[tuple[int, str, str, bool]]:
    """(line number, the command's text, block language, inline) for every command-like text:
    fenced blocks' lines (prompted ones only in text/console blocks), and inline code spans,
    which may run over a line break inside a paragraph."""
    fence: str | None = None
    pending, start = "", 0
    paragraph: list[tuple[int, str]] = []
    for number, line in enumerate([*text.splitlines(), ""], 1):
        stripped = line.strip()
        if fence is None and (not stripped or stripped.startswith("```")) and paragraph:
            joined = " ".join(part for _, part in paragraph)
            starts = list(itertools.accumulate((len(part) + 1 for _, part in paragraph[:-1]), initial=0))
            for match in re.finditer(r"`([^`]+)`", joined):
                number_of_span = paragraph[bisect.bisect_right(starts, match.start()) - 1][0]
                yield number_of_span, match.group(1), "", True
            paragraph = []
        if stripped.startswith("```"):
            fence = None if fence is not None else (stripped[3:].strip() or "bash")
            pending = ""
            continue
        if fence is None:
            if stripped:
                paragraph.append((number, stripped))
            continue
        if not pending:
            start = number
        pending += stripped.removesuffix("\\") + " "
        if stripped.endswith("\\"):
            continue
        command, pending = pending.strip(), ""
        if fence in ("text", "console"):
            if not command.startswith("$ "):
                continue
            command = command[2:]
        yield start, command, fence, False


def split_commands(line: str) -> Iterator[list[str]]:
    """The simple commands of a shell line, as argv lists: split at ; && || | &, comments
    dropped, the brackets of optional parts (`[--loader dali]`) removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: prose in a code span, not a command
        return
    current: list[str] = []
    for token in tokens:
        if token in SHELL_OPERATORS:
            if current:
                yield current
            current = []
            continue
        token = token.strip("[]")
        if token:
            current.append(token)
    if current:
        yield current


def entry_point(argv: list[str]) -> tuple[str, list[str]] | None:
    """(entry point, its argv) when `argv` runs one of fastres' entry points, else None."""
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):  # VAR=value cmd ...
        argv = argv[1:]
    if not argv:
        return None
    program, rest = Path(argv[0]).name, argv[1:]
    if program == "torchrun":
        if "-m" not in rest:
            return None
        rest = rest[rest.index("-m"):]
        program = "python"
    if program == "fastres":
        return subcommand(rest)
    if not re.fullmatch(r"python3?(\.\d+)?", program) or not rest:
        return None
    if rest[:2] == ["-m", "fastres"]:
        return subcommand(rest[2:])
    if rest[0] == "-m" and len(rest) > 1 and rest[1].startswith("fastres."):
        return rest[1], rest[2:]
    if re.fullmatch(r"(scripts|bench)/\w+\.py", rest[0]):
        return rest[0], rest[1:]
    return None


def subcommand(rest: list[str]) -> tuple[str, list[str]]:
    """`fastres SUB ...` and `python -m fastres SUB ...`: the module SUB names (bare: "fastres")."""
    if not rest or rest[0].startswith("-"):
        return "fastres", rest
    return SUBCOMMANDS.get(rest[0], f"fastres.{rest[0]}"), rest[1:]


def commands_in(text: str, name: str) -> list[Command]:
    found = []
    for number, line, _, inline in code_lines(text):
        for argv in split_commands(line):
            hit = entry_point(argv)
            if hit is not None:
                found.append(Command(f"{name}:{number}", hit[0], tuple(hit[1]), inline))
    return found


def all_commands() -> list[Command]:
    return [c for path in DOCUMENTS for c in commands_in(path.read_text(), str(path.relative_to(ROOT)))]


@cache
def load(entry: str) -> ModuleType:
    """The module of an entry point: fastres.X imported, scripts/ and bench/ files loaded by path."""
    if entry.startswith("fastres"):
        return importlib.import_module(entry)
    path = ROOT / entry
    if not path.is_file():
        raise FileNotFoundError(f"{entry}: no such script")
    spec = importlib.util.spec_from_file_location(f"_readme_{entry.replace('/', '_')[:-3]}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Parsed(Exception):
    """Raised by the patched parse_args: main() stops there, before any work."""

    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace | None) -> None:
        super().__init__("parsed")
        self.parser, self.namespace = parser, namespace


def run_parser(entry: str, argv: list[str] | None) -> Parsed:
    """Run `entry`'s main() up to its argument parsing and no further: with `argv`, the parser
    parses it for real (a bad command raises as it would on the command line); with None, the
    parser is caught before it parses anything."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self: argparse.ArgumentParser, args: list[str] | None = None,
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        raise Parsed(self, None if argv is None else original(self, args, namespace))

    main: Callable[[list[str]], int] = load(entry).main
    with pytest.MonkeyPatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        try:
            main([] if argv is None else argv)
        except Parsed as parsed:
            return parsed
    raise AssertionError(f"{entry}: main() returned without parsing its arguments")


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and of its subcommands' parsers."""
    found: set[str] = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


def flags(argv: tuple[str, ...]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if re.match(r"--[A-Za-z]", a)]


def check(command: Command) -> list[str]:
    """What is wrong with `command`: nothing when it parses and names only real flags. An
    abbreviation argparse would accept (`--amp-d`) is wrong too: the documents spell flags out."""
    try:
        if command.inline:
            parser = run_parser(command.entry, None).parser
        else:
            parser = run_parser(command.entry, list(command.argv)).parser
    except (FileNotFoundError, ModuleNotFoundError) as e:
        return [f"no such entry point: {e}"]
    except (UsageError, SystemExit) as e:
        return [f"does not parse: {e}"]
    known = option_strings(parser)
    return [f"{flag} is not an option of {command.entry}" for flag in flags(command.argv) if flag not in known]


COMMANDS = all_commands()
ENTRIES = sorted({c.entry for c in COMMANDS if c.entry != "fastres"})


def test_the_documents_show_commands() -> None:
    """The extraction finds the README's commands (a broken extraction would check nothing)."""
    readme = [c for c in COMMANDS if c.where.startswith("README.md") and not c.inline]
    assert {"fastres.train", "fastres.evaluate", "fastres.export", "fastres.predict", "fastres.report",
            "scripts/reproduce.py"} <= {c.entry for c in readme}
    assert any("--resume" in c.argv for c in readme)


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_point_answers_help(entry: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_parser(entry, ["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.entry != "fastres"], ids=str)
def test_every_documented_command_parses(command: Command, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(command) == [], str(command)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_between_the_documents_resolves(document: Path) -> None:
    """Everything the README moved into docs/ is findable: each relative link names a file
    that exists, and each #anchor a heading of that file."""
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        name, _, anchor = target.partition("#")
        path = (document.parent / name).resolve() if name else document
        if not path.exists() or (anchor and anchor not in anchors(path)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("markdown, expected", [
    ("```bash\npython -m fastres.train resnet20 --no-such-flag 3\n```\n", "does not parse"),
    ("```bash\npython -m fastres.train resnet20 --amp-d bf16\n```\n", "--amp-d is not an option"),  # abbreviated
    ("```text\n$ python -m fastres.evaluate RUN --data d \\\n    --per-clas\nresnet20: 9%\n```\n",
     "--per-clas is not an option"),
    ("```bash\nmkdir x && python scripts/reproduce.py --scales 0.1  # quick\n```\n", "does not parse"),
    ("```bash\nPYTHONUNBUFFERED=1 python3 scripts/gpu_check.py OUT\n```\n", "does not parse"),  # --data required
    ("```bash\ntorchrun --nproc_per_node=2 -m fastres.train resnet110 --amp --channels-lst\n```\n",
     "does not parse"),
    ("Run `python -m fastres.predict WEIGHTS IMAGE... [--topk K]`.\n", "--topk is not an option"),
    ("Run `python -m fastres.predict WEIGHTS\nIMAGE... --topp 2`, over a line break.\n", "--topp is not an option"),
    ("```bash\npython bench/nothing.py --x\n```\n", "no such entry point"),
    ("```bash\npython -m fastres.nothing\n```\n", "no such entry point"),
    ("```bash\npython -m fastres.evaluate RUN_DIR [--per-class] --json out.json\n```\n", None),
])
def test_the_check_fails_on_a_wrong_command(markdown: str, expected: str | None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The check is honest: a command naming a flag that does not exist fails it."""
    found = commands_in(markdown, "doc.md")
    assert len(found) == 1, found
    problems = check(found[0])
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems
