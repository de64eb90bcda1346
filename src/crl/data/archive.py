"""Safe reading of untrusted tar archives (.tar, .tar.gz, .tgz) without extracting to disk.

Every member is validated from its header before any member data is read: absolute paths,
`..` components, links of any kind (symlinks and hardlinks are refused outright, wherever they
point), device/fifo members, and members larger than the per-member cap
(CRL_MAX_MEMBER_BYTES, default 64 MiB; see crl.data.limits) are all refused with a CRLError
naming the member. Reading a set of files streams them, one member in memory at a time.

The whole stream is verified when the archive is opened: after the last member, the
decompressed stream is read to its end, which makes gzip (bz2, xz) check its CRC and length,
and everything after the last member must be the zero-filled end-of-archive marker. A stream
corrupted past some member (tarfile alone stops at the first unreadable header and reports
the members before it, silently dropping the rest) or truncated is therefore a CRLError
naming the archive, never a smaller dataset.
"""
from __future__ import annotations

import ntpath
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from crl.core.errors import CRLError
from crl.data.limits import check_member_size, check_memory

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

# Errors a broken, truncated or non-tar file can raise while tarfile reads it.
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)
_CHUNK = 1 << 20


def is_archive(path: str | os.PathLike) -> bool:
    """True when `path` has a tar suffix this module reads (.tar.gz, .tgz, .tar)."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def safe_member_name(member: tarfile.TarInfo, archive: str) -> str:
    """Validate one member and return its normalised relative name ('' for the root dir).

    Raises CRLError for absolute paths, `..` components, links and special files.
    """
    name = member.name
    if name.startswith(("/", "\\")) or ntpath.splitdrive(name)[0]:
        raise CRLError(
            f"unsafe archive member '{name}' in {archive}: absolute paths are not allowed"
        )
    if "\\" in name:
        raise CRLError(
            f"unsafe archive member '{name}' in {archive}: backslashes are not allowed in paths"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
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


class _NoteStop(tarfile.TarInfo):
    """Header parsing that notes on the TarFile why reading headers stopped: tarfile ends its
    member list at the first zero, unreadable or missing header alike, without saying which."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.crl_stop = e
            raise


class SafeArchive:
    """An open tar archive whose members have all been validated and whose stream was read
    (and checksummed, when compressed) to its end.

    `files`: normalised name -> member for every regular file; `dirs`: normalised folder
    names (explicit folder members plus every parent of a file).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.label = str(path)
        self.files: dict[str, tarfile.TarInfo] = {}
        self.dirs: set[str] = set()
        try:
            self._tar = tarfile.open(self.path, mode="r:*", tarinfo=_NoteStop)  # noqa: SIM115 (closed by close())
        except _READ_ERRORS as e:
            raise CRLError(f"cannot read archive {self.label}: {_open_problem(self.path, e)}; "
                           "expected a tar archive (.tar, or .tar.gz/.tgz)") from None
        try:
            self._scan()
            self._check_end()
            self._add_parents()
        except BaseException:
            self._tar.close()
            raise

    def _scan(self) -> None:
        """Validate the members header by header: a bad one fails before its data is read."""
        try:
            for member in self._tar:
                self._add(member)
        except _READ_ERRORS as e:
            raise CRLError(f"cannot read archive {self.label}: {e}") from e

    def _add(self, m: tarfile.TarInfo) -> None:
        rel = safe_member_name(m, self.label)
        if m.isdir():
            if rel:
                self.dirs.add(rel)
            return
        if not rel:
            raise CRLError(f"unsafe archive member '{m.name}' in {self.label}: a file has no name")
        if rel in self.files or rel in self.dirs:
            raise CRLError(
                f"archive {self.label} lists member '{m.name}' twice; expected unique paths"
            )
        check_member_size(f"archive {self.label}: member '{m.name}'", m.size)
        self.files[rel] = m

    def _check_end(self) -> None:
        """The header scan must have stopped at a zero block (the end-of-archive marker), and
        the rest of the stream must be zeros; reading it to EOF verifies the gzip CRC."""
        stop = getattr(self._tar, "crl_stop", None)
        last = self._tar.members[-1].name if self._tar.members else None
        where = f"after member '{last}'" if last else "before its first member"
        if isinstance(stop, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
            raise CRLError(f"cannot read archive {self.label}: it ends {where} without the "
                           "end-of-archive marker (truncated?)")
        damaged = CRLError(f"cannot read archive {self.label}: it is damaged {where} "
                           "(unreadable data where a member or the end marker should be)")
        if not isinstance(stop, tarfile.EOFHeaderError):
            raise damaged
        try:
            while chunk := self._tar.fileobj.read(_CHUNK):
                if chunk.strip(b"\0"):
                    raise damaged
        except _READ_ERRORS as e:
            raise CRLError(f"cannot read archive {self.label}: {e}") from e

    def _add_parents(self) -> None:
        parents: set[str] = set()
        for rel in [*self.files, *self.dirs]:
            parent = rel.rpartition("/")[0]
            while parent and parent not in parents:
                parents.add(parent)
                parent = parent.rpartition("/")[0]
        self.dirs |= parents
        clash = self.dirs & self.files.keys()
        if clash:
            raise CRLError(
                f"archive {self.label} uses '{sorted(clash)[0]}' as both a file and a folder"
            )

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (name, bytes) for the given file names, in archive order (one forward pass).

        Members are streamed: one member's bytes are held at a time (each within
        CRL_MAX_MEMBER_BYTES and the memory budget), so a caller that decodes each as it
        comes never holds the archive's members all at once.
        """
        wanted = set(names)
        unknown = wanted - self.files.keys()
        if unknown:
            raise CRLError(f"archive {self.label} has no file '{sorted(unknown)[0]}'")
        largest = max((self.files[n].size for n in wanted), default=0)
        check_memory(f"archive {self.label}: its largest member", largest)
        for name in sorted(wanted, key=lambda n: self.files[n].offset):
            yield name, self._read_one(name)

    def _read_one(self, name: str) -> bytes:
        member = self.files[name]
        try:
            fh = self._tar.extractfile(member)
            data = fh.read() if fh is not None else b""
        except _READ_ERRORS as e:
            raise CRLError(f"cannot read archive {self.label}: member '{name}': {e}") from e
        if len(data) != member.size:
            raise CRLError(f"cannot read archive {self.label}: member '{name}' holds "
                           f"{len(data)} bytes; expected {member.size}")
        return data

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> SafeArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_problem(path: Path, error: BaseException) -> str:
    """Why tarfile could not open `path`, in a few words (tarfile lists one line per method)."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
    except OSError as e:
        return e.strerror or type(e).__name__
    if isinstance(error, OSError) and not isinstance(error, tarfile.TarError):
        return error.strerror or str(error).splitlines()[0]
    return "it is not a tar archive, plain or compressed (gzip, bzip2, xz)"


def open_archive(path: str | os.PathLike) -> SafeArchive:
    """Open and validate an untrusted tar archive; use as a context manager."""
    return SafeArchive(path)
