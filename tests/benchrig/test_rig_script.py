"""The rig script ships inside the package (what `sluicegate bench interception` and
bench/interception.sh run) and refuses bad settings before it builds anything."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources


def rig(**env: str) -> subprocess.CompletedProcess[str]:
    script = resources.files("sluicegate.benchrig") / "interception.sh"
    with resources.as_file(script) as path:
        return subprocess.run(["bash", str(path)], env={**os.environ, "PY": sys.executable, **env},
                              capture_output=True, text=True, timeout=30)


def test_the_rig_script_is_package_data_and_valid_bash() -> None:
    script = resources.files("sluicegate.benchrig") / "interception.sh"
    assert script.is_file()
    with resources.as_file(script) as path:
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_the_rig_refuses_bad_settings_in_one_line() -> None:
    done = rig(RUNS="0")
    assert done.returncode == 1
    assert done.stderr.endswith("ERROR: RUNS must be a positive integer\n")
    assert len(done.stderr.splitlines()) == 1
    done = rig(DURATION="2.5")
    assert done.returncode == 1
    assert done.stderr.endswith("ERROR: DURATION / IPERF_SECONDS: whole seconds\n")
