"""Hub revisions: a branch is resolved to its commit at run start, and that commit is what
the stream reads, what its lineage records and what its digest is keyed on.

The Hugging Face Hub is unreachable from the test machine, so ``HfApi`` is replaced by a
stand-in that answers ``dataset_info`` the way the Hub does (an object with ``sha`` and
``siblings``).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import datasets
import huggingface_hub
import pytest

from icd.config import DataConfig
from icd.data import revisions, shapes
from icd.data.registry import DatasetSpec
from icd.data.revisions import resolve_revision, script_only
from icd.data.stream import DatasetUnavailable, open_stream

MAIN = "a" * 40
OTHER = "b" * 40


class StandInHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records every ``dataset_info`` call and
    answers with the commit of the branch asked for (or raises for an unknown one)."""

    calls: list[tuple[str, str | None]] = []
    branches: dict[str, str] = {"main": MAIN, "v2": OTHER}
    files: list[str] = ["README.md", "data/test-00000-of-00001.parquet"]

    def dataset_info(self, repo_id, *, revision=None, timeout=None, **kw):
        StandInHfApi.calls.append((repo_id, revision))
        if revision not in self.branches:
            raise ValueError(f"Revision Not Found for url: .../{repo_id}/revision/{revision}")
        siblings = [SimpleNamespace(rfilename=f) for f in self.files]
        return SimpleNamespace(sha=self.branches[revision], siblings=siblings)


@pytest.fixture
def hub(monkeypatch):
    StandInHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", StandInHfApi)
    monkeypatch.setattr(revisions, "hub_offline", lambda: False)
    monkeypatch.setattr(revisions, "_warned", set())
    return StandInHfApi


def test_a_branch_resolves_to_its_commit(hub):
    rev = resolve_revision("someone/set", None)
    assert (rev.status, rev.commit, rev.effective) == ("resolved", MAIN, MAIN)
    assert hub.calls == [("someone/set", "main")]
    assert resolve_revision("someone/set", "v2").commit == OTHER
    assert rev.label() == "main -> aaaaaaaaaaaa"


def test_a_commit_is_pinned_without_asking_the_hub(hub):
    rev = resolve_revision("someone/set", OTHER)
    assert (rev.status, rev.commit) == ("pinned", OTHER)
    assert hub.calls == []


def test_offline_keeps_the_branch_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(revisions, "_warned", set())
    monkeypatch.setattr(revisions, "hub_offline", lambda: True)
    with caplog.at_level(logging.WARNING, logger="icd.data.revisions"):
        first = resolve_revision("someone/set", None)
        second = resolve_revision("someone/set", None)
    assert first == second
    assert (first.status, first.commit, first.effective) == ("unresolved", None, None)
    assert "HF_HUB_OFFLINE" in first.reason and first.label() == "main (unresolved)"
    assert len([r for r in caplog.records if "someone/set" in r.getMessage()]) == 1


def test_a_hub_error_is_unresolved_not_raised(hub):
    rev = resolve_revision("someone/set", "no-such-branch", warn=False)
    assert rev.status == "unresolved" and rev.effective == "no-such-branch"
    assert "Revision Not Found" in rev.reason


def test_a_local_folder_has_no_revision(hub, tmp_path):
    assert resolve_revision(str(tmp_path), None).status == "local"
    assert hub.calls == []


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["FGVC-Aircraft.py", "README.md"], True),
        (["README.md", "data/test-00000-of-00001.parquet"], False),
        (["nocaps.py", "data/validation-00000.parquet"], False),
        (["README.md"], False),
        (["birds.py", "images/001.jpg"], False),
    ],
)
def test_script_only_repositories(files, expected):
    assert script_only(files) is expected


# -- the stream -------------------------------------------------------------------------


@pytest.fixture
def fake_load(monkeypatch, tmp_path):
    """``load_dataset(<hub id>, streaming=True, revision=...)`` served from a local shapes
    folder, recording the revision it was asked for."""
    folder = shapes.build_shapes_dataset(tmp_path, n=24, corrupt_every=0)
    real = datasets.load_dataset
    seen: list[str | None] = []

    def load(path, name=None, split=None, streaming=False, revision=None, **kwargs):
        seen.append(revision)
        return real(str(folder), split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", load)
    return seen


SPEC = DatasetSpec(
    name="hubset",
    source="hf:someone/set",
    split="train",
    question_column="question",
    label_column="label",
)


def test_the_stream_reads_and_records_the_resolved_commit(hub, fake_load):
    stream = open_stream(DataConfig(), spec=SPEC)
    assert fake_load == [MAIN]  # the commit, not the branch that may move meanwhile
    info = stream.dataset_info()
    assert (info["revision"], info["revision_status"]) == (MAIN, "resolved")

    moved = open_stream(DataConfig(revision="v2"), spec=SPEC)
    assert fake_load[-1] == OTHER
    assert moved.digest != stream.digest  # a new commit is new data to every cache key

    hub.branches = {**hub.branches, "main": OTHER}  # main moved to the v2 commit
    try:
        assert open_stream(DataConfig(), spec=SPEC).digest == moved.digest
    finally:
        hub.branches = {"main": MAIN, "v2": OTHER}


def test_offline_the_stream_reads_the_branch_and_says_unresolved(monkeypatch, fake_load):
    monkeypatch.setattr(revisions, "hub_offline", lambda: True)
    stream = open_stream(DataConfig(), spec=SPEC)
    assert fake_load == [None]
    info = stream.dataset_info()
    assert (info["revision"], info["revision_status"]) == (None, "unresolved")
    pinned = open_stream(DataConfig(revision=MAIN), spec=SPEC)
    assert pinned.dataset_info()["revision_status"] == "pinned"
    assert pinned.digest != stream.digest  # "main, unresolved" is not the main commit


def test_a_loading_script_fails_in_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setattr(revisions, "hub_offline", lambda: True)

    def load(*args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found set.py")

    monkeypatch.setattr(datasets, "load_dataset", load)
    with pytest.raises(DatasetUnavailable) as e:
        open_stream(DataConfig(), spec=SPEC)
    message = str(e.value)
    assert "\n" not in message and "loading script" in message
    assert "data.revision=refs/convert/parquet" in message
