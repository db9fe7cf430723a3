"""The top-level `interception:` block and the tproxy options, as `validate` sees them."""

from __future__ import annotations

import pytest

from sluicegate.config.load import ConfigError, validate_config
from sluicegate.intercept.entries import intercept_entries


def errors_of(config: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    return caught.value.errors


def test_interception_block_becomes_one_transparent_entry_with_its_service():
    validated = validate_config({
        "services": [{"id": "web", "upstream": {"nodes": {"127.0.0.1:8080": 1}}}],
        "interception": {"service": "web", "listen": "0.0.0.0:15001",
                         "ports": ["80", "8000-8099"], "protocols": ["tcp", "udp"]}})
    [entry] = intercept_entries(validated.config)
    assert (entry.path, entry.scope, entry.port) == ("interception", "web", 15001)
    assert entry.spec is not None and entry.spec.port_ranges == ((80, 80), (8000, 8099))


def test_interception_block_errors_name_the_field():
    errors = errors_of({"interception": {"listen": "0.0.0.0:80", "ports": ["70000"],
                                         "protocols": ["sctp"]}})
    assert any(e.startswith("interception.protocols") for e in errors), errors
    errors = errors_of({"interception": {"listen": "0.0.0.0:80", "ports": ["70000"]}})
    assert any(e.startswith("interception") and "70000" in e for e in errors), errors


def test_interception_block_with_an_undefined_service_only_warns():
    validated = validate_config({"interception": {"service": "nowhere"}})
    assert validated.warnings == ["interception.service: no service 'nowhere' is defined: "
                                  "traffic goes to its original destination"]


def test_interception_block_service_must_be_a_name():
    assert errors_of({"interception": {"service": 5}}) == [
        "interception.service: must be a service id or name (a string)"]


def test_ebpf_mode_validates_and_fails_open_by_default():
    validated = validate_config({"plugins": [{"name": "tproxy", "config": {"mode": "ebpf"}}]})
    [entry] = intercept_entries(validated.config)
    assert (entry.mode, entry.fail_open) == ("ebpf", True)


def test_fail_open_is_refused_in_tproxy_mode_with_a_reason():
    errors = errors_of({"plugins": [{"name": "tproxy", "config": {"fail_open": True}}]})
    assert len(errors) == 1 and errors[0].startswith("plugins[0].config")
    assert "fail_open" in errors[0] and "mode: ebpf" in errors[0]


def test_handle_tcp_replaces_the_old_mode_values():
    errors = errors_of({"plugins": [{"name": "tproxy", "config": {"mode": "tcp"}}]})
    assert errors[0].startswith("plugins[0].config.mode"), errors
