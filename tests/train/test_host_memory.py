import subprocess
import sys

import pytest

# Allocates, touches and frees a 256 MB tensor, then prints the resident set in MB before and after the free.
_PROBE = """
import sys, torch
from dinolab.train.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
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
