"""Which commit of a hub dataset a run reads.

A registry entry (or ``data.revision``) names a revision: a commit sha (pinned), a branch or
tag, or nothing (the default branch, ``main``). :func:`resolve_revision` turns a branch into
the commit it points at when the Hugging Face Hub is reachable, so the run reads, records in
its MLflow lineage and keys its data digest on one fixed commit. Offline, or when the Hub
does not answer, the branch name is kept, one warning per repository says so, and the
status is ``unresolved``; nothing fails because of it (opening the dataset is what fails
when its files are neither cached nor downloadable).

:func:`script_only` tells whether a hub repository's files are a loading script without
data files, which ``datasets`` >= 4 refuses to run; :data:`SCRIPT_FIX` names the way out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"
PARQUET_BRANCH = "refs/convert/parquet"
SCRIPT_FIX = (
    f"set data.revision={PARQUET_BRANCH} (the Hub's parquet conversion) or point "
    "data.source at a parquet copy"
)
_COMMIT = re.compile(r"[0-9a-f]{40}")
_DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tar", ".zip", ".txt")
_warned: set[str] = set()

Status = Literal["pinned", "resolved", "unresolved", "local"]


@dataclass(frozen=True)
class Revision:
    """A revision as asked for and what it was resolved to.

    ``requested`` is the registry's (or ``data.revision``'s) value, ``None`` meaning the
    default branch. ``commit`` is the commit sha when known. ``status`` is ``pinned`` (the
    request was already a commit), ``resolved`` (a branch looked up on the Hub),
    ``unresolved`` (a branch that could not be looked up: ``reason`` says why) or ``local``
    (the source is a local folder, which has no revisions).
    """

    requested: str | None
    commit: str | None
    status: Status
    reason: str = ""

    @property
    def effective(self) -> str | None:
        """What to load: the commit when known, else the requested branch (None: main)."""
        return self.commit or self.requested

    def label(self) -> str:
        """Short form for one-line reports: ``3ae0e4e94e37`` (a commit),
        ``main -> 3ae0e4e94e37`` (a resolved branch) or ``main (unresolved)``."""
        branch = self.requested or DEFAULT_BRANCH
        if self.status == "local":
            return "local folder"
        if self.status == "pinned":
            return (self.commit or "")[:12]
        if self.status == "resolved":
            return f"{branch} -> {(self.commit or '')[:12]}"
        return f"{branch} (unresolved)"


def is_commit(revision: str | None) -> bool:
    """True when ``revision`` is a full 40-hex-digit commit sha."""
    return bool(revision) and _COMMIT.fullmatch(str(revision)) is not None


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` tells the Hugging Face libraries not to use the network."""
    from huggingface_hub.constants import is_offline_mode

    return bool(is_offline_mode())


def resolve_revision(
    repo_id: str, revision: str | None = None, *, timeout: float = 10.0, warn: bool = True
) -> Revision:
    """The commit that ``revision`` (None: ``main``) of hub dataset ``repo_id`` points at.

    A commit sha is returned as ``pinned`` without any network call; so is a local folder
    (``local``). Otherwise ``HfApi().dataset_info(repo_id, revision=...).sha`` is asked
    (within ``timeout`` seconds): ``resolved`` with the sha, or, offline
    (``HF_HUB_OFFLINE``) or on any error, ``unresolved`` with the reason, after one warning
    per repository (when ``warn``). Never raises.
    """
    if is_commit(revision):
        return Revision(revision, revision, "pinned")
    if Path(repo_id).exists():
        return Revision(revision, None, "local")
    if hub_offline():
        return _unresolved(repo_id, revision, "HF_HUB_OFFLINE is set", warn)
    try:
        from huggingface_hub import HfApi

        info = HfApi().dataset_info(repo_id, revision=revision or DEFAULT_BRANCH, timeout=timeout)
    except Exception as e:  # unreachable hub, unknown repo or branch, gated: all reported alike
        from icd.errors import one_line

        return _unresolved(repo_id, revision, f"{type(e).__name__}: {one_line(e)}", warn)
    sha = getattr(info, "sha", None)
    if not is_commit(sha):
        return _unresolved(repo_id, revision, "the Hub gave no commit sha", warn)
    return Revision(revision, str(sha), "resolved")


def _unresolved(repo_id: str, revision: str | None, reason: str, warn: bool) -> Revision:
    if warn and repo_id not in _warned:
        _warned.add(repo_id)
        log.warning(
            "dataset %s: revision %s not resolved to a commit (%s); reading the branch as it is "
            "now, recorded as unresolved",
            repo_id,
            revision or DEFAULT_BRANCH,
            reason,
        )
    return Revision(revision, None, "unresolved", reason)


def repo_files(repo_id: str, revision: str | None = None, *, timeout: float = 10.0) -> list[str]:
    """The file names of hub dataset ``repo_id`` at ``revision`` (raises when the Hub does
    not answer)."""
    from huggingface_hub import HfApi

    info: Any = HfApi().dataset_info(repo_id, revision=revision or DEFAULT_BRANCH, timeout=timeout)
    return [s.rfilename for s in (info.siblings or [])]


def script_only(files: Iterable[str]) -> bool:
    """True when a repository's ``files`` hold a Python loading script and no data files
    (parquet, arrow, json, csv, archives, image folders): such a revision can only be read
    by the script, which ``datasets`` >= 4 refuses to run."""
    names = [f for f in files if not f.startswith(".")]
    scripts = [f for f in names if f.endswith(".py") and "/" not in f]
    data = [
        f
        for f in names
        if f.lower().endswith(_DATA_SUFFIXES + (".png", ".jpg", ".jpeg"))
        and not f.lower().endswith(("requirements.txt", "license.txt"))
    ]
    return bool(scripts) and not data
