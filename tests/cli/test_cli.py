"""The `sluicegate` command as users run it: a subprocess, its exit code and its output."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import ROOT, free_port
from sluicegate import __version__

QUICKSTART = ROOT / "examples" / "quickstart.yaml"
SEED_YAML = """\
plugins:
  - name: tproxy
    service: your_service_name
    config: {listen: "0.0.0.0:80", tproxy: true}
  - name: prometheus
    config: {metrics: true}
"""
# Exit codes (cli.main.ExitCode), spelled out: they are part of the interface.
OK, INVALID_CONFIG, USAGE, NOT_AVAILABLE = 0, 1, 2, 3


def sluicegate(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sluicegate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def write(path: Path, config: dict[str, Any] | str) -> Path:
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


# -- version and help ----------------------------------------------------------------------


def test_version_prints_the_package_version():
    result = sluicegate("--version")
    assert result.returncode == OK
    assert result.stdout.strip() == f"sluicegate {__version__}"


def test_help_lists_the_commands_and_an_example():
    result = sluicegate("--help")
    assert result.returncode == OK
    for command in ("run", "validate", "schema"):
        assert re.search(rf"^\s+{command}\b", result.stdout, re.MULTILINE), result.stdout
    assert "example" in result.stdout


@pytest.mark.parametrize("command", ["run", "validate", "schema"])
def test_help_of_each_command_shows_an_example(command):
    result = sluicegate(command, "--help")
    assert result.returncode == OK, result.stderr
    assert "example" in result.stdout.lower()
    assert re.search(rf"^\s+sluicegate {command}\b", result.stdout, re.MULTILINE), result.stdout


def test_no_command_prints_help_and_is_a_usage_error():
    result = sluicegate()
    assert result.returncode == USAGE
    assert "usage:" in result.stdout + result.stderr


def test_unknown_command_is_a_usage_error():
    result = sluicegate("launch")
    assert result.returncode == USAGE
    assert "launch" in result.stderr
    assert_no_traceback(result)


# -- validate ------------------------------------------------------------------------------


def test_validate_accepts_the_quickstart_example():
    result = sluicegate("validate", str(QUICKSTART))
    assert result.returncode == OK, result.stderr
    assert "ok" in result.stdout


def test_validate_accepts_the_seed_config_with_a_warning(tmp_path):
    result = sluicegate("validate", str(write(tmp_path / "seed.yaml", SEED_YAML)))
    assert result.returncode == OK, result.stderr
    assert "ok" in result.stdout
    assert "plugins[0].service" in result.stderr
    assert "your_service_name" in result.stderr


def test_validate_lists_every_error_and_exits_1(tmp_path):
    config = {
        "routes": [
            {"id": "a", "uri": "no-slash", "upstream": {"nodes": {"127.0.0.1:80": 1}}},
            {"id": "b", "uri": "/b", "upstream": {"nodes": [{"host": "h", "port": 70000}]},
             "colour": "blue"},
        ],
        "upstreams": [{"id": "u", "nodes": {"127.0.0.1:80": 1}, "timeout": {"read": 0}}],
    }
    result = sluicegate("validate", str(write(tmp_path / "bad.yaml", config)))
    assert result.returncode == INVALID_CONFIG
    assert_no_traceback(result)
    lines = [line.strip() for line in result.stderr.splitlines()]
    expected = ["routes[0].uri", "routes[1].upstream.nodes[0].port", "routes[1].colour",
                "upstreams[0].timeout.read"]
    for path in expected:
        assert any(re.match(rf"{re.escape(path)}: \S", line) for line in lines), \
            f"{path} missing from:\n{result.stderr}"
    assert "4 errors" in result.stderr
    assert "ok" not in result.stdout


def test_validate_reports_reference_errors_with_paths(tmp_path):
    config = {"routes": [{"uri": "/", "upstream_id": "nope", "plugins": {"key-auht": {}}}],
              "services": [{"id": "s", "upstream_id": "gone"}]}
    result = sluicegate("validate", str(write(tmp_path / "refs.yaml", config)))
    assert result.returncode == INVALID_CONFIG
    for path in ("routes[0].upstream_id", "routes[0].plugins.key-auht",
                 "services[0].upstream_id"):
        assert f"{path}: " in result.stderr, result.stderr


def test_validate_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path / "broken.yaml",
                 "routes:\n  - uri: /a\n    upstream: {nodes: {\"h:1\": 1}\n  - uri: /b\n")
    result = sluicegate("validate", str(path))
    assert result.returncode == INVALID_CONFIG
    assert_no_traceback(result)
    assert re.search(r"\bline 4\b", result.stderr), result.stderr
    assert str(path) in result.stderr


def test_validate_missing_file_exits_1_naming_it(tmp_path):
    path = tmp_path / "absent.yaml"
    result = sluicegate("validate", str(path))
    assert result.returncode == INVALID_CONFIG
    assert_no_traceback(result)
    assert str(path) in result.stderr


def test_validate_without_file_is_a_usage_error():
    result = sluicegate("validate")
    assert result.returncode == USAGE
    assert "FILE" in result.stderr


# -- schema --------------------------------------------------------------------------------


def test_schema_prints_the_json_schema():
    result = sluicegate("schema")
    assert result.returncode == OK, result.stderr
    schema = json.loads(result.stdout)
    assert {"routes", "upstreams", "plugins"} <= set(schema["properties"])


# -- run -----------------------------------------------------------------------------------


def test_run_with_an_unsupported_interception_combination_exits_3(tmp_path):
    # (Never start interception here: this test runs in the root network namespace. The
    # seed config itself runs in tests/intercept, inside a namespace.) An ordinary listener
    # asked to relay TCP at L4 is not something this version does; run says so and stops.
    seed = yaml.safe_load(SEED_YAML)
    seed["plugins"][0]["config"] = {"listen": "127.0.0.1:1", "tproxy": False, "handle": "tcp"}
    result = sluicegate("run", "-c", str(write(tmp_path / "seed-l4.yaml", seed)),
                        timeout=20)
    assert result.returncode == NOT_AVAILABLE, result.stderr
    assert_no_traceback(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and "plugins[0]" in errors[0] and "stream_proxy" in errors[0], result.stderr


def test_run_bad_config_exits_1_without_starting(tmp_path):
    port = free_port()
    config = {"gateway": {"listen": [f"127.0.0.1:{port}"]},
              "routes": [{"uri": "no-slash", "upstream": {"nodes": {"127.0.0.1:1": 1}}}]}
    result = sluicegate("run", "-c", str(write(tmp_path / "bad.yaml", config)), timeout=20)
    assert result.returncode == INVALID_CONFIG
    assert_no_traceback(result)
    assert "routes[0].uri: " in result.stderr
    assert not listening(port)
    assert "serving" not in result.stderr


def test_run_missing_config_file_exits_1(tmp_path):
    result = sluicegate("run", "-c", str(tmp_path / "absent.yaml"), timeout=20)
    assert result.returncode == INVALID_CONFIG
    assert_no_traceback(result)
    assert "absent.yaml" in result.stderr


def test_run_without_config_is_a_usage_error():
    result = sluicegate("run")
    assert result.returncode == USAGE
    assert "-c" in result.stderr


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_run_with_fewer_than_one_worker_is_a_usage_error(tmp_path, workers):
    port = free_port()
    path = write(tmp_path / "ok.yaml", {"gateway": {"listen": [f"127.0.0.1:{port}"]},
                                        "routes": [{"uri": "/", "upstream": {
                                            "nodes": {"127.0.0.1:1": 1}}}]})
    process = subprocess.Popen([sys.executable, "-m", "sluicegate", "run", "-c", str(path),
                                "--workers", workers], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while process.poll() is None and time.monotonic() < deadline:
            if listening(port):
                pytest.fail(f"--workers {workers} started a gateway")
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate()
    assert process.returncode == USAGE, stderr
    assert "workers" in stderr


# -- hash-secret -----------------------------------------------------------------------------


def hash_secret(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sluicegate", "hash-secret", *args],
                          cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=30)


def test_hash_secret_prints_a_pbkdf2_hash_of_the_password_from_stdin():
    from sluicegate.plugins.basic_auth import PasswordHash

    result = hash_secret(stdin="correct horse\n")
    assert result.returncode == OK, result.stderr
    stored = result.stdout.strip()
    assert stored.startswith("$pbkdf2-sha256$600000$")
    assert "correct horse" not in result.stdout + result.stderr
    parsed = PasswordHash.parse(stored)
    assert parsed.verify(b"correct horse")  # the newline `echo` added is not part of it
    assert not parsed.verify(b"correct horse\n")


def test_hash_secret_salts_each_password_differently():
    assert hash_secret(stdin="same").stdout != hash_secret(stdin="same").stdout


def test_hash_secret_kind_key_prints_the_sha256_form():
    result = hash_secret("--kind", "key", stdin="my-api-key\n")
    assert result.returncode == OK, result.stderr
    assert result.stdout.strip() == ("sha256:" + hashlib.sha256(b"my-api-key").hexdigest())


def test_hash_secret_output_is_accepted_by_validate(tmp_path):
    password = hash_secret(stdin="pw-1").stdout.strip()
    key = hash_secret("--kind", "key", stdin="key-1").stdout.strip()
    path = write(tmp_path / "hashed.yaml", {"consumers": [{"username": "jack", "plugins": {
        "basic-auth": {"username": "jack", "password": password},
        "key-auth": {"key": key}}}]})
    result = sluicegate("validate", str(path))
    assert result.returncode == OK, result.stderr


def test_hash_secret_refuses_an_empty_secret():
    result = hash_secret(stdin="\n")
    assert result.returncode == USAGE
    assert "empty" in result.stderr
    assert result.stdout == ""
    assert_no_traceback(result)


def test_hash_secret_unknown_kind_is_a_usage_error():
    result = hash_secret("--kind", "token", stdin="x")
    assert result.returncode == USAGE
    assert "token" in result.stderr


def test_hash_secret_help_shows_an_example():
    result = sluicegate("hash-secret", "--help")
    assert result.returncode == OK
    assert re.search(r"^\s+.*sluicegate hash-secret\b", result.stdout, re.MULTILINE)
