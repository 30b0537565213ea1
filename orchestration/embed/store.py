"""The output folder of an embedding job: files appear whole or not at all, in any store.

`--out` is a local path or an fsspec URL (``s3://bucket/emb/``, ``gs://...``, ``file://``).
A local file is written under a temporary name in the same folder, fsynced and
``os.replace``d into place; an object store publishes an object only when its upload
completes (a single PUT, or a multipart upload's completion), so a process killed mid-write
leaves no partial object. That is what makes a part file the unit of exactly-once output:
it exists whole, or its shard is embedded again.

Every failure to reach the folder becomes `OutputUnreachable`, naming the URL with any
credentials masked.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

from sslstream.orchestration.errors import UserError
from sslstream.orchestration.runtime.runstore import TEMP_PREFIX, write_atomic_local
from sslstream.pipelines.shards.masking import mask
from sslstream.pipelines.shards.storage import classify, get_fs


class OutputUnreachable(UserError):
    """``--out`` cannot be listed, written or read: missing bucket, refused credentials, a
    file where a folder should be. ``url`` is masked."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class OutputStore:
    """A folder of whole files under ``url`` (see the module docstring)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url.rstrip("/") or url
        self.shown = mask(self.url)
        # credentials written into the URL (scheme://user:secret@...): never in a message,
        # also where a library quotes them in another form (e.g. as a "bucket name")
        scheme, sep, rest = self.url.partition("://")
        userinfo = rest.split("/", 1)[0].rpartition("@")[0] if sep else ""
        self._secrets = [x for x in (userinfo, *userinfo.split(":")) if len(x) >= 3]
        try:
            self.fs, self.root = get_fs(self.url, storage_options)
        except Exception as e:  # a missing backend, bad options
            raise self._error("cannot open", e) from None
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                else (self.fs.protocol,))

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def mask(self, text: str) -> str:
        text = mask(text)
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def _error(self, what: str, e: BaseException) -> OutputUnreachable:
        kind = classify(e)
        why = {"denied": "access refused (check the credentials and data.storage_options)",
               "not_found": "does not exist"}.get(kind, f"{type(e).__name__}: {str(e)[:200]}")
        return OutputUnreachable(self.mask(f"--out {self.shown}: {what}: {why}"), self.shown)

    def probe(self) -> None:
        """Create the folder if needed, then write, read back and delete a small object:
        proves the store is reachable and writable before any embedding is computed."""
        name = f"_probe-{uuid.uuid4().hex[:12]}"
        try:
            if self.local:
                if Path(self.root).exists() and not Path(self.root).is_dir():
                    raise NotADirectoryError(self.root)
                Path(self.root).mkdir(parents=True, exist_ok=True)
            self.write_bytes(name, b"sslstream")
            if self.read_bytes(name) != b"sslstream":
                raise OSError("the probe object read back different bytes")
        except OutputUnreachable:
            raise
        except Exception as e:
            raise self._error("not writable", e) from None
        finally:
            with contextlib.suppress(Exception):  # best effort: a leftover probe is a few bytes
                self.fs.rm(self._path(name))

    def names(self) -> list[str]:
        """Names of the files directly in the folder ([] when it does not exist yet)."""
        try:
            if not self.fs.exists(self.root):
                return []
            self.fs.invalidate_cache(self.root)
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except Exception as e:
            raise self._error("cannot list", e) from None

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes, None when it does not exist."""
        try:
            with self.fs.open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except Exception as e:
            if classify(e) == "not_found":
                return None
            raise self._error(f"cannot read {name}", e) from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Publish ``data`` as ``name`` in one step (replacing an older file of that name)."""
        try:
            if self.local:
                write_atomic_local(Path(self.root), name, data)
            else:
                with self.fs.open(self._path(name), "wb") as f:
                    f.write(data)
        except Exception as e:
            raise self._error(f"cannot write {name}", e) from None

    def put_file(self, local: Path, name: str) -> None:
        self.write_bytes(name, local.read_bytes())

    def remove(self, names: list[str]) -> None:
        for name in names:
            try:
                self.fs.rm(self._path(name))
            except FileNotFoundError:
                pass
            except Exception as e:
                raise self._error(f"cannot remove {name}", e) from None

    def remove_stale_temp(self) -> int:
        """Local temporary files a killed run left behind (object stores leave none)."""
        if not self.local or not Path(self.root).is_dir():
            return 0
        stale = [p for p in Path(self.root).iterdir() if p.name.startswith(TEMP_PREFIX)]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)


def publish_file(local: Path, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy one local file to ``url`` (its folder is an `OutputStore`), whole or not at all."""
    folder, _, name = url.rstrip("/").rpartition("/")
    if not name:
        raise OutputUnreachable(f"{mask(url)}: not a file name", mask(url))
    OutputStore(folder or ".", storage_options).put_file(local, name)
