"""CPU tuning of dinolab's hot paths: row blocks that fit in a cache, and glibc's policy for freed memory.

**Row blocks** (:func:`block_rows`: the heads, Sinkhorn-Knopp and the soft cross-entropy) for element-wise
passes over wide matrices. The DINO/iBOT heads produce matrices of [tokens x 65,536 prototypes] (160 MB in
fp32 for ~600 masked tokens). A chain of whole-matrix element-wise ops streams the matrix through memory once
per op; the same chain applied to a block of a few rows at a time keeps the block in cache between ops. Measured on
the 2-core CPU of this project (L2 2 MB per core, L3 32 MB), Sinkhorn-Knopp plus the soft cross-entropy
forward and backward of a [614 x 65,536] matrix: 84 + 79 ms with 0.5 MB blocks, 68 + 57 ms with 2 MB,
65 + 50 ms with 8 MB, 65 + 51 ms with 16 MB.

**Freed memory** (:func:`keep_freed_memory`: a process-wide setting, so library code never applies it; the
``dinolab train`` command does, for ``train.keep_freed_memory``, and the run's ``summary.json`` states whether
it was in effect) keeps freed host memory in the process, so that a CPU training step does not page-fault its
tensors afresh. glibc's ``malloc`` serves every allocation above 32 MB (and, before its threshold adapts, above 128 kB)
with a fresh ``mmap`` and gives it back to the kernel on ``free``. A training step allocates and frees
the same large tensors every iteration (activations, the [tokens x 65,536] head logits and targets), so
each iteration touches fresh pages again: one page fault per 4 kB, with the kernel zeroing each page.
Measured on the 2-core CPU of this project: a division of a 64 MB tensor took 19 ms into a freshly
allocated result, 2.7 ms into reused memory; the ViT-S/14 DINOv2 bench step runs 1.12-1.17x faster with
this setting (``python bench/train_step.py --only efficient f/fresh-pages``).

``keep_freed_memory()`` tells glibc (``mallopt``) to serve large blocks from its heap and never trim it,
the effect the PyTorch CPU performance guide gets by preloading jemalloc or tcmalloc. Freed memory is
reused by the next step instead of returned to the kernel; peak RSS is that of the largest step (measured
unchanged within 1% here). No effect (and ``False``) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# floats per block: 2^21 x 4 B = 8 MB, a quarter of the L3 cache this was tuned on
BLOCK_FLOATS = 2**21

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# return_freed_memory(): blocks from this size up get their own mmap, given back to the kernel on free
RETURN_FREED_ABOVE = 1 << 20


def block_rows(n_columns: int) -> int:
    """Rows per block of a matrix with ``n_columns`` columns (32 at 65,536 columns), at least one."""
    return max(1, BLOCK_FLOATS // max(1, n_columns))


@functools.cache
def _glibc(name: str, *argtypes: type) -> ctypes._CFuncPtr | None:
    """glibc's function ``name`` returning an int, looked up once (``None`` where the C library is not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt or malloc_trim)
        return None
    function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function


def _mallopt():
    """glibc's ``mallopt`` (``None`` where the C library is not glibc)."""
    return _glibc("mallopt", ctypes.c_int, ctypes.c_int)


@functools.cache
def return_freed_memory() -> bool:
    """The opposite of :func:`keep_freed_memory`, for long jobs whose peak memory matters more than page
    faults (``dinolab curate``): every block of 1 MB or more gets its own ``mmap`` and goes back to the
    kernel on ``free``. glibc's default threshold adapts upwards (to 32 MB) after the first large block is
    freed, so later blocks up to 32 MB come from the heap, where freed ones stay resident; a curation rank's
    resident memory then grows stage after stage (measured, 100,000 rows on 2 gloo ranks: 383 MB anonymous
    after 3 chunks of k-NN searches with the default, 216 MB with this). Process-wide: applied by the
    command, never by library code. Returns whether it took effect."""
    mallopt = _mallopt()
    # setting M_MMAP_THRESHOLD also turns its adaptation off (``man mallopt``)
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, RETURN_FREED_ABOVE))


def release_free_heap() -> bool:
    """Give the free pages inside glibc's heap back to the kernel now (``malloc_trim(0)``), e.g. after a large
    structure made of many small blocks is freed: a faiss index's inverted lists (~100 kB each at 1M rows and
    4,096 cells) stay resident after the index is deleted, because they sit below other live blocks of the heap
    (measured, 400,000 rows: 146 MB of IVF-SQ8 codes freed, 9 MB less resident; 153 MB less after this).
    Changes no setting (unlike :func:`return_freed_memory`): library code may call it between stages.
    Returns whether memory was released (``False`` where the C library is not glibc)."""
    trim = _glibc("malloc_trim", ctypes.c_size_t)
    return trim is not None and bool(trim(0))


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (once per process). Returns whether it took effect."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success. M_MMAP_MAX 0: large blocks come from the heap; M_TRIM_THRESHOLD -1:
    # never give the heap top back (``man mallopt``: "-1 disables trimming completely")
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` was applied in this process and took effect (it never is by a query)."""
    return keep_freed_memory.cache_info().currsize > 0 and keep_freed_memory()
