"""Stored audits: one ``<name>.audit.json`` per audit under the audit root, written whole to a temporary
file (``.convscope-tmp-<pid>-<token>.audit.tmp``) and renamed over the name, so a reader sees the old
report or the new one, never a part. One run per name at a time in this server.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from convscope_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
SUFFIX = ".audit.json"


def check_name(name: str, field: str) -> str:
    if not NAME.match(name or ""):
        raise InvalidArgument(field, f"{name!r}: an audit name is 1-128 letters, digits, '.', '_' or '-', "
                              "not starting with '.' or '-'")
    return name


@dataclass(frozen=True)
class StoredAudit:
    name: str
    report: dict
    file_bytes: int


class AuditStore:
    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path:
        return self.root / f"{name}{SUFFIX}"

    def _require_root(self) -> Path:
        if self.root is None:
            raise FailedPrecondition("this server has no audit root (--audit-root)")
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def names(self) -> list[str]:
        if self.root is None or not self.root.is_dir():
            return []
        return sorted(p.name[: -len(SUFFIX)] for p in self.root.iterdir()
                      if p.name.endswith(SUFFIX) and p.is_file() and NAME.match(p.name[: -len(SUFFIX)]))

    def begin(self, name: str, overwrite: bool, field: str = "spec.name") -> None:
        """Reserve ``name`` for a run; refused while another run of it goes on, or when it exists and
        ``overwrite`` is not set."""
        check_name(name, field)
        self._require_root()
        with self._lock:
            if name in self._running:
                raise AlreadyExists(f"{field}: audit {name!r} is being run by another call")
            if self._path(name).exists() and not overwrite:
                raise AlreadyExists(f"{field}: audit {name!r} exists; set overwrite to replace it")
            self._running.add(name)

    def release(self, name: str) -> None:
        with self._lock:
            self._running.discard(name)

    def publish(self, name: str, report: dict) -> StoredAudit:
        """Write ``report`` as ``name``'s audit.json atomically (the run that reserved the name releases it)."""
        root = self._require_root()
        data = json.dumps(report, allow_nan=False, indent=1).encode()
        temporary = root / f".convscope-tmp-{os.getpid()}-{secrets.token_hex(8)}.audit.tmp"
        try:
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self._path(name))
        finally:
            temporary.unlink(missing_ok=True)
        return StoredAudit(name, report, len(data))

    def get(self, name: str, field: str = "name") -> StoredAudit:
        check_name(name, field)
        path = self._path(name) if self.root else None
        if path is None or not path.is_file():
            raise NotFound(field, "audit", name, self.names())
        data = path.read_bytes()
        try:
            report = json.loads(data)
        except ValueError as error:
            raise FailedPrecondition(f"{field}: audit {name!r} cannot be read: {error}") from None
        return StoredAudit(name, report, len(data))

    def delete(self, name: str, field: str = "name") -> None:
        check_name(name, field)
        with self._lock:
            if name in self._running:
                raise FailedPrecondition(f"{field}: audit {name!r} is being run; cancel that call first")
            path = self._path(name) if self.root else None
            if path is None or not path.is_file():
                raise NotFound(field, "audit", name, self.names())
            path.unlink()
