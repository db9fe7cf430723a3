"""TLS config: server certificates (`ssls`, chosen by SNI), the HTTPS listeners
(`gateway.https_listen`) and the `tls` block of an upstream with `scheme: https`.

```yaml
gateway:
  https_listen: ["0.0.0.0:9443"]   # default when ssls has an enabled entry; else no listener
ssls:                              # APISIX's ssl resource shape
  - id: example
    cert: /etc/sluicegate/example.crt    # a PEM file path, or the PEM text itself
    key: /etc/sluicegate/example.key
    snis: ["example.com", "*.example.com"]
upstreams:
  - id: secure
    scheme: https
    nodes: {"backend.internal:443": 1}
    pass_host: node                # the TLS name checked is the Host sent upstream
    tls:
      verify: true                 # default (APISIX's default is false)
      ca_file: /etc/ssl/internal-ca.pem  # default: the system trust store
      client_cert: /etc/sluicegate/client.crt   # optional mutual TLS
      client_key: /etc/sluicegate/client.key
      sni: backend.internal        # optional: the name sent and verified
```

Certificates, keys and CA files are read and checked here, at load: an unreadable file, a
PEM that does not parse, or a key that does not belong to its certificate is reported with
its field path (`ssls[0].key: does not match cert`). Relative paths are relative to the
gateway's working directory. The data plane builds `ssl.SSLContext`s from the same values
(`sluicegate.http.tls`) when a config snapshot is compiled.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from sluicegate.config.model import GatewayConfig, UpstreamConfig

# Where HTTPS is served when `ssls` has an enabled certificate and `https_listen` is unset
# (APISIX's default HTTPS port).
DEFAULT_HTTPS_LISTEN = "0.0.0.0:9443"
PEM_MARKER = "-----BEGIN"
# A DNS name (RFC 1123 labels), optionally `*.` + name: the wildcard form SNI lists use.
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
SNI_PATTERN = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}$")
HOST_PATTERN = re.compile(rf"^({_LABEL}\.)*{_LABEL}$")


class _Strict(BaseModel):
    # config.model.Strict, repeated: model.py imports this module.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _check_sni(name: str) -> str:
    name = name.strip().lower().rstrip(".")
    if len(name) > 253 or not SNI_PATTERN.match(name):
        raise ValueError(f"{name!r} is not a host name or '*.'+host name (write IDNs in their "
                         "xn-- form)")
    return name


ServerName = Annotated[str, AfterValidator(_check_sni)]


class SslConfig(_Strict):
    """A server certificate and the TLS server names (SNI) it answers for.

    A client's SNI selects the certificate whose `snis` has the exact name, else the
    longest matching wildcard (`*.example.com` matches any name ending `.example.com`),
    else the first enabled entry here."""

    id: Annotated[str, Field(min_length=1, max_length=64,
                             pattern=r"^[A-Za-z0-9_.\-]+$")] | None = None
    desc: str | None = None
    cert: str = Field(min_length=1)
    """The certificate (chain, leaf first): PEM text, or the path of a PEM file."""
    key: str = Field(min_length=1)
    """The certificate's private key (unencrypted PEM): PEM text, or the path of a file."""
    snis: list[ServerName] | None = None
    """Server names this certificate is for; `*.example.com` is a wildcard. Required
    (or `sni`)."""
    sni: ServerName | None = None
    """One server name (APISIX's older single-name form of `snis`)."""
    status: Literal[0, 1] = 1
    """0 disables the entry (APISIX)."""

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @property
    def server_names(self) -> list[str]:
        return list(self.snis) if self.snis else [self.sni or ""]


class UpstreamTlsConfig(_Strict):
    """How to reach an upstream with `scheme: https` (APISIX's upstream `tls`, plus
    `ca_file` and `sni`). The certificate is verified by default."""

    verify: bool = True
    """Verify the upstream's certificate chain and name. APISIX's default is false; ours
    is true, so a proxied https connection is as safe as a browser's."""
    ca_file: str | None = None
    """CA certificates (PEM path, or PEM text) the upstream's chain must lead to; default:
    the system trust store."""
    client_cert: str | None = None
    """A client certificate for mutual TLS (PEM path or text); needs client_key."""
    client_key: str | None = None
    """The client certificate's private key (PEM path or text)."""
    sni: str | None = None
    """The TLS server name sent and verified; default: the Host the request is sent upstream
    with (the pass_host result, port removed), as APISIX does."""

    @field_validator("sni")
    @classmethod
    def _sni(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.strip().lower().rstrip(".")
        if _is_ip(name) or (len(name) <= 253 and HOST_PATTERN.match(name)):
            return name
        raise ValueError(f"{value!r} is not a host name or IP address")

    @model_validator(mode="after")
    def _check(self) -> UpstreamTlsConfig:
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("client_cert and client_key go together")
        return self


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def https_listen_addresses(config: GatewayConfig) -> list[str]:
    """The HTTPS listeners: `gateway.https_listen` if set, else the default address when an
    enabled certificate exists, else none."""
    configured = config.gateway.https_listen
    if configured is not None:
        return list(configured)
    return [DEFAULT_HTTPS_LISTEN] if any(s.status for s in config.ssls) else []


# -- PEM reading and checks (load time) ------------------------------------------------------


class PemError(ValueError):
    """A PEM value that cannot be used; the message is the reason, without the field."""


def read_pem(value: str) -> bytes:
    """PEM text as given, or the contents of the file it names."""
    if PEM_MARKER in value:
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise PemError(f"cannot read {value}: {exc.strerror}") from None


def load_certificates(data: bytes) -> list[Any]:
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PemError("not a PEM certificate") from None
    if not certificates:
        raise PemError("not a PEM certificate")
    return certificates


def load_private_key(data: bytes) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        return load_pem_private_key(data, password=None)
    except TypeError:
        raise PemError("an encrypted private key (give it unencrypted)") from None
    except Exception:  # ValueError, or UnsupportedAlgorithm for an unknown key type
        raise PemError("not a PEM private key") from None


@contextlib.contextmanager
def _pem_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds `data`: an anonymous memory file where Linux has
    one (keys never touch a disk), else a private temporary file, removed at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sluicegate-pem", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as handle:
                handle.write(data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile() as handle:  # created 0600
        handle.write(data)
        handle.flush()
        yield handle.name


def load_key_pair(context: ssl.SSLContext, cert_value: str, key_value: str) -> None:
    """Load a certificate chain and key given as PEM text or file paths."""
    with _pem_file(read_pem(cert_value)) as cert_path, \
            _pem_file(read_pem(key_value)) as key_path:
        context.load_cert_chain(cert_path, key_path)


def _public_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def check_key_pair(cert_value: str, key_value: str, cert_path: str, key_path: str,
                   cert_name: str, errors: list[str]) -> Any:
    """Read and parse a certificate and its key; report problems with field paths. Returns
    the leaf certificate, or None when something is wrong."""
    leaf = key = None
    try:
        leaf = load_certificates(read_pem(cert_value))[0]
    except PemError as exc:
        errors.append(f"{cert_path}: {exc}")
    try:
        key = load_private_key(read_pem(key_value))
    except PemError as exc:
        errors.append(f"{key_path}: {exc}")
    if leaf is None or key is None:
        return None
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        errors.append(f"{key_path}: does not match {cert_name}")
        return None
    try:  # what the data plane will do with them; OpenSSL refuses e.g. RSA keys < 2048 bits
        load_key_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert_value, key_value)
    except ssl.SSLError as exc:
        errors.append(f"{cert_path}: OpenSSL refuses it: {exc.reason or exc}")
        return None
    return leaf


def check_tls(config: GatewayConfig, errors: list[str], warnings: list[str]) -> None:
    """The semantic TLS checks of `validate_config`: files readable, PEMs parse, keys match
    their certificates, no server name claimed twice, listeners have certificates."""
    now = datetime.datetime.now(datetime.UTC)
    owners: dict[str, int] = {}
    ids: dict[str, int] = {}
    for index, entry in enumerate(config.ssls):
        path = f"ssls[{index}]"
        if entry.id is not None and ids.setdefault(entry.id, index) != index:
            errors.append(f"{path}.id: {entry.id!r} already used by ssls[{ids[entry.id]}]")
        if entry.sni and entry.snis:
            errors.append(f"{path}.sni: use sni or snis, not both")
        elif not entry.sni and not entry.snis:
            errors.append(f"{path}.snis: required (the server names this certificate is for)")
        leaf = check_key_pair(entry.cert, entry.key, f"{path}.cert", f"{path}.key", "cert", errors)
        if leaf is not None and entry.status:
            if leaf.not_valid_after_utc < now:
                warnings.append(f"{path}.cert: expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
            elif leaf.not_valid_before_utc > now:
                warnings.append(f"{path}.cert: not valid before "
                                f"{leaf.not_valid_before_utc:%Y-%m-%d}")
        if not entry.status:
            continue
        field = "snis" if entry.snis else "sni"
        for position, name in enumerate(entry.server_names):
            owner = owners.setdefault(name, index)
            if owner != index:
                where = f"{path}.snis[{position}]" if field == "snis" else f"{path}.sni"
                errors.append(f"{where}: {name!r} already used by ssls[{owner}]")
    if config.gateway.https_listen and not any(s.status for s in config.ssls):
        errors.append("gateway.https_listen: no certificate to serve (add an entry to ssls)")
    for path, upstream in _upstreams(config):
        _check_upstream_tls(upstream, path, errors)


def _upstreams(config: GatewayConfig) -> list[tuple[str, UpstreamConfig]]:
    found = [(f"upstreams[{i}]", u) for i, u in enumerate(config.upstreams)]
    for kind in ("routes", "services"):
        for index, item in enumerate(getattr(config, kind)):
            if item.upstream is not None:
                found.append((f"{kind}[{index}].upstream", item.upstream))
    return found


def _check_upstream_tls(upstream: UpstreamConfig, path: str, errors: list[str]) -> None:
    tls = upstream.tls
    if tls is None:
        return
    if upstream.scheme != "https":
        errors.append(f"{path}.tls: only used with scheme 'https'")
        return
    if tls.ca_file is not None:
        try:
            load_certificates(read_pem(tls.ca_file))
        except PemError as exc:
            errors.append(f"{path}.tls.ca_file: {exc}")
    if tls.client_cert and tls.client_key:
        check_key_pair(tls.client_cert, tls.client_key, f"{path}.tls.client_cert",
                       f"{path}.tls.client_key", "client_cert", errors)
