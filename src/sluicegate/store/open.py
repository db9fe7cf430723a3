"""Which store a `--store` URL names."""

from __future__ import annotations

from pathlib import Path

from sluicegate.store.base import ConfigStore


def open_store(url: str | None, config_path: str | Path) -> ConfigStore:
    """`None` or `file` (or `file://PATH`): the YAML file (`config_path` unless a path is
    given); `etcd://host:port[,host:port][/prefix]`: etcd v3, base settings from the file.
    Raises ValueError for anything else. Opens no connection: the first `load` does."""
    if url is None or url == "file":
        from sluicegate.store.file import FileStore

        return FileStore(config_path)
    if url.startswith("file://"):
        from sluicegate.store.file import FileStore

        return FileStore(url[len("file://"):] or config_path)
    if url.startswith("etcd://"):
        from sluicegate.store.etcd import EtcdStore, parse_etcd_url

        endpoints, prefix = parse_etcd_url(url)
        return EtcdStore(endpoints, prefix, config_path)
    raise ValueError(f"{url!r}: expected etcd://host:port[,host:port][/prefix] or file://PATH")
