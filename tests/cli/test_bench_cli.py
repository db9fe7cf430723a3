"""`sluicegate bench interception` as users run it (without the rig itself: that is the
benchmark, run by hand as root)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from harness import ROOT

USAGE, NOT_AVAILABLE = 2, 3   # cli.main.ExitCode


def sluicegate(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "sluicegate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_bench_interception_help_shows_the_options_and_an_example() -> None:
    done = sluicegate("bench", "interception", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--parts LIST", "--duration S", "--runs N", "--out DIR", "--doc PATH",
                   "--no-plots"):
        assert option in done.stdout
    assert re.search(r"^\s+sluicegate bench interception --parts core", done.stdout, re.M)
    assert "bench" in sluicegate("--help").stdout


def test_bench_interception_rejects_an_unknown_part() -> None:
    done = sluicegate("bench", "interception", "--parts", "core,warp")
    assert done.returncode == USAGE
    assert done.stderr == ("error: --parts: unknown part warp (choose from core, copy, "
                           "scaling, flood)\n")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the command as another user")
def test_bench_interception_without_root_says_so_in_one_line(tmp_path) -> None:
    done = sluicegate("bench", "interception", "--parts", "core", "--out", str(tmp_path),
                      prefix=("setpriv", "--reuid=nobody", "--regid=nogroup",
                              "--clear-groups"))
    assert done.returncode == NOT_AVAILABLE
    assert done.stderr == ("error: sluicegate bench interception needs root (network "
                           "namespaces, nftables, BPF): run it with sudo\n")
    assert done.stdout == ""
