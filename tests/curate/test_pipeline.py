from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.curate.cli import build_config, parse_named, register
from dinolab.curate.embed import EmbedConfig
from dinolab.curate.pipeline import CurateConfig, run_curation
from dinolab.curate.retrieve import read_jsonl
from dinolab.models import DinoVisionTransformer


def _tiny_backbone() -> DinoVisionTransformer:
    """Tiny random ViT whose class token depends on the image.

    With the official init (LayerScale 1e-5, weights std 0.02) every image gets nearly the same
    class token, so weights are redrawn at unit gain; distinct test images then stay below 0.96.
    """
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, init_values=1.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 1.0 / np.sqrt(p[0].numel()))
            elif "cls" in name or "pos" in name:
                p.normal_(0, 1.0)
    return model.eval()


def _grid_image(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((32, 32), Image.NEAREST)


@pytest.fixture
def image_sets(tmp_path):
    """A pool of 20 distinct images + 3 exact copies in other formats + 1 broken file; seeds; eval set."""
    rng = np.random.default_rng(0)
    pool, seeds, evals = tmp_path / "pool", tmp_path / "seeds", tmp_path / "eval"
    for d in (pool, seeds, evals):
        d.mkdir()
    images = [_grid_image(rng) for _ in range(20)]
    for i, im in enumerate(images):
        im.save(pool / f"img_{i:02d}.png")
    images[3].save(pool / "dup_a.bmp")
    images[7].save(pool / "dup_b.png")
    images[7].save(pool / "dup_c.webp", lossless=True)
    (pool / "broken.jpg").write_bytes(b"not a jpeg")
    images[10].save(seeds / "s0.png")
    images[11].save(seeds / "s1.png")
    images[7].save(evals / "e0.png")
    return pool, seeds, evals


def _config() -> CurateConfig:
    cfg = CurateConfig()
    cfg.embed = EmbedConfig(shard_size=8, batch_size=4, crop_size=32, resize_size=None, num_workers=0, device="cpu")
    cfg.dedup.threshold = 0.99  # the random backbone is not invariant to anything but exact copies
    cfg.dedup.relative_threshold = 0.99
    cfg.retrieve.method = "sample"
    cfg.retrieve.n_per_seed = 1
    return cfg


def test_end_to_end_over_image_folders(tmp_path, image_sets):
    pool, seeds, evals = image_sets
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        counts = run_curation(pool, {"near": seeds}, out, _config(), eval_sets={"val": evals}, model=_tiny_backbone())

    embed = json.loads((out / "embed" / "pool" / "manifest.json").read_text())
    assert embed["outputs"]["num_embedded"] == 23 and embed["outputs"]["num_skipped"] == 1
    assert len(embed["shards"]) == 3  # 24 files / 8 per shard
    # Self-dedup: dup_a joins img_03, dup_b and dup_c join img_07.
    assert counts["self_dedup"]["num_kept"] == 20 and counts["self_dedup"]["num_duplicate_components"] == 2
    # Relative dedup: the eval image is img_07, so its whole 3-image component goes.
    assert counts["relative_dedup"]["num_dropped_components"] == 1 and counts["relative_dedup"]["num_kept"] == 19
    curated = read_jsonl(out / "curated.jsonl")
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in curated) == ["img_10.png", "img_11.png"]
    assert all(r["seed_set"] == "near" and r["method"] == "sample" and r["similarity"] > 0.999 for r in curated)
    for name in ("report.json", "nn_similarity.png", "duplicates.png"):
        assert (out / "report" / name).exists()

    # Rerunning finds every stage finished: no model is even built.
    def no_model():
        raise AssertionError("a finished embedding stage was recomputed")

    again = run_curation(pool, {"near": seeds}, out, _config(), eval_sets={"val": evals}, model=no_model)
    assert again["curated"] == 2



def test_undecodable_names_and_a_fifo_in_the_pool(tmp_path, bad_name, make_fifo, deadline, opened_paths):
    """A name that is not UTF-8 is embedded, hashed and written back as the same file; a FIFO is skipped,
    counted and never opened (the name used to stop curation before it embedded anything)."""
    import hashlib
    import os

    rng = np.random.default_rng(0)
    pool, seeds = tmp_path / "pool", tmp_path / "seeds"
    pool.mkdir()
    seeds.mkdir()
    images = [_grid_image(rng) for _ in range(6)]
    for i, im in enumerate(images[:4]):
        im.save(pool / f"img_{i}.png")
    odd = [pool / bad_name(b"odd\xff", ".png"), pool / bad_name(b"odd\xfe\xfd", ".png")]
    images[4].save(odd[0], format="PNG")
    images[5].save(odd[1], format="PNG")
    fifo = make_fifo(pool / "pipe.png")
    images[4].save(seeds / "s.png")  # an exact copy of odd[0]

    with deadline(120), pytest.warns(UserWarning, match=r"skipped 1 unreadable images: .*pipe\.png"):
        run_curation(pool, {"near": seeds}, tmp_path / "out", _config(), model=_tiny_backbone())

    manifest = json.loads((tmp_path / "out" / "embed" / "pool" / "manifest.json").read_text())
    assert manifest["outputs"]["num_images"] == 7
    assert manifest["outputs"]["num_embedded"] == 6 and manifest["outputs"]["num_skipped"] == 1
    # The image-list hash is over the names' bytes, one per line, in sorted order.
    names = sorted(n for n in os.listdir(os.fsencode(pool)) if n.endswith(b".png"))
    assert names[4:] == [b"odd\xfe\xfd.png", b"odd\xff.png", b"pipe.png"]
    expected = hashlib.sha256(b"".join(os.fsencode(pool) + b"/" + n + b"\n" for n in names)).hexdigest()[:16]
    assert manifest["config"]["images"] == expected
    skipped = [p for s in manifest["shards"] for p in s.get("skipped", [])]
    assert skipped == [str(fifo)]
    curated = read_jsonl(tmp_path / "out" / "curated.jsonl")
    assert [r["path"] for r in curated] == [str(odd[0])]  # the seed's copy, named exactly as on disk
    assert os.path.exists(curated[0]["path"])
    assert str(fifo) not in opened_paths

def test_cli_with_precomputed_embeddings_and_cluster_retrieval(tmp_path, make_pool):
    x, groups = make_pool(n_base=600, n_groups=20)
    paths = np.array([f"/pool/{i:05d}.jpg" for i in range(len(x))])
    np.savez(tmp_path / "pool.npz", embeddings=x, paths=paths)
    rng = np.random.default_rng(1)
    seeds = x[:5] + 0.1 * rng.standard_normal((5, x.shape[1])).astype(np.float32) / np.sqrt(x.shape[1])
    np.save(tmp_path / "seeds.npy", seeds)

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args([
        "curate", "--pool", str(tmp_path / "pool.npz"), "--out", str(out),
        "kmeans.n_clusters=4", "retrieve.per_cluster=50", "retrieve.cap=120", "retrieve.hits_per_seed=4",
        "hierarchical.n_clusters=[12,3]", "hierarchical.resampling_steps=[1,2]", "hierarchical.sample_sizes=[1,2]",
        "--hierarchical", "--seeds", f"few={tmp_path / 'seeds.npy'}", "hierarchical.target_size=30",
    ])
    assert args.func(args) == 0
    few = read_jsonl(out / "retrieve" / "few.jsonl")
    # 5 seeds x 4 hits = 20 hits over 4 clusters: at least one cluster has > 3 hits; each gives <= 50, total <= 120.
    assert 0 < len(few) <= 120
    assert all(r["method"] == "cluster" and r["path"].startswith("/pool/") for r in few)
    per_cluster = np.unique([r["row"] for r in few], return_counts=True)[1]
    assert len(per_cluster) == len(few)  # each image once
    manifest = json.loads((out / "cluster" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["outputs"]["n_clusters"] == 4
    sampled = [r for r in read_jsonl(out / "curated.jsonl") if r["method"] == "hierarchical"]
    union = {r["row"] for r in few} | {r["row"] for r in sampled}
    assert 0 < len(sampled) <= 30 and len(read_jsonl(out / "curated.jsonl")) == len(union)


def test_cli_parsing_errors():
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_named(["justapath"], "--seeds")
    # argparse hands trailing overrides to --seeds; they are told apart by their key.
    assert parse_named(["a=/x", "dedup.threshold=0.7", "arch=vitl14"], "--seeds") == (
        {"a": "/x"}, ["dedup.threshold=0.7", "arch=vitl14"]
    )
    args = argparse.Namespace(arch=None, weights=None, recompute=True, hierarchical=False, overrides=["dedup.k=8"])
    cfg = build_config(args)
    assert cfg.dedup.k == 8 and cfg.on_change == "recompute" and cfg.arch == "vits14"
    args.overrides = ["dedup.kk=8"]
    with pytest.raises(ValueError, match="bad override"):
        build_config(args)
