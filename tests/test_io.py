"""binsparse_kernels._io.atomic_write: the file it leaves is the one a plain write would, or the old one."""

from __future__ import annotations

import os
import stat

import pytest

from binsparse_kernels._io import atomic_write, stale_temporaries


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_file_has_the_mode_a_plain_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.json", lambda tmp: open(tmp, "w").write("{}"))
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "a.json").read_text() == "{}"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    path.write_text("old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and stale_temporaries(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
