"""
Faster CPU paths for the same computations model.py and train.py do in the plain way. Nothing here
changes a result beyond float rounding; each piece is tested against the plain path it replaces, and
bench/README.md has the figures that justify it. Switch them all off with ENABLED = False
(train.py and sample.py: --cpu_speedups=False).
"""
import ctypes

ENABLED = True


def keep_freed_memory() -> bool:
    """On Linux (glibc): serve large tensors from the heap and keep freed memory there for the next
    step, instead of returning each block to the system. By default glibc maps every block above 32 MB
    fresh from the kernel, so the 15M model's (4096, 32000) logits and their gradients (0.5 GB each)
    are paged in from zero at every step. The process keeps its peak memory until it exits, which is
    why only train.py's main() calls this, never a library function. Returns whether it applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # macOS, Windows, musl: nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
    # no block mapped on its own, and the heap's top never handed back
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
