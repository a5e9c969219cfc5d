"""The LanceDB demonstration pool: idempotent upserts, chunk views, checkouts, concurrency."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import lancedb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icd.config import SelectionConfig
from icd.method.selection import select_demos
from icd.storage.pool import DemoPool, PoolError, inspect_pool
from icd.storage.pool.index import RunCache
from tests.storage.rows import CHUNK, DIM, chunk_rows, ids_of, unit, write_chunks


@pytest.fixture
def pool(tmp_path: Path) -> DemoPool:
    return DemoPool(tmp_path / "pool")


def test_upsert_twice_never_duplicates(pool: DemoPool) -> None:
    rows = chunk_rows("r", 0)
    v1 = pool.upsert(rows)
    v2 = pool.upsert(rows)
    assert v2 > v1
    assert pool.count() == CHUNK and pool.count("r") == CHUNK
    assert len(pool.view("r")) == CHUNK
    assert len(DemoPool(pool.uri).view("r")) == CHUNK
    # a changed row replaces the old one, still no duplicate
    changed = [dict(rows[0], label="new")]
    pool.upsert(changed)
    assert pool.count() == CHUNK
    assert pool.fetch([rows[0]["sample_id"]], "r")[0]["label"] == "new"
    assert list(pool.view("r").labels).count("new") == 1


def test_same_sample_id_in_two_runs_is_two_rows(pool: DemoPool) -> None:
    pool.upsert(chunk_rows("a", 0))
    pool.upsert(chunk_rows("b", 0))
    assert pool.count() == 2 * CHUNK
    assert pool.count("a") == CHUNK
    assert list(pool.view("a").ids) == list(pool.view("b").ids)


def test_view_before_chunk_is_independent_of_write_order(tmp_path: Path) -> None:
    order = [3, 0, 4, 2, 1]
    pool = DemoPool(tmp_path / "pool")
    for c in order:
        pool.upsert(chunk_rows("r", c))
    reopened = DemoPool(tmp_path / "pool")
    for c in range(6):
        expected = [sid for k in range(c) for sid in ids_of(chunk_rows("r", k))]
        for p in (pool, reopened):
            view = p.view("r", before_chunk=c)
            assert list(view.ids) == expected
            assert (view.chunk < c).all()
            want = (
                np.stack([r["image_vec"] for k in range(c) for r in chunk_rows("r", k)])
                if c
                else None
            )
            if c:
                np.testing.assert_array_equal(view.image_vecs, want)
    assert list(pool.view("r").ids) == list(reopened.view("r").ids)


def test_view_is_a_readonly_contiguous_snapshot(pool: DemoPool) -> None:
    pool.upsert(chunk_rows("r", 0))
    snap = pool.view("r")
    before = snap.image_vecs.copy()
    pool.upsert(chunk_rows("r", 1))
    pool.upsert([dict(chunk_rows("r", 0)[0], image_vec=np.ones(DIM, np.float32))])  # replace
    assert len(snap) == CHUNK
    np.testing.assert_array_equal(snap.image_vecs, before)
    assert snap.image_vecs.flags.c_contiguous and snap.image_vecs.dtype == np.float32
    assert not snap.image_vecs.flags.writeable
    now = pool.view("r")
    assert len(now) == 2 * CHUNK
    np.testing.assert_array_equal(now.image_vecs[0], np.ones(DIM, np.float32))


def test_cache_sees_another_handles_writes(tmp_path: Path) -> None:
    a = DemoPool(tmp_path / "pool")
    a.upsert(chunk_rows("r", 0))
    assert len(a.view("r")) == CHUNK
    b = DemoPool(tmp_path / "pool")
    b.upsert(chunk_rows("r", 1))
    b.upsert(chunk_rows("other", 0))
    assert list(a.view("r").ids) == ids_of(chunk_rows("r", 0)) + ids_of(chunk_rows("r", 1))


def test_checkout_returns_the_rows_of_that_version(pool: DemoPool) -> None:
    versions = {}
    for c in range(4):
        versions[c] = pool.upsert(chunk_rows("r", c))
    pool.upsert(chunk_rows("r", 1))  # a re-upsert: new version, same content
    pool.compact()
    for c, v in versions.items():
        view = pool.checkout(v)
        assert view.version == v
        assert list(view.ids) == [sid for k in range(c + 1) for sid in ids_of(chunk_rows("r", k))]
        assert set(view.run_ids) == {"r"}
    # the live handle still writes to the latest version
    pool.upsert(chunk_rows("r", 9))
    assert pool.count() == 5 * CHUNK
    assert len(pool.checkout(versions[0])) == CHUNK


def test_fetch_returns_rows_in_requested_order(pool: DemoPool) -> None:
    rows = chunk_rows("r", 0)
    rows[1]["sample_id"] = "it's quoted"
    pool.upsert(rows)
    want = [rows[5]["sample_id"], rows[1]["sample_id"], rows[0]["sample_id"]]
    got = pool.fetch(want, "r")
    assert [g["sample_id"] for g in got] == want
    assert got[0]["image"] == rows[5]["image"] and got[0]["question"] == rows[5]["question"]
    assert got[1]["votes"] == ["a", "a", "b"]
    assert "image_vec" not in got[0]
    with pytest.raises(KeyError, match="not in pool"):
        pool.fetch(["nope"], "r")
    with pytest.raises(KeyError):
        pool.fetch([rows[0]["sample_id"]], "other-run")


def _bad_rows() -> list[tuple[str, list[dict]]]:
    good = chunk_rows("r", 5)
    nan_vec = good[2]["image_vec"].copy()
    nan_vec[3] = np.nan
    missing = dict(good[1])
    del missing["label_vec"]
    return [
        ("wrong dimension", [*good[:3], dict(good[3], image_vec=np.ones(DIM + 1))]),
        ("NaN", [good[0], dict(good[2], image_vec=nan_vec)]),
        ("inf", [dict(good[0], label_vec=np.full(DIM, np.inf))]),
        ("missing field", [good[0], missing]),
        ("unknown field", [dict(good[0], colour="red")]),
        ("twice", [good[0], good[0]]),
        ("chunk", [dict(good[0], chunk=-1)]),
    ]


@pytest.mark.parametrize("case", [name for name, _ in _bad_rows()])
def test_bad_rows_are_rejected_and_the_pool_is_unchanged(pool: DemoPool, case: str) -> None:
    pool.upsert(chunk_rows("r", 0))
    view = pool.view("r")
    count, version, versions = pool.count(), pool.version(), len(pool.versions())
    rows = dict(_bad_rows())[case]
    with pytest.raises(ValueError) as err:
        pool.upsert(rows)
    msg = str(err.value)
    assert "\n" not in msg and "pool upsert rejected" in msg
    assert (pool.count(), pool.version(), len(pool.versions())) == (count, version, versions)
    assert list(pool.view("r").ids) == list(view.ids)


def test_wrong_dimension_message_names_both_dimensions(pool: DemoPool) -> None:
    pool.upsert(chunk_rows("r", 0))
    with pytest.raises(PoolError, match=rf"shape \({DIM + 1},\).*dimension {DIM}"):
        pool.upsert([dict(chunk_rows("r", 1)[0], image_vec=np.ones(DIM + 1))])


def test_missing_or_unreachable_pool_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PoolError, match="no pool at .*does not exist"):
        DemoPool(tmp_path / "nope", must_exist=True)
    with pytest.raises(ValueError, match="no pool at"):
        inspect_pool(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoolError, match="no pool table 'demos'"):
        DemoPool(tmp_path / "empty", must_exist=True)
    assert not (tmp_path / "nope").exists()
    with pytest.raises(PoolError, match="cannot open pool") as err:
        DemoPool("nosuchscheme://host/pool")
    assert "\n" not in str(err.value)
    DemoPool(tmp_path / "p", dim=DIM)
    with pytest.raises(PoolError, match=f"holds {DIM}-d vectors"):
        DemoPool(tmp_path / "p", dim=DIM * 2)
    lancedb.connect(tmp_path / "other").create_table("demos", [{"x": 1}])
    with pytest.raises(PoolError, match="not an ICD pool"):
        DemoPool(tmp_path / "other")


def test_empty_pool_view_and_version(pool: DemoPool) -> None:
    assert len(pool.view("r")) == 0
    assert pool.version() == 0 and pool.count() == 0 and pool.versions() == []
    assert pool.upsert([]) == 0


def test_compaction_bounds_fragments_and_keeps_versions(pool: DemoPool) -> None:
    first = pool.upsert(chunk_rows("r", 0))
    compacted = 0
    for c in range(1, 13):
        pool.upsert(chunk_rows("r", c))
        compacted += pool.maybe_compact(4)
    assert compacted == 3
    assert pool.fragment_count() <= 2
    assert pool.count() == 13 * CHUNK
    assert len(pool.checkout(first)) == CHUNK
    pool.upsert(chunk_rows("other", 0))
    summary = inspect_pool(pool.uri)
    assert summary["rows"] == 14 * CHUNK and summary["runs"] == {"r": 13 * CHUNK, "other": CHUNK}
    assert sum(summary["labels"].values()) == 14 * CHUNK
    assert summary["agreement"]["mean"] == pytest.approx(0.66)
    assert summary["versions"] == len(pool.versions()) and summary["fragments"] >= 1
    assert inspect_pool(pool.uri, run_id="other")["rows"] == CHUNK


def test_selection_through_view_equals_brute_force(pool: DemoPool) -> None:
    for c in range(6):
        pool.upsert(chunk_rows("r", c, n=20))
    rng = np.random.default_rng(7)
    queries = unit(rng, 10)
    view = pool.view("r", before_chunk=4)
    assert len(view) == 80
    cfg = SelectionConfig(strategy="rices", k=5)
    picked = select_demos(
        queries, None, view.image_vecs, view.label_vecs, view.labels, cfg, 0, None
    )
    all_rows = [r for c in range(4) for r in chunk_rows("r", c, n=20)]
    matrix = np.stack([r["image_vec"] for r in all_rows]).astype(np.float32)
    brute = np.argsort(-(queries @ matrix.T), axis=1)[:, :5]
    for got, want in zip(picked, brute, strict=True):
        assert [view.ids[i] for i in got[::-1]] == [all_rows[j]["sample_id"] for j in want]


def test_two_processes_writing_one_pool(tmp_path: Path) -> None:
    uri = str(tmp_path / "pool")
    DemoPool(uri, dim=DIM)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=write_chunks, args=(uri, "r", [0, 2, 4, 6], 99, barrier)),
        ctx.Process(target=write_chunks, args=(uri, "r", [1, 3, 5, 7], 99, barrier)),
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    pool = DemoPool(uri)
    assert pool.count() == 9 * CHUNK
    view = pool.view("r")
    assert len(set(view.ids)) == len(view) == 9 * CHUNK
    want = [sid for c in [*range(8), 99] for sid in ids_of(chunk_rows("r", c))]
    assert list(view.ids) == want
    assert len(pool.checkout(pool.version())) == 9 * CHUNK


# -- the cache on its own (pure) ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=12),
    st.integers(0, 6),
)
def test_cache_order_and_prefix_whatever_the_write_order(writes: list[int], before: int) -> None:
    """Chunks written in any order, some written again with new vectors: the cache holds
    the latest rows sorted by (chunk, stream_pos) and a prefix view is exactly chunk < c."""
    cache = RunCache(DIM, capacity=16)
    latest: dict[str, tuple[int, int, np.ndarray]] = {}
    for n_write, c in enumerate(writes):
        rows = chunk_rows("r", c, n=3, seed=1000 * c + n_write)
        cache.add(
            {
                "ids": np.array(ids_of(rows), dtype=object),
                "labels": np.array([r["label"] for r in rows], dtype=object),
                "chunk": np.array([r["chunk"] for r in rows], dtype=np.int64),
                "stream_pos": np.array([r["stream_pos"] for r in rows], dtype=np.int64),
                "image_vecs": np.stack([r["image_vec"] for r in rows]),
                "label_vecs": np.stack([r["label_vec"] for r in rows]),
            }
        )
        for r in rows:
            latest[r["sample_id"]] = (r["chunk"], r["stream_pos"], r["image_vec"])
    expected = sorted((v[0], v[1], k) for k, v in latest.items() if v[0] < before)
    view = cache.view(before)
    assert list(view.ids) == [k for _, _, k in expected]
    assert len(cache.index) == len(latest)
    for i, sid in enumerate(view.ids):
        np.testing.assert_array_equal(view.image_vecs[i], latest[sid][2])


def test_inspect_through_chunk_counts_the_pool_a_chunk_saw(pool: DemoPool) -> None:
    for c in range(3):
        pool.upsert(chunk_rows("r", c))
    pool.upsert(chunk_rows("other", 0))
    assert inspect_pool(pool.uri, "r", through_chunk=1)["rows"] == 2 * CHUNK
    assert inspect_pool(pool.uri, "r")["rows"] == 3 * CHUNK
    assert inspect_pool(pool.uri, through_chunk=0)["runs"] == {"r": CHUNK, "other": CHUNK}


# -- curation marks ---------------------------------------------------------------------


def _ids(rows: list[dict], picks: list[int]) -> list[str]:
    return [rows[i]["sample_id"] for i in picks]


def test_marked_rows_leave_the_views_from_the_next_chunk_on(pool: DemoPool) -> None:
    """A row curated by chunk 1 is in chunk 1's pool (it saw the pool before its own
    curation) and out of chunk 2's; the checkout of chunk 1's version is chunk 2's pool."""
    c0, c1 = chunk_rows("r", 0), chunk_rows("r", 1)
    pool.upsert(c0)
    pool.upsert(c1)
    gone = {_ids(c0, [0])[0]: "evicted_oldest", _ids(c1, [2])[0]: "label_audit"}
    before = pool.view("r", before_chunk=2)
    version = pool.mark("r", chunk=1, reasons=gone)
    assert len(before) == 2 * CHUNK  # a view taken earlier keeps what it saw
    assert list(pool.view("r", before_chunk=1).ids) == ids_of(c0)
    assert list(pool.view("r", before_chunk=2, curated_before=1).ids) == ids_of(c0 + c1)
    after = [s for s in ids_of(c0 + c1) if s not in gone]
    assert list(pool.view("r", before_chunk=2).ids) == after
    assert list(pool.view("r").ids) == after
    assert list(pool.checkout(version, run_id="r").ids) == after
    assert pool.count("r") == 2 * CHUNK and pool.count("r", live=True) == 2 * CHUNK - 2
    # a new handle (a resumed run) loads the marks from the table
    fresh = DemoPool(pool.uri)
    assert list(fresh.view("r", before_chunk=2).ids) == after
    assert list(fresh.view("r", before_chunk=1).ids) == ids_of(c0)
    info = inspect_pool(pool.uri, "r")
    assert (info["rows"], info["live"], info["evicted"], info["excluded"]) == (16, 14, 1, 1)
    assert inspect_pool(pool.uri, "r", through_chunk=0)["evicted"] == 0


def test_marking_again_is_idempotent_and_a_new_decision_replaces_the_old(
    pool: DemoPool,
) -> None:
    c0 = chunk_rows("r", 0)
    pool.upsert(c0)
    first = {s: "evicted_redundant" for s in _ids(c0, [0, 1])}
    v = pool.mark("r", chunk=0, reasons=first)
    assert pool.mark("r", chunk=0, reasons=first) == v  # nothing changed: no commit
    # the chunk decided again (a retry): row 1 stays, row 2 goes
    pool.mark("r", chunk=0, reasons={s: "evicted_redundant" for s in _ids(c0, [0, 2])})
    expect = [s for s in ids_of(c0) if s not in _ids(c0, [0, 2])]
    assert list(pool.view("r").ids) == list(DemoPool(pool.uri).view("r").ids) == expect
    # a re-upsert of a chunk makes its rows live again (its curation then runs again)
    pool.upsert(c0)
    assert list(pool.view("r").ids) == ids_of(c0)
    with pytest.raises(PoolError, match="not in pool run"):
        pool.mark("r", chunk=0, reasons={"nope": "label_audit"})


def test_another_handles_marks_are_seen(tmp_path: Path) -> None:
    a = DemoPool(tmp_path / "pool")
    c0 = chunk_rows("r", 0)
    a.upsert(c0)
    assert len(a.view("r")) == CHUNK
    DemoPool(tmp_path / "pool").mark("r", chunk=0, reasons={c0[0]["sample_id"]: "label_audit"})
    assert list(a.view("r").ids) == ids_of(c0)[1:]


def test_a_pool_made_before_curation_opens_and_is_brought_up_to_date(tmp_path: Path) -> None:
    """An old table (no curation columns): read-only tools read it as all live; a writer
    adds the columns (one commit, rows unchanged) and can curate."""
    uri = tmp_path / "pool"
    rows = chunk_rows("r", 0)
    pool = DemoPool(uri)
    pool.upsert(rows)
    tbl = lancedb.connect(str(uri)).open_table("demos")
    tbl.drop_columns(["excluded_chunk", "excluded_reason"])
    assert "excluded_chunk" not in tbl.schema.names
    info = inspect_pool(str(uri), "r")
    assert (info["rows"], info["live"], info["evicted"]) == (CHUNK, CHUNK, 0)
    assert "excluded_chunk" not in lancedb.connect(str(uri)).open_table("demos").schema.names
    writer = DemoPool(uri)
    assert list(writer.view("r").ids) == ids_of(rows)
    writer.mark("r", chunk=0, reasons={rows[3]["sample_id"]: "label_audit"})
    writer.upsert(chunk_rows("r", 1))
    assert len(writer.view("r")) == 2 * CHUNK - 1
    assert len(DemoPool(uri).view("r", before_chunk=1)) == CHUNK - 1
    assert len(DemoPool(uri).view("r", before_chunk=1, curated_before=0)) == CHUNK
