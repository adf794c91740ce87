"""The `jaxft` command's huge-page malloc (`jaxft.hostmem`): when it restarts, with what, and that the setting
does what it is for (far fewer page faults when a process touches freshly allocated memory)."""

import subprocess
import sys

import pytest

from jaxft.hostmem import THP_MODE, TUNABLE, huge_page_env

GLIBC = ("glibc", "2.36")
MADVISE = "always [madvise] never\n"


def test_huge_page_env_adds_the_tunable_and_keeps_the_others():
    env = huge_page_env({"PATH": "/bin"}, GLIBC, MADVISE)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"{TUNABLE}=1", "JAXFT_HUGE_PAGES_RESTARTED": "1"}
    env = huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, MADVISE)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"


@pytest.mark.parametrize("environ,libc,thp", [
    ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, GLIBC, MADVISE),       # the user chose: no restart (and no loop)
    ({"JAXFT_HUGE_PAGES": "0"}, GLIBC, MADVISE),                # switched off
    ({}, ("", ""), MADVISE),                                    # musl or unknown libc
    ({}, ("glibc", "2.31"), MADVISE),                           # glibc without the tunable
    ({}, GLIBC, "always madvise [never]\n"),                    # the kernel gives no huge pages
    ({"JAXFT_HUGE_PAGES_RESTARTED": "1"}, GLIBC, MADVISE),      # restarted already, but exec dropped the tunable
])
def test_huge_page_env_leaves_the_process_alone(environ, libc, thp):
    assert huge_page_env(environ, libc, thp) is None


def _run(code: str, **env) -> list[str]:
    import os

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    return out.stdout.split()


def _applies() -> bool:
    import os

    return sys.platform == "linux" and huge_page_env({k: v for k, v in os.environ.items()
                                                     if k not in ("GLIBC_TUNABLES", "JAXFT_HUGE_PAGES")}) is not None


@pytest.mark.skipif(not _applies(), reason="needs Linux, glibc ≥ 2.35 and transparent huge pages")
def test_restart_runs_the_same_command_once_with_the_tunable():
    code = ("import os; print('start', flush=True); from jaxft.hostmem import restart_with_huge_pages as r; r(); "
            "print(os.environ['GLIBC_TUNABLES'])")
    assert _run(code, GLIBC_TUNABLES=None, JAXFT_HUGE_PAGES=None) == ["start", "start", f"{TUNABLE}=1"]
    assert _run(code, GLIBC_TUNABLES="glibc.malloc.arena_max=2", JAXFT_HUGE_PAGES=None) == [
        "start", "start", f"glibc.malloc.arena_max=2:{TUNABLE}=1"]


@pytest.mark.skipif(not _applies() or "[madvise]" not in THP_MODE.read_text(),
                    reason="needs glibc ≥ 2.35 and the kernel's THP mode madvise")
def test_the_tunable_cuts_page_faults_of_large_allocations():
    """Touching 8 blocks of 64 MiB fresh from `malloc` (as XLA's runtime gets its buffers; numpy asks for huge
    pages itself): one fault per 4 KiB page without the tunable (~130,000), a few hundred with it. Counted,
    not timed."""
    code = ("import ctypes, resource\n"
            "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(8):\n    p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(p)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    plain = int(_run(code, GLIBC_TUNABLES=None)[-1])
    huge = int(_run(code, GLIBC_TUNABLES=f"{TUNABLE}=1")[-1])
    assert plain > 100_000 and huge < plain / 20, (plain, huge)
