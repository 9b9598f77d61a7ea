"""Input files read with limits, output paths checked before work starts.

Every text input (a config, a data file, a JSONL given to `diagnose` or `eval --responses`) goes through
`check_input` first: it must be a regular file (not a directory, a pipe or a device such as /dev/zero) and,
where the whole file is read into memory, no larger than a stated limit. Lines are read with a bound of their
own, so one absurd line fails fast instead of filling memory, and bytes that are not UTF-8 are an error that
names the file and line. Output paths are checked by kind (file or directory) and for write permission
before any model loads, so a bad `--out` costs seconds, not a training run. Every output file is written
through `atomic_path`: a kill leaves the old file or the new one, never half of one.

    for no, text, ends_line in iter_lines(path, max_line_bytes=64 * MIB, key="data.max_line_mb"):
        ...
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stableopd.errors import UserError

MIB = 1 << 20


def _describe(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_input(path: Path, what: str, *, max_bytes: int | None = None, key: str | None = None) -> int:
    """The size of `path` after checking that it is a readable regular file within `max_bytes`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        raise UserError(f"{what} '{path}' cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} '{path}' is {_describe(st.st_mode)}, not a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} '{path}' is not readable (permission denied)")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UserError(
            f"{what} '{path}' is {st.st_size / MIB:,.0f} MiB, over the {max_bytes / MIB:,.0f} MiB "
            f"limit{f'; raise {key} to read it' if key else ''}"
        )
    return st.st_size


def read_text(path: Path, what: str, *, max_bytes: int, key: str | None = None) -> str:
    """The whole of a small UTF-8 file (a config, a JSON list)."""
    check_input(path, what, max_bytes=max_bytes, key=key)
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{what} '{path}' is not UTF-8 text (line {line}); save it as UTF-8") from None


def iter_lines(
    path: Path,
    *,
    max_line_bytes: int,
    key: str,
    what: str = "file",
    errors: str = "strict",
    max_bytes: int | None = None,
    size_key: str | None = None,
) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, ends with a newline) for each line, reading at most `max_line_bytes` per line,
    after `check_input(path, what, max_bytes=max_bytes, key=size_key)`.

    With errors="strict" bytes that are not UTF-8 are an error naming the line; with "replace" they become
    U+FFFD (diagnose reads another tool's logs and reports what it can)."""
    check_input(path, what, max_bytes=max_bytes, key=size_key)
    with open(path, "rb") as fh:
        for no, raw in enumerate(iter(lambda: fh.readline(max_line_bytes + 1), b""), start=1):
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise UserError(
                    f"{path}:{no}: line longer than {max_line_bytes / MIB:g} MiB; "
                    f"raise {key} if the file is right"
                )
            try:
                text = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{path}:{no}: not UTF-8 text (byte {exc.start + 1} of the line); save the file as UTF-8"
                ) from None
            yield no, text, text.endswith("\n")


def _unwritable(folder: Path) -> str | None:
    """None if a file can be created in `folder`, else the reason (what the OS said)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    os.unlink(probe)
    return None


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, what: str) -> None:
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise UserError(f"{what} '{path}' cannot be created: '{base}' is a file")
    if (why := _unwritable(base)) is not None:
        if base == path.absolute():
            raise UserError(f"{what} '{path}' is not writable: {why}")
        raise UserError(f"{what} '{path}' cannot be created: '{base}' is not writable ({why})")


def check_output_dir(path: Path, what: str) -> None:
    """`path` is (or can be created as) a writable directory; nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} '{path}' is a file, not a directory; pass a directory")
    _check_creatable(path, what)


def check_output_file(path: Path, what: str) -> None:
    """`path` is (or can be created as) a writable file: not a directory, its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a directory; pass a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} '{path}' is not writable (permission denied)")
    base = _existing_ancestor(path.absolute().parent)
    if not base.is_dir():
        raise UserError(f"{what} '{path}' cannot be created: '{base}' is a file")
    if (why := _unwritable(base)) is not None:
        raise UserError(f"{what} '{path}' cannot be written: '{base}' is not writable ({why})")


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """Refuse to start when the disk under `folder` holds less than `need_bytes` free."""
    try:
        free = shutil.disk_usage(_existing_ancestor(Path(folder))).free
    except OSError:
        return  # unknown: the write itself will say
    if free < need_bytes:
        raise UserError(
            f"{what} needs about {need_bytes / MIB:,.0f} MiB and '{folder}' has "
            f"{free / MIB:,.0f} MiB free; free some space or choose another --out"
        )


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary name next to `path` (ending in `suffix`, for writers that go by the extension) to write;
    it replaces `path` when the block ends and is removed if the block raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl_atomic(path: Path, rows: Iterable[dict], *, ensure_ascii: bool = False) -> None:
    """One JSON object a line, streamed to the temporary file."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")
