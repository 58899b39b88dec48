"""Automatic data curation (DINOv2 §3, App. A): build a pretraining set from a raw image pool.

Pipeline (``dinolab curate``, :func:`dinolab.curate.pipeline.run_curation`)::

    embed (embed.py) -> self-dedup (dedup.py, union_find.py) -> relative dedup (dedup.py)
      -> k-means (cluster.py) / hierarchical k-means (hierarchical.py) -> retrieval (retrieve.py)
      -> curated.jsonl + report (report.py)

Every stage is resumable (stages.py); embeddings are read chunk by chunk (store.py); nearest
neighbours come from Faiss indexes (index.py). Submodules are imported on use, so importing this
package does not load Faiss.
"""
