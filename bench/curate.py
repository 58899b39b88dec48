"""Benchmark: dedup + k-means + retrieval of `dinolab curate` on synthetic 384-d embeddings.

Synthetic pool (deterministic): ``--clusters`` random unit centres; each base image is its centre
plus Gaussian noise (within-cluster cosine ~0.3, far below the 0.6 dedup threshold), and
``--dup-fraction`` of the base images get 1-3 near-copies (cosine ~0.93 to the original, like an
augmented copy of an image). Total rows = ``--n``.

Measured with the library code (the same stages the CLI runs, on an in-memory store):
time and peak RSS (``VmHWM``, monotone, so each figure is "peak so far") of
  1. self-dedup (IVF k-NN graph, k=64, cos > 0.6, union-find),
  2. relative dedup against an evaluation set,
  3. spherical k-means (``--kmeans-k`` clusters) + assignment,
  4. retrieval: sample-based for a large seed set, cluster-based for a small one;
and the recall of the planted duplicates (pairs original-copy joined in one component; groups
collapsed to one kept image; images removed that were not planted copies).

Exact vs approximate: an exact flat index answers ``--exact-queries`` queries of the k-NN graph;
its time per query extrapolates the exact graph, and its neighbours measure the IVF graph's recall
of the edges above the threshold (the ratio printed is exact / IVF).

    python bench/curate.py --n 1000000          # ~10 minutes on 2 CPU cores
    python bench/curate.py --n 100000           # quick

With ``--ranks 1,2`` it runs the whole pipeline (``run_curation``, every stage distributed) instead, once
per rank count, each rank a gloo process on CPU as ``torchrun`` would start it, on the same synthetic
pool (saved as ``.npy``, memory-mapped: a rank's RSS counts the file pages it read), and prints wall time,
the peak RSS of every rank (and, per rank and stage, the peak anonymous and file-backed resident MB,
sampled every 0.2 s) and the planted duplicate recall; each rank returns freed blocks to the kernel as
``dinolab curate`` does (:func:`dinolab.utils.cpu_tuning.return_freed_memory`); ``--json-out F`` writes
``[{"ranks", "peak_rss_mb", "recall", "seconds", "curated_sha"}, ...]``:

    python bench/curate.py --ranks 1,2 --rows 200000 --json-out ranks.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from dinolab.curate.cluster import KMeansConfig, pool_kmeans
from dinolab.curate.dedup import Components, DedupConfig, relative_dedup, self_dedup
from dinolab.curate.index import IndexConfig, build_index
from dinolab.curate.retrieve import RetrieveConfig, retrieve_sharded
from dinolab.curate.stages import Stage
from dinolab.curate.store import ArrayEmbeddings


def peak_rss_gb() -> float:
    """This process's peak resident memory: ``VmHWM`` of /proc/self/status where there is one.

    Not ``getrusage``'s ``ru_maxrss`` there: it survives ``execve``, so a spawned rank would report at least
    the RSS of the parent it was forked from (the bench process holding the synthetic pool).
    """
    hwm = status_mb("VmHWM").get("VmHWM")
    if hwm is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    return hwm / 1024


def status_mb(*keys: str) -> dict[str, float]:
    """The given memory fields of /proc/self/status in MB (``{}`` where there is no such file)."""
    found = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    found[key] = int(value.split()[0]) / 1024  # kB
    except OSError:
        pass
    return found


def _noisy(rng: np.random.Generator, base: np.ndarray, scale: float) -> np.ndarray:
    x = base + scale * rng.standard_normal(base.shape, dtype=np.float32) / np.sqrt(base.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_pool(
    n: int, dim: int, clusters: int, dup_fraction: float, seed: int = 0, block: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """Pool [n, dim] float32 unit rows and ``group`` [n]: id of the original a row copies, or -1 for
    non-copies (the original itself has group = its own row)."""
    rng = np.random.default_rng(seed)
    centres = _noisy(rng, np.zeros((clusters, dim), np.float32), 1.0)
    expected_copies = 2.0 * dup_fraction  # 1-3 copies, mean 2
    n_base = int(n / (1 + expected_copies))
    x = np.empty((n, dim), np.float32)
    for start in range(0, n_base, block):
        stop = min(start + block, n_base)
        which = rng.integers(0, clusters, stop - start)
        x[start:stop] = _noisy(rng, centres[which], 1.5 * np.sqrt(dim))  # within-cluster cos ~ 0.3
    group = np.full(n, -1, np.int64)
    originals = rng.choice(n_base, size=n_base, replace=False)
    copies = rng.integers(1, 4, size=n_base)
    row, i = n_base, 0
    while row < n:
        src, c = originals[i], min(copies[i], n - row)
        x[row : row + c] = _noisy(rng, np.repeat(x[src : src + 1], c, axis=0), 0.4)  # cos ~ 0.93
        group[row : row + c] = src
        group[src] = src
        row, i = row + c, i + 1
    return x, group


def duplicate_recall(labels: np.ndarray, group: np.ndarray) -> dict[str, float]:
    """How well self-dedup found the planted copies."""
    copies = np.nonzero((group >= 0) & (group != np.arange(len(group))))[0]
    pair_recall = float((labels[copies] == labels[group[copies]]).mean())
    originals = np.unique(group[copies])
    kept = labels == np.arange(len(labels))
    members = np.nonzero(group >= 0)[0]
    kept_per_group = np.bincount(group[members], weights=kept[members], minlength=len(group))[originals]
    removed_non_copies = int((~kept & (group < 0)).sum())
    return {
        "planted_copies": len(copies),
        "pair_recall": pair_recall,
        "groups_collapsed": float((kept_per_group == 1).mean()),
        "removed_non_copies": removed_non_copies,
    }


def exact_vs_ivf(store: ArrayEmbeddings, x: np.ndarray, ivf_index, queries: int, k: int, thr: float) -> dict:
    """Exact flat search on a query subsample: time per query and recall of the IVF edges."""
    rng = np.random.default_rng(1)
    q_rows = np.sort(rng.choice(len(x), size=min(queries, len(x)), replace=False))
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    t0 = time.perf_counter()
    exact_sims, exact_ids = flat.search(x[q_rows], k + 1)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf_sims, ivf_ids = ivf_index.search(x[q_rows], k + 1)
    ivf_s = time.perf_counter() - t0
    del flat
    found = exact_found = 0
    for i, r in enumerate(q_rows):
        exact_edges = set(exact_ids[i][(exact_sims[i] > thr) & (exact_ids[i] != r)])
        ivf_edges = set(ivf_ids[i][(ivf_sims[i] > thr) & (ivf_ids[i] != r)])
        exact_found += len(exact_edges)
        found += len(exact_edges & ivf_edges)
    knn_recall = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(exact_ids[:, 1:], ivf_ids[:, 1:], strict=True)])
    return {
        "queries": len(q_rows),
        "exact_s_per_1k": 1000 * exact_s / len(q_rows),
        "ivf_s_per_1k": 1000 * ivf_s / len(q_rows),
        "exact_full_graph_s": exact_s / len(q_rows) * len(x),
        "edge_recall": found / max(exact_found, 1),
        "exact_edges": exact_found,
        "knn_recall_at_k": float(knn_recall),
    }


class Timer:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    def run(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.rows.append((name, time.perf_counter() - t0, peak_rss_gb()))
        print(f"{name:<34s} {self.rows[-1][1]:8.1f} s   peak RSS {self.rows[-1][2]:6.2f} GB", flush=True)
        return result


class StageMemory:
    """Peak anonymous and file-backed resident memory of this process per pipeline stage (MB), sampled every
    ``interval`` seconds by a daemon thread; the stage is the one whose :class:`Stage` was made last, or
    ``retrieve`` / ``report`` (the pipeline's retrieval of every seed set, rank 0's report)."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        from dinolab.curate import pipeline

        self.stage, self.peaks = "setup", {}
        memory, original = self, pipeline.Stage

        class Tracked(original):  # the pipeline makes each stage's Stage right before running it
            def __init__(self, folder, name, *args, **kwargs):
                memory.stage = name
                super().__init__(folder, name, *args, **kwargs)

        pipeline.Stage = Tracked
        for name, label in (("_retrieve_all", "retrieve"), ("_report", "report")):  # stages without a Stage of their own
            setattr(pipeline, name, self._labelled(getattr(pipeline, name), label))
        threading.Thread(target=self._sample, args=(interval,), daemon=True).start()

    def _labelled(self, fn, label: str):
        def run(*args, **kwargs):
            self.stage = label
            return fn(*args, **kwargs)

        return run

    def _sample(self, interval: float) -> None:
        while True:
            fields = status_mb("RssAnon", "RssFile")
            anon, file = self.peaks.get(self.stage, (0.0, 0.0))
            self.peaks[self.stage] = (max(anon, fields.get("RssAnon", 0.0)), max(file, fields.get("RssFile", 0.0)))
            time.sleep(interval)


def _rank_entry(rank: int, world_size: int, port: int, folder: str, cfg_kwargs: dict) -> None:
    import torch

    from dinolab.curate.pipeline import CurateConfig, run_curation
    from dinolab.utils.cpu_tuning import return_freed_memory

    return_freed_memory()  # as `dinolab curate` does
    memory = StageMemory()

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo")
    cfg = CurateConfig(chunk_rows=cfg_kwargs["chunk"])
    cfg.index = IndexConfig(kind=cfg_kwargs["index"], nlist=cfg_kwargs["nlist"], nprobe=cfg_kwargs["nprobe"],
                            use_gpu=False)
    cfg.dedup = DedupConfig(k=cfg_kwargs["k"])
    cfg.kmeans = KMeansConfig(n_clusters=cfg_kwargs["kmeans_k"], n_iter=cfg_kwargs["kmeans_iter"], use_gpu=False)
    cfg.retrieve = RetrieveConfig(cluster_below=cfg_kwargs["seed_small"] + 1, per_cluster=1000, cap=200_000)
    root = Path(folder)
    run_curation(root / "pool.npy", {"large": root / "large.npy", "small": root / "small.npy"},
                 root / f"out-{world_size}", cfg, eval_sets={"val": root / "eval.npy"})
    torch.distributed.destroy_process_group()
    (root / f"rss-{world_size}-{rank}.json").write_text(json.dumps(peak_rss_gb() * 1024))
    (root / f"stages-{world_size}-{rank}.json").write_text(json.dumps(memory.peaks))


def bench_ranks(args: argparse.Namespace) -> int:
    """The whole pipeline on 1, 2, ... gloo ranks: wall time, peak RSS per rank, duplicate recall."""
    import torch.multiprocessing as mp

    counts = [int(r) for r in args.ranks.split(",")]
    rng = np.random.default_rng(2)
    results = []
    with tempfile.TemporaryDirectory(prefix="curate-ranks-") as tmp:
        root = Path(tmp)
        x, group = synthetic_pool(args.rows, args.dim, args.clusters, args.dup_fraction)
        np.save(root / "pool.npy", x)
        np.save(root / "eval.npy", _noisy(rng, x[rng.choice(args.rows, args.eval_size, replace=False)], 0.4))
        np.save(root / "large.npy", _noisy(rng, x[rng.choice(args.rows, args.seed_large, replace=False)], 0.8))
        np.save(root / "small.npy", _noisy(rng, x[rng.choice(args.rows, args.seed_small, replace=False)], 0.8))
        del x
        cfg_kwargs = {k: getattr(args, k) for k in ("chunk", "index", "nlist", "nprobe", "k", "kmeans_k", "kmeans_iter",
                                                     "seed_small")}
        for world_size in counts:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port, t0 = sock.getsockname()[1], time.perf_counter()
            mp.start_processes(_rank_entry, args=(world_size, port, tmp, cfg_kwargs), nprocs=world_size,
                               join=True, start_method="spawn")
            seconds = time.perf_counter() - t0
            dedup = Stage(root / f"out-{world_size}" / "dedup", "dedup", {})
            labels = Components.open(dedup).labels_of(np.arange(args.rows))
            recall = duplicate_recall(labels, group)["pair_recall"]
            rss = [json.loads((root / f"rss-{world_size}-{r}.json").read_text()) for r in range(world_size)]
            for r in range(world_size):
                peaks = json.loads((root / f"stages-{world_size}-{r}.json").read_text())
                print(f"{world_size} rank(s), rank {r}, peak MB anonymous + file-backed per stage: "
                      + ", ".join(f"{name} {a:.0f}+{f:.0f}" for name, (a, f) in peaks.items()), flush=True)
            curated = hashlib.sha1((root / f"out-{world_size}" / "curated.jsonl").read_bytes()).hexdigest()[:12]
            results.append({"ranks": world_size, "peak_rss_mb": [round(m, 1) for m in rss], "recall": recall,
                            "seconds": round(seconds, 1), "curated_sha": curated})
    print(f"\npool {args.rows:,} x {args.dim}, index {args.index}, chunk {args.chunk}, k-means {args.kmeans_k}")
    print(f"{'ranks':>5} {'seconds':>8} {'peak RSS per rank (MB)':>28} {'pair recall':>12} {'curated.jsonl':>14}")
    for r in results:
        rss = ", ".join(f"{m:.0f}" for m in r["peak_rss_mb"])
        print(f"{r['ranks']:>5} {r['seconds']:>8.1f} {rss:>28} {r['recall']:>12.4f} {r['curated_sha']:>14}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results if len(results) > 1 else results[0], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default=None, help="e.g. '1,2': the whole pipeline on that many gloo ranks")
    p.add_argument("--rows", type=int, default=None, help="pool size for --ranks (default --n)")
    p.add_argument("--json-out", default=None, help="with --ranks: write the figures as JSON")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--clusters", type=int, default=2000, help="true clusters of the synthetic pool")
    p.add_argument("--dup-fraction", type=float, default=0.05, help="share of base images that get copies")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--nlist", type=int, default=0, help="IVF cells (0: 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--index", default="ivfsq", choices=["flat", "ivf", "ivfsq", "ivfpq"], help="k-NN graph index")
    p.add_argument("--kmeans-k", type=int, default=1000)
    p.add_argument("--kmeans-iter", type=int, default=10)
    p.add_argument("--seed-large", type=int, default=100_000, help="sample-based seed set size")
    p.add_argument("--seed-small", type=int, default=1_000, help="cluster-based seed set size")
    p.add_argument("--eval-size", type=int, default=1_000)
    p.add_argument("--exact-queries", type=int, default=2_000)
    p.add_argument("--chunk", type=int, default=65536)
    args = p.parse_args(argv)
    if args.ranks:
        args.rows = args.rows or args.n
        return bench_ranks(args)

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; N={args.n:,} D={args.dim}")
    timer = Timer()
    x, group = timer.run("generate synthetic pool", synthetic_pool, args.n, args.dim, args.clusters, args.dup_fraction)
    store = ArrayEmbeddings(x, chunk_rows=args.chunk)
    index_cfg = IndexConfig(kind=args.index, nlist=args.nlist, nprobe=args.nprobe)
    dedup_cfg = DedupConfig(k=args.k)
    rng = np.random.default_rng(2)

    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        out = Path(tmp)
        full_index = timer.run("  dedup: train + fill IVF index", build_index, store, index_cfg)
        components = timer.run(
            "dedup: k-NN graph + union-find",
            self_dedup, store, dedup_cfg, Stage(out / "dedup", "dedup", {}), index_cfg, lambda: full_index,
        )
        labels = components.labels_of(np.arange(args.n))
        recall = duplicate_recall(labels, group)
        comparison = timer.run("exact vs IVF on a query sample", exact_vs_ivf, store, x, full_index.index,
                               args.exact_queries, args.k, dedup_cfg.threshold)
        trained = full_index.trained
        full_index = None  # free the vectors before the retrieval index is filled

        evals = _noisy(rng, x[rng.choice(args.n, args.eval_size, replace=False)], 0.4)
        keep = timer.run("relative dedup (flat over eval set)", relative_dedup, store, evals, components, dedup_cfg,
                         Stage(out / "relative", "relative", {}))
        clusters = timer.run("k-means (train on sample + assign)", pool_kmeans, store, keep,
                             KMeansConfig(n_clusters=args.kmeans_k, n_iter=args.kmeans_iter),
                             Stage(out / "cluster", "cluster", {}))
        retrieval_index = timer.run("retrieval: fill index over kept", build_index, store, index_cfg, keep, trained)
        large = ArrayEmbeddings(_noisy(rng, x[rng.choice(args.n, args.seed_large, replace=False)], 0.8))
        small = ArrayEmbeddings(_noisy(rng, x[rng.choice(args.n, args.seed_small, replace=False)], 0.8))
        method_l, rows_l, _ = timer.run("retrieval: sample-based (large set)", retrieve_sharded, "large", large,
                                        retrieval_index, clusters, RetrieveConfig(method="sample"))
        method_s, rows_s, _ = timer.run("retrieval: cluster-based (small set)", retrieve_sharded, "small", small,
                                        retrieval_index, clusters,
                                        RetrieveConfig(method="cluster", per_cluster=1000, cap=200_000))

    total = sum(t for name, t, _ in timer.rows if not name.startswith(("generate", "exact", "  ")))
    total += next(t for name, t, _ in timer.rows if name.startswith("  dedup"))
    print()
    print(f"pool {args.n:,}; kept after self-dedup {int((labels == np.arange(args.n)).sum()):,}; "
          f"after relative dedup {len(keep):,}")
    print(f"planted copies {recall['planted_copies']:,}: pair recall {recall['pair_recall']:.4f}, "
          f"groups collapsed to one image {recall['groups_collapsed']:.4f}, "
          f"non-copies removed {recall['removed_non_copies']}")
    print(f"retrieved: {method_l} {len(rows_l):,} images for {args.seed_large:,} seeds; "
          f"{method_s} {len(rows_s):,} images for {args.seed_small:,} seeds")
    print(f"{args.index} nlist={index_cfg.resolved_nlist(args.n)} nprobe={args.nprobe}: "
          f"k-NN recall@{args.k} {comparison['knn_recall_at_k']:.4f}, "
          f"edge (>{dedup_cfg.threshold}) recall {comparison['edge_recall']:.4f} "
          f"over {comparison['exact_edges']} exact edges of {comparison['queries']} queries")
    graph_time = next(t for name, t, _ in timer.rows if name.startswith("dedup:"))
    print(f"exact k-NN graph (flat) extrapolated: {comparison['exact_full_graph_s']:.0f} s vs IVF graph "
          f"{graph_time:.0f} s -> ratio exact/IVF {comparison['exact_full_graph_s'] / graph_time:.1f}x "
          f"(per 1k queries: exact {comparison['exact_s_per_1k']:.2f} s, IVF {comparison['ivf_s_per_1k']:.3f} s)")
    print(f"dedup + relative + k-means + retrieval: {total:.0f} s, peak RSS {peak_rss_gb():.2f} GB "
          f"(the pool array alone: {x.nbytes / 1024**3:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
