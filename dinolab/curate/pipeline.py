"""The curation pipeline: embed -> self-dedup -> relative dedup -> cluster -> retrieve -> report.

Output folder (every stage resumable, see :mod:`dinolab.curate.stages`)::

    <out>/config.json                 # the resolved configuration
    <out>/embed/pool/                 # pool embeddings (skipped when the pool is an embeddings file)
    <out>/embed/seeds-<name>/         # seed-set embeddings (same)
    <out>/embed/eval-<name>/          # evaluation-set embeddings (same)
    <out>/dedup/                      # k-NN graph edges per chunk, components_{rows,labels}.npy
    <out>/relative_dedup/             # nearest-evaluation similarity per chunk, keep.npz
    <out>/cluster/                    # centroids.npy, assignment per chunk (if cluster-based retrieval)
    <out>/hierarchical/               # levels.npz, sample.npz (if hierarchical sampling)
    <out>/retrieve/                   # rows per seed set, <name>.jsonl
    <out>/curated.jsonl               # the union: {"path", "row", "seed_set", "method", "similarity"}
    <out>/report/                     # report.json, nn_similarity.png, duplicates.png, clusters.png

Embedding sources and the reused pool index: :mod:`dinolab.curate.sources`. Under torchrun every stage runs on
every rank, each on its own stride of shards / chunks
(``rank, rank + W, ...``): embedding, the k-NN graph (a pool index sharded by rank,
:mod:`dinolab.curate.sharded`), relative dedup, k-means (sums all-reduced per iteration) and the
retrieval searches; only what must be merged goes to rank 0 (the edges for the union-find, the kept
rows, the retrieval candidates before the caps), which writes manifests, ``curated.jsonl`` and the
report while the others wait at barriers. Outputs do not depend on the number of ranks. Hierarchical
k-means is distributed like the pool k-means (:mod:`dinolab.curate.hierarchical`).
Memory per rank is bounded by the shard / chunk size, its shard of the Faiss index (whose IVF cells every rank
trains together on its part of the sample: :func:`dinolab.curate.index.train_index`) and the k-means
assignment of its own chunks, plus the kept-row list (8 bytes per kept row) on every rank (the
components are memory-mapped: a rank reads the part of its chunks); rank 0 also reads at most 2^20
nearest-neighbour similarities (a regular subsample beyond that) for the guard and the report.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dinolab.curate.cluster import ClusterAssignment, KMeansConfig, example_rows, pool_kmeans
from dinolab.curate.dedup import (
    Components,
    DedupConfig,
    nearest_neighbour_similarities,
    relative_dedup,
    relative_similarities,
    self_dedup,
)
from dinolab.curate.guard import outcome_problem
from dinolab.curate.embed import EmbedConfig
from dinolab.curate.hierarchical import HierarchicalConfig, run_hierarchical
from dinolab.curate import collective
from dinolab.curate.index import IndexConfig
from dinolab.curate.report import ReportConfig, write_report
from dinolab.curate.retrieve import Retrieved, RetrieveConfig, retrieve_sharded, union, write_jsonl
from dinolab.curate.sharded import ShardedIndex
from dinolab.curate.sources import PoolIndexes, Sources, result_key
from dinolab.curate.stages import Stage
from dinolab.curate.store import EmbeddingStore
from dinolab.utils.cpu_tuning import release_free_heap
from dinolab.utils.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class CurateConfig:
    """Everything ``dinolab curate`` can be told (override with ``key=value``, e.g. ``dedup.threshold=0.7``).

    Attributes:
        arch: backbone name for :func:`dinolab.models.build_backbone` (images only).
        weights: backbone weights file; ``None`` = random init (only useful for testing).
        embed: embedding settings.
        index: the pool index (k-NN graph and retrieval).
        dedup: deduplication thresholds and k.
        kmeans: k-means for cluster-based retrieval.
        hierarchical_sample: also draw a balanced sample with hierarchical k-means (no seeds needed).
        hierarchical: hierarchical k-means settings.
        retrieve: retrieval settings.
        report: report settings.
        chunk_rows: rows per chunk when the pool is a precomputed embeddings file.
        on_change: a stage already run with another configuration: ``error`` or ``recompute``.
        strict: a stage whose outcome looks wrong (most of the pool removed, a threshold inside the bulk of
            the similarities: :mod:`dinolab.curate.guard`) stops the run instead of warning.
    """

    arch: str = "vits14"
    weights: str | None = None
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    hierarchical_sample: bool = False
    hierarchical: HierarchicalConfig = field(default_factory=HierarchicalConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    chunk_rows: int = 65536
    on_change: str = "error"
    strict: bool = False


def _parse_named(named: dict[str, str | Path] | None) -> dict[str, str | Path]:
    named = dict(named or {})
    for name in named:
        if not name or "/" in name:
            raise ValueError(f"set name {name!r} must be non-empty and contain no '/'")
    return named


def run_curation(
    pool: str | Path,
    seeds: dict[str, str | Path] | None,
    out: str | Path,
    cfg: CurateConfig | None = None,
    eval_sets: dict[str, str | Path] | None = None,
    model: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the whole pipeline.

    Args:
        pool: image folder, ``.txt`` list of images, or embeddings file (``.npy``/``.npz``/``.safetensors``).
        seeds: seed-set name -> image source or embeddings file.
        out: output folder.
        cfg: configuration.
        eval_sets: evaluation-set name -> source, for relative deduplication.
        model: backbone (or a function building it); default ``build_backbone(cfg.arch, cfg.weights)``.

    Returns:
        Counts per stage (also written to ``<out>/report/report.json``); ``{}`` on ranks other than 0.
    """
    cfg = cfg or CurateConfig()
    out = Path(out)
    seeds, eval_sets = _parse_named(seeds), _parse_named(eval_sets)
    if not seeds and not cfg.hierarchical_sample:
        raise ValueError("no seed sets given (--seeds NAME=PATH) and hierarchical_sample is off: nothing to curate")
    sources = Sources(out, cfg, model)
    pool_folder, pool_key = sources.embed("pool", pool)
    seed_folders = {n: sources.embed(f"seeds-{n}", p) for n, p in seeds.items()}
    eval_folders = {n: sources.embed(f"eval-{n}", p) for n, p in eval_sets.items()}
    collective.barrier()
    rank = sources.rank
    if rank == 0:
        sources.finish_all()
        atomic_write_json(out / "config.json", asdict(cfg))
    collective.barrier()

    store = sources.open(pool, pool_folder)
    seed_stores = {n: sources.open(seeds[n], f) for n, (f, _) in seed_folders.items()}
    eval_stores = {n: sources.open(eval_sets[n], f) for n, (f, _) in eval_folders.items()}
    _check_dims(store, {**seed_stores, **eval_stores})
    counts: dict[str, Any] = {"pool": store.num_rows}

    dedup_stage = Stage(out / "dedup", "dedup", {
        "pool": pool_key, "k": cfg.dedup.k, "threshold": cfg.dedup.threshold, "index": result_key(cfg.index),
    }, cfg.on_change)
    indexes = PoolIndexes(store, cfg.index)
    components = self_dedup(store, cfg.dedup, dedup_stage, cfg.index, indexes.full)
    release_free_heap()  # the stage's index and sample, freed, go back to the kernel
    counts["self_dedup"] = dedup_stage.outputs
    _guard(counts, cfg, lambda: outcome_problem(
        "self-dedup", "dedup.threshold", store.num_rows, dedup_stage.outputs["num_kept"],
        nearest_neighbour_similarities(dedup_stage), cfg.dedup.threshold))

    eval_emb = np.concatenate([s.gather(np.arange(s.num_rows)) for s in eval_stores.values()]) if eval_stores \
        else np.zeros((0, store.dim), np.float32)
    relative_stage = Stage(out / "relative_dedup", "relative_dedup", {
        "dedup": dedup_stage.hash, "eval_sets": {n: k for n, (_, k) in eval_folders.items()},
        "relative_threshold": cfg.dedup.relative_threshold,
    }, cfg.on_change)
    keep = relative_dedup(store, eval_emb, components, cfg.dedup, relative_stage)
    release_free_heap()
    counts["relative_dedup"] = relative_stage.outputs
    if eval_stores:
        _guard(counts, cfg, lambda: outcome_problem(
            "relative dedup", "dedup.relative_threshold", dedup_stage.outputs["num_kept"], len(keep),
            relative_similarities(relative_stage), cfg.dedup.relative_threshold))

    methods = {n: cfg.retrieve.method_for(s.num_rows) for n, s in seed_stores.items()}
    clusters, cluster_hash, cluster_stage = None, None, None
    if "cluster" in methods.values():
        cluster_stage = Stage(out / "cluster", "cluster", {
            "kept": relative_stage.hash, "kmeans": result_key(cfg.kmeans),
        }, cfg.on_change)
        clusters, cluster_hash = pool_kmeans(store, keep, cfg.kmeans, cluster_stage), cluster_stage.hash
        release_free_heap()
        counts["cluster"] = cluster_stage.outputs

    retrieved: list[Retrieved] = []  # on rank 0
    if cfg.hierarchical_sample:
        retrieved += _hierarchical_sample(store, keep, cfg, out, relative_stage.hash, counts)
    if seeds:
        retrieve_stage = Stage(out / "retrieve", "retrieve", {
            "kept": relative_stage.hash, "cluster": cluster_hash, "index": result_key(cfg.index),
            "seeds": {n: k for n, (_, k) in seed_folders.items()}, "retrieve": result_key(cfg.retrieve),
        }, cfg.on_change)
        retrieved += _retrieve_all(store, keep, seed_stores, clusters, cfg, retrieve_stage, indexes)
        release_free_heap()
        counts["retrieve"] = retrieve_stage.outputs
    if rank != 0:
        collective.barrier()
        return {}
    counts["curated"] = write_jsonl(out / "curated.jsonl", retrieved, union(retrieved), store.paths)
    del retrieved

    _report(out, store, counts, dedup_stage, components, cluster_stage if clusters is not None else None, cfg)
    collective.barrier()
    return counts


def _guard(counts: dict[str, Any], cfg: CurateConfig, problem_of: Callable[[], str | None]) -> None:
    """Rank 0 checks a stage's outcome (:mod:`dinolab.curate.guard`); every rank learns the verdict, so that
    under ``--strict`` all ranks stop together. The problem is logged and kept in the counts."""
    problem = collective.broadcast(problem_of() if collective.dist_env()[0] == 0 else None)
    if problem is None:
        return
    if cfg.strict:
        raise ValueError(f"{problem} (--strict)")
    log.warning(problem)
    counts.setdefault("warnings", []).append(problem)


def _check_dims(store: EmbeddingStore, others: dict[str, EmbeddingStore]) -> None:
    for name, other in others.items():
        if other.dim != store.dim:
            raise ValueError(f"set {name!r} has {other.dim}-d embeddings but the pool has {store.dim}-d")


def _hierarchical_sample(
    store: EmbeddingStore, keep: np.ndarray, cfg: CurateConfig, out: Path, kept_hash: str, counts: dict[str, Any]
) -> list[Retrieved]:
    """Hierarchical sampling (collective): its sample on rank 0, ``[]`` elsewhere."""
    stage = Stage(out / "hierarchical", "hierarchical", {
        "kept": kept_hash, "hierarchical": result_key(cfg.hierarchical),
    }, cfg.on_change)
    rows, sims = run_hierarchical(store, keep, cfg.hierarchical, stage)
    counts["hierarchical"] = stage.outputs
    if rows is None:
        return []
    return [Retrieved.of("hierarchical", "hierarchical", rows, sims)]


def _retrieve_all(
    store: EmbeddingStore,
    keep: np.ndarray,
    seed_stores: dict[str, EmbeddingStore],
    clusters: ClusterAssignment | None,
    cfg: CurateConfig,
    stage: Stage,
    indexes: PoolIndexes,
) -> list[Retrieved]:
    """One shard per seed set (rows, similarities), computed by all ranks together, written by rank 0;
    on finish, ``<name>.jsonl`` per seed set. Returns the retrieved sets on rank 0, ``[]`` elsewhere."""
    names = list(seed_stores)
    rank = collective.dist_env()[0]
    index: list[ShardedIndex] = []
    if not collective.open_stage(stage):
        for i, name in enumerate(names):
            if collective.broadcast(stage.shard_finished(i)):
                continue
            if not index:  # collective: every rank sees the same unfinished seed sets
                index.append(indexes.over(keep))
            method, rows, sims = retrieve_sharded(name, seed_stores[name], index[0], clusters, cfg.retrieve)
            if rank == 0:
                stage.write_shard(i, {"rows": rows, "sims": sims}, {"seed_set": name, "method": method})
        index.clear()
        collective.barrier()
    if rank != 0:
        return []
    markers = stage.shard_markers(len(names)) or []
    retrieved = []
    for i, marker in enumerate(markers):
        shard = stage.load_shard(i)
        retrieved.append(Retrieved.of(names[i], marker["method"], shard["rows"], shard["sims"]))
        write_jsonl(stage.path(f"{names[i]}.jsonl"), retrieved[-1:], paths_of=store.paths)
    if not stage.done:
        stage.finish({m["seed_set"]: {"method": m["method"], "count": m["count"]} for m in markers}, len(names))
    return retrieved


def _report(
    out: Path,
    store: EmbeddingStore,
    counts: dict[str, Any],
    dedup_stage: Stage,
    components: Components,
    cluster_stage: Stage | None,
    cfg: CurateConfig,
) -> None:
    has_paths = store.paths(np.zeros(1, np.int64)) is not None if store.num_rows else False
    written = write_report(
        out / "report",
        counts,
        nearest_neighbour_similarities(dedup_stage),
        {"dedup": cfg.dedup.threshold, "relative dedup": cfg.dedup.relative_threshold},
        paths_of=store.paths if has_paths else None,
        components=(components.rows, components.labels),
        cluster_groups=example_rows(cluster_stage, store.num_chunks(), cfg.report.grid_rows, cfg.report.grid_cols,
                                    cfg.report.seed) if cluster_stage is not None and has_paths else None,
        cfg=cfg.report,
    )
    counts["report"] = written
