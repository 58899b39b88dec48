import numpy as np

from dinolab.curate.store import ArrayEmbeddings, l2_normalize


def test_chunk_view_reads_the_same_unit_rows_as_the_chunk(tmp_path):
    # stages read chunks through chunk_view: rows normalised when indexed must equal the normalised chunk's
    rng = np.random.default_rng(0)
    raw = (rng.standard_normal((1000, 24)) * rng.uniform(0.1, 10, (1000, 1))).astype(np.float32)
    np.save(tmp_path / "pool.npy", raw)
    store = ArrayEmbeddings(np.load(tmp_path / "pool.npy", mmap_mode="r"), chunk_rows=300)
    for chunk in range(store.num_chunks()):
        start, whole = store.chunk(chunk)
        view_start, view = store.chunk_view(chunk)
        assert view_start == start and len(view) == len(whole)
        positions = np.sort(rng.choice(len(whole), size=len(whole) // 3, replace=False))
        np.testing.assert_array_equal(view[positions], whole[positions])
        np.testing.assert_array_equal(view[10:50], whole[10:50])
        np.testing.assert_array_equal(whole, l2_normalize(raw[start : start + 300]))
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, rtol=1e-6)
