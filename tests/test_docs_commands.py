"""Every ``bench`` command the README and the docs/ pages show parses with the real command line: each subcommand
and flag exists and each value is accepted (a renamed flag fails here, not in a reader's shell). The README stays a
five-minute read (at most 350 lines) and every docs/ page it links exists, as does every page a page links."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bench.cli import COMMANDS
from bench.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def words_of(line: str) -> list[list[str]]:
    """A shell line's commands as word lists (quotes honoured, ``#`` comments dropped, split at ``;`` and ``&&``)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split, lex.commenters = True, "#"
    out, words = [], []
    for token in lex:
        if token in (";", "&&", "|", "||"):
            out, words = [*out, words], []
        else:
            words.append(token)
    return [w for w in [*out, words] if w]


def commands(path: Path) -> list[str]:
    """The ``bench ...`` commands of a page's bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", "").splitlines():  # a continuation joins, as the shell does
            for words in words_of(line):
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # VAR=value before the command
                if "bench.cli" in words:
                    words = ["bench", *words[words.index("bench.cli") + 1 :]]
                if words and words[0].endswith("bench") and "..." not in words:
                    out.append(shlex.join(["bench", *words[1:]]))
    return out


CASES = [(p.relative_to(ROOT).as_posix(), c) for p in PAGES for c in commands(p)]


def test_the_pages_show_commands():
    assert len(CASES) >= 40 and {page for page, _ in CASES} >= {"README.md", "docs/ablations.md", "docs/training.md"}


@pytest.mark.parametrize("page,command", CASES, ids=[f"{p}:{c[:60]}" for p, c in CASES])
def test_each_shown_command_parses(page, command):
    parser = build_parser(COMMANDS)
    try:
        parser.parse_args(shlex.split(command)[1:])
    except SystemExit as exit_:
        pytest.fail(f"{page}: `{command}` does not parse (exit {exit_.code})")


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 350
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), f"{page.name} links to a missing page {target}"
