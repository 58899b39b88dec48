import subprocess
import sys

import pytest

# Allocates, touches and frees a 256 MB tensor, then prints the resident set in MB before and after the free.
_PROBE = """
import sys, torch
from dinolab.utils.cpu_tuning import freed_memory_kept, keep_freed_memory
assert not freed_memory_kept()  # nothing applies it at import
if sys.argv[1] == "keep":
    assert keep_freed_memory() and freed_memory_kept()
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
x = torch.ones(64 * 2**20)  # 256 MB, every page touched
held = rss_mb()
del x
print(held, rss_mb())
"""


def _held_and_after_free(mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    held, after = map(float, out.stdout.split())
    return held, after


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_memory_stays_in_the_process_only_when_asked():
    held, after = _held_and_after_free("default")
    assert held - after > 200  # glibc gives the 256 MB block back to the kernel on free
    held, after = _held_and_after_free("keep")
    assert held - after < 10  # kept for the next allocation: no fresh pages to fault in


# The library call leaves the process's allocator alone; the `dinolab train` command applies the option; each
# run's summary says which (a fresh process: the setting is process-wide and cannot be undone).
_TRAIN_TWICE = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from tiny_run import TINY_RUN
from dinolab.cli import main
from dinolab.configs import load_config
from dinolab.train.loop import train
data = sys.argv[1] + "/d.npz"
np.savez(data, x_train=np.random.default_rng(0).integers(0, 255, (8, 20, 20, 3), dtype=np.uint8))
cfg = load_config("cpu", [*TINY_RUN, "train.max_iters=1"], base={"data": {"path": data}})
library = train(cfg, sys.argv[1] + "/lib", progress=False)["keep_freed_memory"]
assert main(["train", "--data", data, "--output", sys.argv[1] + "/cli", "--no-progress", *TINY_RUN,
             "train.max_iters=1"]) == 0
cli = json.loads(open(sys.argv[1] + "/cli/summary.json").read())["keep_freed_memory"]
print(json.dumps([library, cli]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_only_the_train_command_keeps_freed_memory_and_the_summary_says_so(tmp_path):
    from pathlib import Path

    here = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", _TRAIN_TWICE, str(tmp_path), here], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[false, true]"


# glibc's adaptive threshold: once a 16 MB block is freed, later blocks below 16 MB come from the heap, and one
# freed below another stays resident. Prints the MB the process gave back when the first of two 8 MB blocks went.
_RETURN_PROBE = """
import sys
import numpy as np
from dinolab.utils.cpu_tuning import return_freed_memory
if sys.argv[1] == "return":
    assert return_freed_memory()
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
x = np.ones(2 * 2**20)  # 16 MB
del x
a, b = np.ones(2**20), np.ones(2**20)  # 8 MB each, every page touched
held = rss_mb()
del a
print(held - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_return_freed_memory_gives_freed_blocks_back_to_the_kernel():
    def given_back(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _RETURN_PROBE, mode], capture_output=True, text=True, check=True)
        return float(out.stdout)

    assert given_back("default") < 1  # the adapted threshold put the block on the heap: it stays resident
    assert given_back("return") > 7  # its own mmap: unmapped on free


# 2,000 blocks of 64 kB (below any mmap threshold: they come from the heap, as a faiss index's inverted lists do)
# under one live block; prints the MB given back by freeing them, then by release_free_heap().
_TRIM_PROBE = """
import numpy as np
from dinolab.utils.cpu_tuning import release_free_heap
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
blocks = [np.ones(8192) for _ in range(2000)]  # 125 MB, every page touched
top = np.ones(8192)  # keeps the heap's top in use
held = rss_mb()
del blocks
freed = rss_mb()
assert release_free_heap()
print(held - freed, freed - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_free_heap_gives_back_freed_small_blocks():
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, check=True)
    on_free, on_trim = map(float, out.stdout.split())
    assert on_free < 10  # freed 64 kB blocks below a live one stay resident
    assert on_trim > 100  # most of the 125 MB is returned by malloc_trim
