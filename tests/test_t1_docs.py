"""Tier 1: what documents the command stays true to it: kexecfs(1) and the bash
completion are generated from the parser and committed (a stale one fails here), cover
every subcommand and option, and render without warnings; kexecfs(7) names every file
of the tree, every status field and every ioctl."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT

from kexecfs import abi
from kexecfs.cli import _parser
from kexecfs.fs.nodes import NODES
from kexecfs.report import STATUS_FIELDS

MAN1 = ROOT / "man/man1/kexecfs.1"
MAN7 = ROOT / "man/man7/kexecfs.7"
COMPLETION = ROOT / "completion/kexecfs"
needs_groff = pytest.mark.skipif(not shutil.which("groff"), reason="groff is missing (Debian package groff-base, "
                                 "which man-db brings; `make test` installs it)")


def leaf_commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """{"image show": [its option strings], ...}, read from the parser itself."""
    found: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found |= leaf_commands(child, (*words, name)) or {
                    " ".join((*words, name)): [o for a in child._actions for o in a.option_strings
                                               if not isinstance(a, argparse._HelpAction)]}
    return found


COMMANDS = leaf_commands(_parser())


def render(page: Path) -> str:
    """The page as man shows it, on lines long enough never to wrap or hyphenate."""
    r = subprocess.run(["groff", "-t", "-man", "-Tascii", "-rLL=4000n", "-rHY=0", "-P-cbou", str(page)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_generated_pages_are_what_the_parser_gives() -> None:
    """man/man1/kexecfs.1 and completion/kexecfs are committed: `make man` after a change
    of kexecfs/cli.py, or this fails."""
    r = subprocess.run([sys.executable, str(ROOT / "tools/cli-docs.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@needs_groff
@pytest.mark.parametrize("page", [MAN1, MAN7], ids=["kexecfs.1", "kexecfs.7"])
def test_pages_render_without_warnings(page: Path) -> None:
    r = subprocess.run(["groff", "-t", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@needs_groff
def test_kexecfs_1_has_every_command_and_option() -> None:
    text = render(MAN1)
    sections = re.split(r"(?m)^   (\S.*)$", text.split("\nCOMMANDS\n", 1)[1].split("\nMOUNTING\n", 1)[0])
    described = dict(zip(sections[1::2], sections[2::2]))
    assert set(described) == set(COMMANDS), "a command without its section, or a section without a command"
    for words, options in COMMANDS.items():
        assert re.search(rf"(?m)^       kexecfs .*\b{words}\b", text), f"{words} is not in the SYNOPSIS"
        for option in options:
            assert re.search(rf"(?m)^       {re.escape(option)}\b", described[words]) or \
                f", {option}" in described[words], f"kexecfs {words} {option} is not described"
    assert "--mount MOUNTPOINT" in text


@needs_groff
def test_kexecfs_7_has_every_file_field_and_ioctl() -> None:
    text = render(MAN7)
    for node in NODES:
        assert re.search(rf"(?m)^ +(\|-- |`-- ){re.escape(node.name)}/?\s", text), f"{node.name} is not in THE TREE"
    for field in STATUS_FIELDS:
        assert re.search(rf"\b{field}\b", text), f"status field {field} is not described"
    for state in abi.STATE_NUMBERS:
        assert re.search(rf"\b{state}\b", text), f"the state {state} is not described"
    for event in abi.EVENTS:
        assert re.search(rf"(?m)^ +{event} +\S", text), f"{event} is not in the table of events"
    for command in abi.COMMANDS.values():
        assert f"{command.name} ({command.number:#010x})" in text, command.name
    for session in abi.SESSION_COMMANDS.values():
        assert re.search(rf"{session.name}\W+\(?{session.number:#06x}", text), session.name
    for xattr in ("user.kexecfs.pos", "user.kexecfs.seals", "user.kexecfs.kind", "user.kexecfs.problem"):
        assert xattr in text


def complete(*words: str, mount: Path | None = None) -> list[str]:
    """What bash completes for ``kexecfs WORDS...`` (the last word is the one being typed)."""
    line = ["kexecfs", *(["--mount", str(mount)] if mount else []), *words]
    script = (f"source {COMPLETION}\nCOMP_WORDS=({' '.join(_quote(w) for w in line)})\n"
              f"COMP_CWORD={len(line) - 1}\n_kexecfs\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    r = subprocess.run(["bash", "--norc", "--noprofile"], input=script, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not r.stderr, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def test_completion_offers_every_command_and_option(tmp_path: Path) -> None:
    assert set(complete("")) >= {words.split()[0] for words in COMMANDS} | {"--mount"}
    assert complete("st") == ["status"]
    assert complete("image", "") == ["show", "verify"]
    for words, options in COMMANDS.items():
        assert set(complete(*words.split(), "-")) == {*options, "--help"}, words
    assert complete("event", "") == list(abi.EVENTS)
    assert complete("mount", "/mnt", "--log-target", "") == ["auto", "stderr", "journal", "syslog"]
    assert complete("check", "--q") == ["--quiet"]


def test_completion_of_instance_names_reads_the_mount(tmp_path: Path) -> None:
    for name in ("db", "dns", "vm"):
        (tmp_path / name).mkdir()
    (tmp_path / "state").touch()
    assert complete("preserve", "--instance", "d", mount=tmp_path) == ["db", "dns"]
    assert complete("image", "show", str(tmp_path / "st")) == [str(tmp_path / "state")]
