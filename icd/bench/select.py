"""``icd bench select``: demo selection speed against numpy brute force, and pool writes.

For each pool size a real LanceDB pool (in a temporary folder) is filled with random unit
vectors. Then, in the same process and interleaved round by round so machine noise hits
every path alike, it times per query (batches of ``batch`` queries):

- ``brute``: numpy brute force on the view's image matrix — one ``[B, D] × [D, P]`` matmul
  plus ``argpartition`` (and ordering the k winners);
- ``rices``: the production path, ``DemoPool.view(run)`` + ``select_demos`` (image→image);
- ``combined``: the production path with the combined strategy (image→image, image→text,
  text→text); its matched baseline ``combined_brute`` is the same weighted score computed
  with numpy directly (two matmuls) plus ``argpartition``;
- ``lancedb``: LanceDB's batched flat vector search on the same table, for reference.

The ANN section (:func:`run_ann_bench`) measures approximate selection
(:mod:`icd.storage.pool.ann`) on in-memory views of ``random`` unit vectors (the worst case
for an index) and ``clustered`` ones (a mixture of Gaussian clusters, each cluster one
label, as real embeddings are): recall@k of the demos against exact selection for
``rices``, ``combined`` and ``cascade``; ms per query of ``rices`` and ``combined`` through
the index against the exact path and numpy brute force, interleaved round by round; the
index's build time (train + add), its size and the process RSS it added.

It also reports the cold cache load (first view of a fresh handle), the upsert cost per row
for 64-row chunk commits, and the fragment count after ``commits`` chunk commits without
compaction and with compaction every ``compact_every`` commits.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from icd.config import SelectionConfig
from icd.method.selection import select_demos
from icd.storage.pool import DemoPool

RUN_ID = "bench"
N_LABELS = 50


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _rows(rng: np.random.Generator, start: int, n: int, dim: int, chunk_size: int) -> list[dict]:
    img, txt = _unit(rng, n, dim), _unit(rng, n, dim)
    labels = rng.integers(0, N_LABELS, n)
    return [
        {
            "sample_id": f"s{start + i:07d}",
            "run_id": RUN_ID,
            "chunk": (start + i) // chunk_size,
            "stream_pos": start + i,
            "image_vec": img[i],
            "label": f"class_{labels[i]}",
            "label_vec": txt[i],
            "agreement": 1.0,
            "votes": [f"class_{labels[i]}"],
        }
        for i in range(n)
    ]


def _brute_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Best k columns per row, best first: one argpartition plus ordering the k winners."""
    part = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]
    vals = np.take_along_axis(scores, part, axis=1)
    return np.take_along_axis(part, np.argsort(-vals, axis=1), axis=1)


def _time_rounds(
    paths: dict[str, Callable[[], Any]], budget_s: float, min_rounds: int = 7
) -> dict[str, np.ndarray]:
    """Seconds per call of each path, one sample per round: the paths are called in turn
    (in a shuffled order each round, so no path always follows the same one), round after
    round, each sample averaging enough calls to last ~20 ms, so the paths of one round ran
    under the same machine load."""
    inner: dict[str, int] = {}
    for name, fn in paths.items():  # warm-up and calibration
        fn()
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    shuffle = np.random.default_rng(0)
    start = time.perf_counter()
    while len(samples["brute"]) < min_rounds or time.perf_counter() - start < budget_s:
        for name in shuffle.permutation(names):
            fn = paths[name]
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return {name: np.array(ts) for name, ts in samples.items()}


def _paired_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """Median over rounds of a/b: each round's pair ran back to back under the same load."""
    return float(np.median(a / b))


def _bench_size(
    root: Path,
    size: int,
    dim: int,
    batch: int,
    k: int,
    commits: int,
    compact_every: int,
    budget_s: float,
    seed: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    chunk_size = 64
    uri = str(root / f"pool-{size}")
    writer = DemoPool(uri, dim=dim)
    for lo in range(0, size, 20_000):
        writer.upsert(_rows(rng, lo, min(20_000, size - lo), dim, chunk_size))

    pool = DemoPool(uri)  # a fresh handle: the first view loads from LanceDB
    t0 = time.perf_counter()
    view = pool.view(RUN_ID)
    load_ms = (time.perf_counter() - t0) * 1e3
    if len(view) != size:
        raise RuntimeError(f"pool view has {len(view)} rows, expected {size}")

    q_img, q_txt = _unit(rng, batch, dim), _unit(rng, batch, dim)
    ids = [f"q{i}" for i in range(batch)]
    rices = SelectionConfig(strategy="rices", k=k)
    combined = SelectionConfig(strategy="combined", k=k)
    w_ii, w_it, w_tt = combined.w_ii, combined.w_it, combined.w_tt
    tbl = pool.table

    def production(cfg: SelectionConfig) -> Callable[[], list[np.ndarray]]:
        def run() -> list[np.ndarray]:
            v = pool.view(RUN_ID)
            return select_demos(q_img, q_txt, v.image_vecs, v.label_vecs, v.labels, cfg, seed, ids)

        return run

    def brute() -> np.ndarray:
        return _brute_topk(q_img @ view.image_vecs.T, k)

    def combined_brute() -> np.ndarray:
        s = (q_img * np.float32(w_ii)) @ view.image_vecs.T
        s += (q_img * np.float32(w_it) + q_txt * np.float32(w_tt)) @ view.label_vecs.T
        return _brute_topk(s, k)

    def lancedb_search() -> Any:
        return (
            tbl.search(q_img, vector_column_name="image_vec")
            .distance_type("dot")
            .limit(k)
            .select(["sample_id", "_distance"])
            .to_arrow()
        )

    # Same answers before timing anything: the production path is brute-force top-k.
    got = production(rices)()
    want = brute()
    agree = float(np.mean([set(g) == set(w) for g, w in zip(got, want, strict=True)]))

    secs = _time_rounds(
        {
            "brute": brute,
            "rices": production(rices),
            "combined_brute": combined_brute,
            "combined": production(combined),
            "lancedb": lancedb_search,
        },
        budget_s,
    )
    per_query = {name: float(np.median(ts)) * 1e3 / batch for name, ts in secs.items()}

    # Pool writes: 64-row chunk commits after the existing rows.
    next_pos = size
    fresh = DemoPool(uri)
    commit_s: list[float] = []
    for _ in range(commits):
        rows = _rows(rng, next_pos, chunk_size, dim, chunk_size)
        next_pos += chunk_size
        t0 = time.perf_counter()
        fresh.upsert(rows)
        commit_s.append(time.perf_counter() - t0)
    fragments_plain = fresh.fragment_count()
    fresh.compact()
    t_all = 0.0
    for _ in range(commits):
        rows = _rows(rng, next_pos, chunk_size, dim, chunk_size)
        next_pos += chunk_size
        t0 = time.perf_counter()
        fresh.upsert(rows)
        fresh.maybe_compact(compact_every)
        t_all += time.perf_counter() - t0
    fragments_compacted = fresh.fragment_count()

    return {
        "pool_size": size,
        "brute_ms": per_query["brute"],
        "rices_ms": per_query["rices"],
        "rices_ratio": _paired_ratio(secs["rices"], secs["brute"]),
        "combined_ms": per_query["combined"],
        "combined_ratio": _paired_ratio(secs["combined"], secs["brute"]),
        "combined_brute_ms": per_query["combined_brute"],
        "combined_vs_matched": _paired_ratio(secs["combined"], secs["combined_brute"]),
        "lancedb_ms": per_query["lancedb"],
        "lancedb_ratio": _paired_ratio(secs["lancedb"], secs["brute"]),
        "rounds": len(secs["brute"]),
        "topk_agreement": agree,
        "cold_load_ms": load_ms,
        "upsert_ms_per_row": sum(commit_s) * 1e3 / (commits * chunk_size),
        "upsert_compact_ms_per_row": t_all * 1e3 / (commits * chunk_size),
        "commits": commits,
        "compact_every": compact_every,
        "fragments_no_compaction": fragments_plain,
        "fragments_compacted": fragments_compacted,
    }


def run_select_bench(
    sizes: tuple[int, ...] = (1_000, 10_000, 100_000),
    dim: int = 512,
    batch: int = 64,
    k: int = 4,
    commits: int = 100,
    compact_every: int = 16,
    budget_s: float = 1.0,
    seed: int = 0,
    quick: bool = False,
    root: Path | None = None,
) -> pl.DataFrame:
    """Measure selection and pool-write speed; one row per pool size (see module doc).

    ``quick`` shrinks everything (sizes 500 and 2000, 128-d, 12 commits, compaction every
    4) for tests. Ratios compare paths timed in the same run.
    """
    if quick:
        sizes, dim, commits, compact_every, budget_s = (500, 2_000), 128, 12, 4, 0.1
    rows = []
    with tempfile.TemporaryDirectory(prefix="icd-bench-", dir=root) as tmp:
        for size in sizes:
            rows.append(
                _bench_size(Path(tmp), size, dim, batch, k, commits, compact_every, budget_s, seed)
            )
    return pl.DataFrame(rows)


def _ann_data(
    kind: str, rng: np.random.Generator, n: int, dim: int, n_clusters: int = 1_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Callable[[int], tuple[np.ndarray, np.ndarray]]]:
    """Pool ``(image_vecs, label_vecs, labels)`` of ``kind`` and a query maker (images and
    student-answer texts drawn like the pool's). ``random``: every vector uniform on the
    sphere, one label per row. ``clustered``: image vectors scattered around ``n_clusters``
    centres (cosine ≈ 0.86 to their centre), each cluster one label whose text vector its
    rows share."""
    if kind == "random":
        labels = np.arange(n)
        img, txt = _unit(rng, n, dim), _unit(rng, n, dim)

        def queries(b: int) -> tuple[np.ndarray, np.ndarray]:
            return _unit(rng, b, dim), _unit(rng, b, dim)

        return img, txt, labels, queries
    if kind != "clustered":
        raise ValueError(f"unknown ANN bench data {kind!r}")
    centres, label_txt = _unit(rng, n_clusters, dim), _unit(rng, n_clusters, dim)
    spread = np.float32(0.6 / np.sqrt(dim))

    def around(cl: np.ndarray) -> np.ndarray:
        x = centres[cl] + rng.standard_normal((len(cl), dim), dtype=np.float32) * spread
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    labels = rng.integers(0, n_clusters, n)
    img = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):
        img[lo : lo + 100_000] = around(labels[lo : lo + 100_000])
    txt = label_txt[labels]

    def queries(b: int) -> tuple[np.ndarray, np.ndarray]:
        cl = rng.integers(0, n_clusters, b)
        return around(cl), label_txt[cl]

    return img, txt, labels, queries


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _recall(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Mean over queries of |approximate demos ∩ exact demos| / |exact demos|."""
    return float(
        np.mean([len(set(g) & set(w)) / max(1, len(w)) for g, w in zip(got, want, strict=True)])
    )


def _ann_size(
    kind: str,
    size: int,
    *,
    dim: int,
    batch: int,
    k: int,
    ann_min_rows: int,
    nprobe: int,
    budget_s: float,
    min_rounds: int,
    seed: int,
) -> dict[str, Any]:
    from icd.storage.pool import ann
    from icd.storage.pool.index import PoolView

    rng = np.random.default_rng(seed)
    img, txt, codes, make_queries = _ann_data(kind, rng, size, dim)
    view = PoolView(
        ids=np.array([f"s{i:07d}" for i in range(size)], dtype=object),
        image_vecs=img,
        label_vecs=txt,
        labels=codes,
        chunk=np.arange(size) // 64,
        stream_pos=np.arange(size),
    )
    q_img, q_txt = make_queries(batch)
    ids = [f"q{i}" for i in range(batch)]
    opts = {"k": k, "ann_min_rows": ann_min_rows, "ann_nprobe": nprobe}
    cfgs = {s: SelectionConfig(strategy=s, **opts) for s in ("rices", "combined", "cascade")}

    registry = ann.IndexRegistry()
    rss0 = _rss_bytes()
    entry = registry.get(view, cfgs["rices"])
    rss_mb = (_rss_bytes() - rss0) / 2**20

    def exact(cfg: SelectionConfig) -> Callable[[], list[np.ndarray]]:
        def run() -> list[np.ndarray]:
            return select_demos(q_img, q_txt, img, txt, codes, cfg, seed, ids)

        return run

    def approx(cfg: SelectionConfig) -> Callable[[], list[np.ndarray]]:
        def run() -> list[np.ndarray]:
            cand = ann.candidates(view, q_img, q_txt, cfg, registry=registry)
            return select_demos(q_img, q_txt, img, txt, codes, cfg, seed, ids, candidates=cand)

        return run

    row: dict[str, Any] = {
        "data": kind,
        "pool_size": size,
        "trained_on": entry.trained_on,
        "lists": entry.lists,
        "nprobe": nprobe,
        "k": k,
        "build_s": entry.build_s,
        "index_mb": entry.nbytes() / 2**20,
        "rss_mb": rss_mb,
        "pool_mb": (img.nbytes + txt.nbytes) / 2**20,
    }
    for name, cfg in cfgs.items():
        row[f"{name}_recall"] = _recall(approx(cfg)(), exact(cfg)())

    def brute() -> np.ndarray:
        return _brute_topk(q_img @ img.T, k)

    secs = _time_rounds(
        {
            "brute": brute,
            "rices_exact": exact(cfgs["rices"]),
            "rices_ann": approx(cfgs["rices"]),
            "combined_exact": exact(cfgs["combined"]),
            "combined_ann": approx(cfgs["combined"]),
        },
        budget_s,
        min_rounds=min_rounds,
    )
    for name, ts in secs.items():
        row[f"{name}_ms"] = float(np.median(ts)) * 1e3 / batch
    for name in ("rices", "combined"):
        row[f"{name}_ratio"] = _paired_ratio(secs[f"{name}_ann"], secs[f"{name}_exact"])
        row[f"{name}_vs_brute"] = _paired_ratio(secs[f"{name}_ann"], secs["brute"])
    row["rounds"] = len(secs["brute"])
    return row


def run_ann_bench(
    sizes: tuple[int, ...] = (100_000, 1_000_000),
    data: tuple[str, ...] = ("random", "clustered"),
    dim: int = 512,
    batch: int = 64,
    k: int = 4,
    ann_min_rows: int | None = None,
    nprobe: int | None = None,
    budget_s: float = 1.0,
    min_rounds: int = 5,
    seed: int = 0,
) -> pl.DataFrame:
    """Approximate selection against exact selection, one row per (data, pool size).

    ``ann_min_rows`` None takes the smaller of the configured default and the pool size (so
    the index is used at every size: trained on the whole pool below the default, on the
    last point of the retraining schedule above it); ``nprobe`` None the configured default.
    Ratios compare paths timed in the same run (see the module doc)."""
    defaults = SelectionConfig()
    rows = []
    for kind in data:
        for size in sizes:
            rows.append(
                _ann_size(
                    kind,
                    size,
                    dim=dim,
                    batch=batch,
                    k=k,
                    ann_min_rows=ann_min_rows or min(int(defaults.ann_min_rows or size), size),
                    nprobe=nprobe or defaults.ann_nprobe,
                    budget_s=budget_s,
                    min_rounds=min_rounds,
                    seed=seed,
                )
            )
    return pl.DataFrame(rows)


def print_ann_bench(df: pl.DataFrame, console: Any = None) -> None:
    """Print the ANN section: recall@k against exact selection, ms per query and the ratio
    to the exact path (and to numpy brute force) timed in the same run, build and memory."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 120))
    k = int(df["k"][0]) if len(df) else 0
    t = Table(title=f"Approximate selection (faiss IVF) against exact: recall@{k}, ms per query")
    for col in (
        "data",
        "pool",
        "lists/nprobe",
        "recall rices",
        "combined",
        "cascade",
        "brute ms",
        "rices ann ms",
        "× exact",
        "combined ann ms",
        "× exact",
        "build s",
        "index MB",
        "RSS +MB",
    ):
        t.add_column(col, justify="right")
    for r in df.iter_rows(named=True):
        t.add_row(
            r["data"],
            f"{r['pool_size']:,}",
            f"{r['lists']}/{r['nprobe']}",
            f"{r['rices_recall']:.3f}",
            f"{r['combined_recall']:.3f}",
            f"{r['cascade_recall']:.3f}",
            f"{r['brute_ms']:.3f}",
            f"{r['rices_ann_ms']:.3f}",
            f"{r['rices_ratio']:.3f}",
            f"{r['combined_ann_ms']:.3f}",
            f"{r['combined_ratio']:.3f}",
            f"{r['build_s']:.1f}",
            f"{r['index_mb']:.0f}",
            f"{r['rss_mb']:.0f}",
        )
    console.print(t)
    console.print(
        "recall = share of the exact demos the index path picks; × exact = median of "
        "per-round paired ratios to the exact path (select_demos over the whole view; "
        "brute ms = numpy image→image matmul + argpartition); build = train on the "
        "retraining point's sample + add every row."
    )


def print_select_bench(df: pl.DataFrame) -> None:
    """Print the benchmark as two rich tables: selection speed (ms per query, and the ratio
    to numpy brute force measured in the same run) and pool writes."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    sel = Table(title="Demo selection: ms per query, and × numpy brute force in the same run")
    for col in (
        "pool",
        "numpy brute",
        "rices",
        "×",
        "combined",
        "×",
        "combined brute",
        "combined ×matched",
        "LanceDB flat",
        "×",
        "load ms",
    ):
        sel.add_column(col, justify="right")
    for r in df.iter_rows(named=True):
        sel.add_row(
            f"{r['pool_size']:,}",
            f"{r['brute_ms']:.3f}",
            f"{r['rices_ms']:.3f}",
            f"{r['rices_ratio']:.2f}",
            f"{r['combined_ms']:.3f}",
            f"{r['combined_ratio']:.2f}",
            f"{r['combined_brute_ms']:.3f}",
            f"{r['combined_vs_matched']:.2f}",
            f"{r['lancedb_ms']:.2f}",
            f"{r['lancedb_ratio']:.1f}",
            f"{r['cold_load_ms']:.0f}",
        )
    console.print(sel)
    console.print(
        "rices/combined = DemoPool.view + select_demos; combined brute = the same weighted "
        "score in plain numpy; ms = median over rounds, × = median of per-round paired "
        "ratios; load = first view of a fresh handle (reads LanceDB). "
        f"Top-k equal to brute force: {df['topk_agreement'].min():.0%} of queries."
    )
    writes = Table(title="Pool writes (64-row chunk commits)")
    for col in ("pool", "upsert ms/row", "incl. compaction", "commits", "fragments", "compacted"):
        writes.add_column(col, justify="right")
    for r in df.iter_rows(named=True):
        writes.add_row(
            f"{r['pool_size']:,}",
            f"{r['upsert_ms_per_row']:.3f}",
            f"{r['upsert_compact_ms_per_row']:.3f}",
            str(r["commits"]),
            str(r["fragments_no_compaction"]),
            f"{r['fragments_compacted']} (every {r['compact_every']})",
        )
    console.print(writes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (for tests)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    args = parser.parse_args()
    print_select_bench(run_select_bench(sizes=tuple(args.sizes), quick=args.quick))


if __name__ == "__main__":
    main()
