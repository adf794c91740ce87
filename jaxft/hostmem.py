"""Host memory: glibc's `malloc` with transparent huge pages for the `jaxft` command.

A compiled train step on the CPU backend takes its temporaries (activations, gradients: gigabytes for a
135M-parameter LM at 8 × 256 tokens) from `malloc` on every call. glibc serves blocks that large with a
fresh `mmap`, so each step touches gigabytes of new 4 KiB pages: about 510,000 page faults and 2.5 s of
kernel time per step of an 8-layer SmolLM2-shaped model, measured. With the glibc tunable
`glibc.malloc.hugetlb=1` (glibc ≥ 2.35), `malloc` asks the kernel for transparent huge pages
(`madvise(MADV_HUGEPAGE)`) and the same step takes about 1,600 faults and runs 20–25% faster (PyTorch's
loop gains about as much from it). Tunables are read once, when the process starts, so the `jaxft`
command restarts itself (`exec`, before JAX starts: the restart costs one `import jaxft`) with the tunable added to
`GLIBC_TUNABLES`. Nothing happens off Linux/glibc, when the kernel's THP mode is `never`, when the
variable already sets `glibc.malloc.hugetlb`, with `JAXFT_HUGE_PAGES=0`, or in the restarted process
itself (`JAXFT_HUGE_PAGES_RESTARTED`: where `exec` drops `GLIBC_TUNABLES`, as glibc does for setuid
programs, the command restarts once, never in a loop). Library users get it by starting Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
RESTARTED = "JAXFT_HUGE_PAGES_RESTARTED"   # set in the restarted process: it never restarts again
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_env(environ: dict[str, str], libc: tuple[str, str] | None = None,
                  thp_mode: str | None = None) -> dict[str, str] | None:
    """The environment to restart with, or None when there is nothing to change (see the module docstring).
    `libc` (`platform.libc_ver()`) and `thp_mode` (the contents of `THP_MODE`) are read when not given."""
    if environ.get("JAXFT_HUGE_PAGES", "1") == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", "") or \
            RESTARTED in environ:
        return None
    name, version = libc if libc is not None else platform.libc_ver()
    if name != "glibc" or tuple(int(v) for v in version.split(".")[:2] if v.isdigit()) < (2, 35):
        return None
    if thp_mode is None:
        try:
            thp_mode = THP_MODE.read_text()
        except OSError:
            return None
    if "[never]" in thp_mode:
        return None
    tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1") if t)
    return dict(environ, GLIBC_TUNABLES=tunables, **{RESTARTED: "1"})


def restart_with_huge_pages() -> None:
    """Replace this process by itself (same interpreter, same arguments) with `huge_page_env`, if it asks
    for a change. Call it first thing in an entry point: before threads start or output is written."""
    if sys.platform != "linux":
        return
    env = huge_page_env(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
