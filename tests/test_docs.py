"""The configs users copy from the docs and examples/ must validate as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sluicegate.config.load import load_config_file, validate_config

ROOT = Path(__file__).resolve().parent.parent
README_BLOCKS = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("block", README_BLOCKS, ids=[f"readme-{i}" for i in
                                                     range(len(README_BLOCKS))])
def test_readme_config_examples_validate(block):
    validate_config(yaml.safe_load(block))


@pytest.mark.parametrize("path", sorted([*(ROOT / "examples").glob("*.yaml"),
                                         *(ROOT / "bench").glob("sluicegate_*.yaml")]),
                         ids=lambda p: p.name)
def test_example_configs_validate(path):
    load_config_file(path)


def test_readme_starts_with_the_two_setup_commands():
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.strip()]
    assert lines[1] == "```sh"
    assert lines[2].startswith("make run") and lines[3].startswith("make test")
