"""Safe reading of untrusted tar archives (.tar, .tar.gz, .tgz) without extracting to disk.

Every member is validated before any file is read: absolute paths, `..` components, links
of any kind (symlinks and hardlinks are refused outright, wherever they point), and
device/fifo members are all refused with a CRLError naming the member.
"""
from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Iterator

from crl.errors import CRLError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

# Errors a broken, truncated or non-tar file can raise while tarfile reads it.
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def is_archive(path: str | os.PathLike) -> bool:
    """True when `path` has a tar suffix this module reads (.tar.gz, .tgz, .tar)."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def safe_member_name(member: tarfile.TarInfo, archive: str) -> str:
    """Validate one member and return its normalised relative name ('' for the root dir).

    Raises CRLError for absolute paths, `..` components, links and special files.
    """
    name = member.name
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        raise CRLError(
            f"unsafe archive member '{name}' in {archive}: absolute paths are not allowed"
        )
    if "\\" in name:
        raise CRLError(
            f"unsafe archive member '{name}' in {archive}: backslashes are not allowed in paths"
        )
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if ".." in parts:
        raise CRLError(
            f"unsafe archive member '{name}' in {archive}: paths must stay inside the archive"
        )
    if member.issym() or member.islnk():
        raise CRLError(
            f"unsafe archive member '{name}' in {archive}: links are not allowed "
            f"(points to '{member.linkname}')"
        )
    if not (member.isfile() or member.isdir()):
        raise CRLError(
            f"unsafe archive member '{name}' in {archive}: only regular files and folders "
            "are allowed (device, fifo or other special member)"
        )
    return "/".join(parts)


class SafeArchive:
    """An open tar archive whose members have all been validated.

    `files`: normalised name -> member for every regular file; `dirs`: normalised folder
    names (explicit folder members plus every parent of a file).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.label = str(path)
        try:
            self._tar = tarfile.open(self.path, mode="r:*")
        except _READ_ERRORS as e:
            raise CRLError(f"cannot read archive {self.label}: {e}") from e
        try:
            members = self._tar.getmembers()
        except _READ_ERRORS as e:
            self._tar.close()
            raise CRLError(f"cannot read archive {self.label}: {e}") from e
        self.files: dict[str, tarfile.TarInfo] = {}
        self.dirs: set[str] = set()
        try:
            for m in members:
                rel = safe_member_name(m, self.label)
                if m.isdir():
                    if rel:
                        self.dirs.add(rel)
                    continue
                if not rel:
                    raise CRLError(f"unsafe archive member '{m.name}' in {self.label}: a file has no name")
                if rel in self.files or rel in self.dirs:
                    raise CRLError(
                        f"archive {self.label} lists member '{m.name}' twice; expected unique paths"
                    )
                self.files[rel] = m
        except CRLError:
            self._tar.close()
            raise
        for rel in self.files:
            parent = PurePosixPath(rel).parent
            while str(parent) != ".":
                self.dirs.add(str(parent))
                parent = parent.parent
        clash = self.dirs & self.files.keys()
        if clash:
            self._tar.close()
            raise CRLError(
                f"archive {self.label} uses '{sorted(clash)[0]}' as both a file and a folder"
            )

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (name, bytes) for the given file names, in archive order (one forward pass)."""
        wanted = set(names)
        unknown = wanted - self.files.keys()
        if unknown:
            raise CRLError(f"archive {self.label} has no file '{sorted(unknown)[0]}'")
        ordered = sorted(wanted, key=lambda n: self.files[n].offset)
        for name in ordered:
            try:
                fh = self._tar.extractfile(self.files[name])
                data = fh.read() if fh is not None else b""
            except _READ_ERRORS as e:
                raise CRLError(f"cannot read archive {self.label}: member '{name}': {e}") from e
            yield name, data

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "SafeArchive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_archive(path: str | os.PathLike) -> SafeArchive:
    """Open and validate an untrusted tar archive; use as a context manager."""
    return SafeArchive(path)
