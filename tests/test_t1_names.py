"""Tier 1 (core, no mount): session names and their directories in the tree (docs/sessions.md)."""

from __future__ import annotations

import pytest

from kexecfs.core.errors import KexecfsError
from kexecfs.core.names import check_name, directory_name, session_name


@pytest.mark.parametrize("name, directory", [
    (b"db", "db"), (b"odd name/1", "odd%20name%2F1"), (b".hidden", "%2Ehidden"), (b"state", "%73tate"),
    ("naïve".encode(), "na%C3%AFve"), (b"a%b", "a%25b"), (b"x" * 63, "x" * 63),
])
def test_every_session_name_has_one_directory_and_back(name: bytes, directory: str) -> None:
    assert directory_name(name) == directory
    assert session_name(directory) == name
    check_name(directory)  # the tree takes it


@pytest.mark.parametrize("name", [b"", b"x" * 64, b"nul\0inside"])
def test_names_luo_refuses_are_einval(name: bytes) -> None:
    with pytest.raises(KexecfsError) as exc:
        directory_name(name)
    assert exc.value.errno == 22


@pytest.mark.parametrize("directory", ["my%2", "my%20%61", "%64b", "lower%2f", "sp ace", ".dot", "state"])
def test_only_canonical_escapes_name_instances(directory: str) -> None:
    assert session_name(directory) is None
    with pytest.raises(KexecfsError):
        check_name(directory)
