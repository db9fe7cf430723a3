"""TLS: HTTPS listeners that pick a certificate by SNI (exact, longest wildcard, first),
TLS 1.2/1.3 only, the same HTTP pipeline over TLS, and https upstreams verified by default.
Every certificate is made here (a test CA, `cryptography`); the https backend is nginx."""

from __future__ import annotations

import datetime
import http.client
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import Gateway, Nginx, TlsNginx, free_port, wait_for_port
from sluicegate.config.load import ConfigError, validate_config
from sluicegate.config.model import GatewayConfig
from sluicegate.config.tls import https_listen_addresses
from sluicegate.http.balancer import UpstreamNode
from sluicegate.http.context import RequestContext
from sluicegate.http.tls import CertificateSet, UpstreamTls

# -- certificates --------------------------------------------------------------------------

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # fast to make, unlike RSA


def _cert(common_name: str, key: Any, issuer: tuple[x509.Certificate, Any] | None = None,
          dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), ca: bool = False,
          not_before: datetime.datetime = NOW - DAY,
          not_after: datetime.datetime = NOW + 30 * DAY) -> x509.Certificate:
    import ipaddress

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    names = [x509.DNSName(name) for name in dns] + [
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    return builder.sign(signing_key, hashes.SHA256())


def _pem(item: Any) -> bytes:
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM)
    return item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())


class Pki:
    """A test CA and the certificates signed by it, written as `<name>.crt`/`<name>.key`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        ca_key = _key()
        self.ca = (_cert("sluicegate test CA", ca_key, ca=True), ca_key)
        self._write("ca", *self.ca)

    def issue(self, name: str, common_name: str, **options: Any) -> tuple[Path, Path]:
        key = _key()
        return self._write(name, _cert(common_name, key, self.ca, **options), key)

    def _write(self, name: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
        cert_path, key_path = self.folder / f"{name}.crt", self.folder / f"{name}.key"
        cert_path.write_bytes(_pem(cert))
        key_path.write_bytes(_pem(key))
        return cert_path, key_path

    def path(self, name: str, kind: str = "crt") -> str:
        return str(self.folder / f"{name}.{kind}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    backend_names = {"dns": ("backend.test", "localhost"), "ips": ("127.0.0.1",)}
    pki.issue("backend", "backend.test", **backend_names)
    pki.issue("expired", "backend.test", not_before=NOW - 30 * DAY, not_after=NOW - DAY,
              **backend_names)
    pki.issue("client", "gateway-client")
    pki.issue("default", "default.test", dns=("default.test",))
    pki.issue("exact", "a.example.com", dns=("a.example.com",))
    pki.issue("wild", "*.example.com", dns=("*.example.com",))
    pki.issue("apiwild", "*.api.example.com", dns=("*.api.example.com",))
    (pki.folder / "other.key").write_bytes(_pem(_key()))
    return pki


# -- a gateway with HTTPS listeners and https upstreams --------------------------------------


@pytest.fixture(scope="module")
def tls_backend(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNginx]:
    server = TlsNginx(tmp_path_factory.mktemp("tls-nginx"), [
        (pki.folder / "backend.crt", pki.folder / "backend.key"),
        (pki.folder / "expired.crt", pki.folder / "expired.key"),
    ], client_ca=pki.folder / "ca.crt")
    yield server
    server.stop()


def _https_upstream(id: str, address: str, **fields: Any) -> dict[str, Any]:
    return {"id": id, "scheme": "https", "nodes": {address: 1}, **fields}


@pytest.fixture(scope="module")
def gateway(pki: Pki, tls_backend: TlsNginx, nginx: Nginx,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    https_port = free_port()
    good, expired = tls_backend.address(0), tls_backend.address(1)
    ca = {"ca_file": pki.path("ca")}
    config = {
        "gateway": {"https_listen": [f"127.0.0.1:{https_port}"]},
        "ssls": [
            # The first entry answers names no entry lists; its PEM is given inline.
            {"id": "default", "cert": (pki.folder / "default.crt").read_text(),
             "key": (pki.folder / "default.key").read_text(), "snis": ["default.test"]},
            {"id": "exact", "cert": pki.path("exact"), "key": pki.path("exact", "key"),
             "snis": ["a.example.com"]},
            {"id": "wild", "cert": pki.path("wild"), "key": pki.path("wild", "key"),
             "snis": ["*.example.com"]},
            {"id": "apiwild", "cert": pki.path("apiwild"), "key": pki.path("apiwild", "key"),
             "sni": "*.api.example.com"},
        ],
        "upstreams": [
            {"id": "plain", "nodes": {nginx.address: 1}},
            _https_upstream("verified", good, pass_host="node", tls=ca),
            _https_upstream("no-ca", good, pass_host="node"),
            _https_upstream("expired", expired, pass_host="node", tls=ca),
            _https_upstream("insecure", expired, pass_host="node", tls={"verify": False}),
            _https_upstream("by-host", good, tls=ca),  # pass_host pass: SNI = client Host
            _https_upstream("sni", good, tls={**ca, "sni": "localhost"}),
            _https_upstream("mtls", good, tls={**ca, "sni": "backend.test",
                                              "client_cert": pki.path("client"),
                                              "client_key": pki.path("client", "key")}),
        ],
        "routes": [
            {"id": "redirect", "uri": "/*", "host": "redirect.test", "upstream_id": "plain",
             "plugins": {"redirect": {"http_to_https": True, "https_port": https_port}}},
            *({"id": name, "uri": "/*", "host": f"{name}.test", "upstream_id": name}
              for name in ("verified", "no-ca", "expired", "insecure", "sni", "mtls")),
            {"id": "by-host", "uri": "/*", "hosts": ["backend.test", "wrongname.test"],
             "upstream_id": "by-host"},
            {"id": "any-host", "uri": "/any-host/*", "priority": 10, "upstream_id": "by-host"},
            {"id": "plain", "uri": "/*", "upstream_id": "plain"},
        ],
    }
    server = Gateway(tmp_path_factory.mktemp("gateway"), config)
    try:
        wait_for_port(https_port, process=server.process)
        yield SimpleNamespace(port=server.port, https_port=https_port, process=server,
                              log=server.log)
    finally:
        server.stop()


# -- a client ------------------------------------------------------------------------------


def insecure_client(**versions: ssl.TLSVersion) -> ssl.SSLContext:
    """Accepts any certificate: the tests look at which one they got."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for name, version in versions.items():
        setattr(context, name, version)
    return context


class Reply(SimpleNamespace):
    status: int
    body: bytes
    headers: http.client.HTTPMessage
    cert: x509.Certificate | None
    version: str | None

    @property
    def names(self) -> list[str]:
        assert self.cert is not None
        san = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return san.value.get_values_for_type(x509.DNSName)

    @property
    def fields(self) -> dict[str, str]:
        """The key=value words of a /headers answer."""
        return dict(word.split("=", 1) for word in self.body.decode().split() if "=" in word)


def call(port: int, path: str = "/", host: str = "plain.test", server_name: str | None = None,
         tls: bool = True, context: ssl.SSLContext | None = None, requests: int = 1
         ) -> list[Reply]:
    """`requests` GETs on one connection (keep-alive), over TLS unless tls=False."""
    sock: Any = socket.create_connection(("127.0.0.1", port), timeout=10)
    cert = version = None
    try:
        if tls:
            sock = (context or insecure_client()).wrap_socket(sock, server_hostname=server_name)
            cert = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))
            version = sock.version()
        replies = []
        for _ in range(requests):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            response = http.client.HTTPResponse(sock)
            response.begin()
            replies.append(Reply(status=response.status, body=response.read(),
                                 headers=response.headers, cert=cert, version=version))
        return replies
    finally:
        sock.close()


def get(gateway: SimpleNamespace, path: str = "/", **options: Any) -> Reply:
    port = gateway.https_port if options.get("tls", True) else gateway.port
    return call(port, path, **options)[0]


# -- the HTTPS listener: certificate selection -----------------------------------------------


def test_sni_exact_name_gets_its_certificate(gateway):
    reply = get(gateway, server_name="a.example.com")
    assert reply.status == 200
    assert reply.names == ["a.example.com"]
    assert get(gateway, server_name="A.Example.COM").names == ["a.example.com"]


def test_sni_exact_name_certificate_verifies_with_the_ca(gateway, pki):
    context = ssl.create_default_context(cafile=pki.path("ca"))
    reply = get(gateway, server_name="a.example.com", context=context)
    assert reply.status == 200


def test_sni_name_under_a_wildcard_gets_the_wildcard_certificate(gateway):
    assert get(gateway, server_name="b.example.com").names == ["*.example.com"]


def test_sni_longest_matching_wildcard_wins(gateway):
    assert get(gateway, server_name="x.api.example.com").names == ["*.api.example.com"]
    assert get(gateway, server_name="x.y.example.com").names == ["*.example.com"]


def test_sni_unknown_or_absent_gets_the_first_certificate(gateway):
    assert get(gateway, server_name="unknown.test").names == ["default.test"]
    assert get(gateway, server_name="example.com").names == ["default.test"]
    assert get(gateway, server_name=None).names == ["default.test"]


# -- protocol versions ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_1_is_refused(gateway):
    old = insecure_client(minimum_version=ssl.TLSVersion.TLSv1_1,
                          maximum_version=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    with pytest.raises(ssl.SSLError):
        get(gateway, server_name="a.example.com", context=old)
    # The same client allowed TLS 1.2 gets through: the refusal was the gateway's.
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    assert get(gateway, server_name="a.example.com", context=old).version == "TLSv1.2"


def test_tls_1_2_and_1_3_are_served(gateway):
    for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3,
                                                                 "TLSv1.3")):
        context = insecure_client(minimum_version=version, maximum_version=version)
        reply = get(gateway, server_name="a.example.com", context=context)
        assert (reply.status, reply.version) == (200, name)


# -- the same pipeline over TLS ------------------------------------------------------------


def test_https_requests_are_proxied_with_forwarded_proto_https(gateway):
    replies = call(gateway.https_port, "/headers", server_name="a.example.com", requests=3)
    assert [r.status for r in replies] == [200, 200, 200]  # keep-alive over TLS
    assert replies[0].fields["xproto"] == "https"
    assert replies[0].fields["host"] == "plain.test"


def test_plain_http_listener_is_unaffected(gateway):
    reply = get(gateway, "/headers", tls=False)
    assert reply.status == 200
    assert reply.fields["xproto"] == "http"


def test_http_to_https_redirect_sees_the_scheme(gateway):
    plain = get(gateway, "/pay?x=1", host="redirect.test", tls=False)
    assert plain.status == 301
    assert plain.headers["Location"] == f"https://redirect.test:{gateway.https_port}/pay?x=1"
    # Over TLS, var("scheme") is https: no redirect loop, the request is proxied.
    assert get(gateway, "/", host="redirect.test", server_name="redirect.test").status == 200


def test_error_answer_over_tls_arrives_while_the_request_body_is_unread(gateway):
    # TLS has no half-close (write_eof); the TLS close (close_notify) reads and drops what
    # the client still sends, so the answer is not lost to a reset.
    context = insecure_client()
    with socket.create_connection(("127.0.0.1", gateway.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="a.example.com") as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: plain.test\r\nContent-Length: 1\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + b"x" * 1_000_000)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 400
        assert response.getheader("Connection") == "close"


# -- https upstreams ---------------------------------------------------------------------------


def test_upstream_https_verified_with_ca_file(gateway):
    reply = get(gateway, "/", host="verified.test", server_name="a.example.com")
    assert (reply.status, reply.body.decode()) == (200, Nginx.BODY)


def test_upstream_https_without_ca_file_is_refused(gateway):
    # Verification is on by default and the system trust store knows nothing of our CA.
    reply = get(gateway, "/", host="no-ca.test", server_name="a.example.com")
    assert reply.status == 502
    assert "unable to get local issuer certificate" in gateway.log()


def test_upstream_with_expired_certificate_is_refused(gateway):
    reply = get(gateway, "/", host="expired.test", server_name="a.example.com")
    assert reply.status == 502
    assert "certificate has expired" in gateway.log()


def test_upstream_verify_false_accepts_any_certificate(gateway):
    assert get(gateway, "/", host="insecure.test", server_name="a.example.com").status == 200


def test_upstream_sni_is_the_host_sent_upstream(gateway):
    reply = get(gateway, "/headers", host="backend.test", server_name="a.example.com")
    assert reply.status == 200
    assert (reply.fields["sni"], reply.fields["host"]) == ("backend.test", "backend.test")
    assert reply.fields["xproto"] == "https"


def test_upstream_certificate_not_for_the_sent_name_is_refused(gateway):
    assert get(gateway, "/", host="wrongname.test", server_name="a.example.com").status == 502


def test_upstream_client_host_that_cannot_be_a_tls_name_is_refused(gateway):
    reply = get(gateway, "/any-host/", host="a..b", tls=False)
    assert reply.status == 502
    assert "'a..b' cannot be a TLS server name" in gateway.log()


def test_upstream_tls_sni_overrides_the_name(gateway):
    reply = get(gateway, "/headers", host="sni.test", server_name="a.example.com")
    assert reply.status == 200
    assert (reply.fields["sni"], reply.fields["host"]) == ("localhost", "sni.test")


def test_upstream_client_certificate_is_presented(gateway):
    reply = get(gateway, "/headers", host="mtls.test", server_name="a.example.com")
    assert reply.status == 200
    assert reply.fields["client"] == "CN=gateway-client"


def test_upstream_tls_connections_are_kept_alive(gateway):
    replies = call(gateway.port, "/headers", host="sni.test", tls=False, requests=3)
    assert [r.status for r in replies] == [200, 200, 200]
    assert len({r.fields["conn"] for r in replies}) == 1  # one upstream TLS connection


# -- WebSocket over TLS, several workers ---------------------------------------------------


def test_websocket_over_https_with_two_workers(pki, start_gateway):
    from websockets.sync.client import connect

    from harness import EchoUpstream

    upstream = EchoUpstream(name="wss", ws_port=free_port())
    try:
        https_port = free_port()
        server = start_gateway({
            "gateway": {"https_listen": [f"127.0.0.1:{https_port}"]},
            "ssls": [{"cert": pki.path("exact"), "key": pki.path("exact", "key"),
                      "snis": ["a.example.com"]}],
            "routes": [{"uri": "/ws/*",
                        "upstream": {"nodes": {f"127.0.0.1:{upstream.ws_port}": 1}}}]},
            workers=2)
        wait_for_port(https_port, process=server.process)
        context = ssl.create_default_context(cafile=pki.path("ca"))
        for _ in range(4):  # connections spread over both workers' listeners
            with connect(f"wss://127.0.0.1:{https_port}/ws/chat", ssl=context,
                         server_hostname="a.example.com", open_timeout=10) as ws:
                big = bytes(range(256)) * 1024
                ws.send(big)
                assert ws.recv(timeout=10) == big
    finally:
        upstream.stop()


# -- reload --------------------------------------------------------------------------------


def test_reload_applies_new_certificates_to_new_handshakes(pki, nginx, start_gateway):
    pki.issue("first", "reload.test", dns=("reload.test",))
    pki.issue("second", "reload.test", dns=("reload.test", "second.reload.test"))
    https_port = free_port()
    config = {"gateway": {"https_listen": [f"127.0.0.1:{https_port}"]},
              "ssls": [{"cert": pki.path("first"), "key": pki.path("first", "key"),
                        "snis": ["reload.test"]}],
              "routes": [{"uri": "/*", "upstream": {"nodes": {nginx.address: 1}}}]}
    server = start_gateway(config)
    wait_for_port(https_port, process=server.process)
    assert call(https_port, server_name="reload.test")[0].names == ["reload.test"]
    config["ssls"][0].update(cert=pki.path("second"), key=pki.path("second", "key"))
    server.write_config(config)
    server.reload()
    deadline = time.monotonic() + 5
    while call(https_port, server_name="reload.test")[0].names == ["reload.test"]:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert call(https_port, server_name="reload.test")[0].names == [
        "reload.test", "second.reload.test"]


def test_stop_does_not_wait_for_idle_https_clients_to_answer_close_notify(pki, nginx,
                                                                          start_gateway):
    # An idle keep-alive client that never reads would hold the drain for its whole
    # drain_timeout; the TLS close is bounded like the plain lingering close (2 s).
    https_port = free_port()
    server = start_gateway({
        "gateway": {"https_listen": [f"127.0.0.1:{https_port}"], "drain_timeout": 10},
        "ssls": [{"cert": pki.path("exact"), "key": pki.path("exact", "key"),
                  "snis": ["a.example.com"]}],
        "routes": [{"uri": "/*", "upstream": {"nodes": {nginx.address: 1}}}]})
    wait_for_port(https_port, process=server.process)
    with socket.create_connection(("127.0.0.1", https_port), timeout=10) as raw, \
            insecure_client().wrap_socket(raw, server_hostname="a.example.com") as idle:
        idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        idle.recv(65536)
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 6


# -- config checks (no processes) ----------------------------------------------------------


def _ssl_config(pki: Pki, **entry: Any) -> dict[str, Any]:
    return {"ssls": [{"cert": pki.path("exact"), "key": pki.path("exact", "key"),
                      "snis": ["a.example.com"], **entry}]}


def _errors(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    return caught.value.errors


def test_config_key_that_does_not_match_the_cert_is_rejected(pki):
    assert _errors(_ssl_config(pki, key=pki.path("other", "key"))) == [
        "ssls[0].key: does not match cert"]


def test_config_pem_problems_name_the_field(pki, tmp_path):
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    errors = _errors(_ssl_config(pki, cert=str(tmp_path / "junk.pem"),
                                 key=str(tmp_path / "missing.key")))
    assert errors[0] == "ssls[0].cert: not a PEM certificate"
    assert errors[1].startswith("ssls[0].key: cannot read ") and "No such file" in errors[1]


def test_config_ssl_needs_snis(pki):
    assert _errors(_ssl_config(pki, snis=None)) == [
        "ssls[0].snis: required (the server names this certificate is for)"]
    error = _errors(_ssl_config(pki, snis=["a.example.com", "bad name"]))[0]
    assert error.startswith("ssls[0].snis[1]: 'bad name' is not a host name")


def test_config_server_name_claimed_twice_is_rejected(pki):
    config = _ssl_config(pki)
    config["ssls"].append(dict(config["ssls"][0], snis=["x.test", "A.example.com"]))
    assert _errors(config) == ["ssls[1].snis[1]: 'a.example.com' already used by ssls[0]"]


def test_config_expired_server_certificate_is_a_warning(pki):
    validated = validate_config(_ssl_config(pki, cert=pki.path("expired"),
                                            key=pki.path("expired", "key")))
    assert validated.warnings[0].startswith("ssls[0].cert: expired on ")


def test_config_https_listen_defaults_to_9443_only_with_certificates(pki):
    assert https_listen_addresses(validate_config({}).config) == []
    assert https_listen_addresses(validate_config(_ssl_config(pki)).config) == [
        "0.0.0.0:9443"]
    assert _errors({"gateway": {"https_listen": ["127.0.0.1:8443"]}}) == [
        "gateway.https_listen: no certificate to serve (add an entry to ssls)"]


def test_config_upstream_tls_problems_name_the_field(pki):
    route = {"uri": "/*", "upstream": {"nodes": {"127.0.0.1:1": 1}, "tls": {"verify": True}}}
    assert _errors({"routes": [route]}) == [
        "routes[0].upstream.tls: only used with scheme 'https'"]
    upstream = {"id": "u", "scheme": "https", "nodes": {"127.0.0.1:1": 1},
                "tls": {"ca_file": "/nonexistent/ca.pem", "client_cert": pki.path("client"),
                        "client_key": pki.path("other", "key")}}
    errors = _errors({"upstreams": [upstream]})
    assert errors[0].startswith("upstreams[0].tls.ca_file: cannot read /nonexistent/ca.pem")
    assert errors[1] == "upstreams[0].tls.client_key: does not match client_cert"
    upstream["tls"] = {"client_cert": pki.path("client")}
    assert _errors({"upstreams": [upstream]}) == [
        "upstreams[0].tls: client_cert and client_key go together"]


def test_config_https_upstream_verifies_by_default():
    config = GatewayConfig.model_validate({"upstreams": [
        {"id": "u", "scheme": "https", "nodes": {"h:443": 1}}]})
    upstream = UpstreamTls(config.upstreams[0])
    assert upstream.context.verify_mode == ssl.CERT_REQUIRED
    assert upstream.context.check_hostname
    assert upstream.context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_docs_tls_example_matches_the_schema():
    import re

    import yaml

    from harness import ROOT

    text = (ROOT / "docs" / "tls.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        GatewayConfig.model_validate(yaml.safe_load(block))  # files are not read here


# -- selection and naming rules (no processes) ---------------------------------------------


def test_certificate_set_selection_order(pki):
    config = GatewayConfig.model_validate({"ssls": [
        {"cert": pki.path(name), "key": pki.path(name, "key"), "snis": snis}
        for name, snis in (("default", ["default.test"]), ("wild", ["*.example.com"]),
                           ("apiwild", ["*.api.example.com"]), ("exact", ["a.example.com"]))]})
    certificates = CertificateSet(config.ssls)
    by_name = {"default": certificates.exact["default.test"],
               "exact": certificates.exact["a.example.com"],
               "wild": certificates.wildcards[".example.com"],
               "apiwild": certificates.wildcards[".api.example.com"]}
    expected = {"a.example.com": "exact", "a.example.com.": "exact", "b.example.com": "wild",
                "a.api.example.com": "apiwild", "api.example.com": "wild",
                "example.com": "default", "nothing": "default", None: "default"}
    for name, owner in expected.items():
        assert certificates.select(name) is by_name[owner], name


@pytest.mark.parametrize(("upstream", "ctx_host", "plugin_host", "expected"), [
    ({"pass_host": "pass"}, "api.example.com", None, "api.example.com"),
    ({"pass_host": "node"}, "api.example.com", None, "backend.internal"),
    ({"pass_host": "rewrite", "upstream_host": "b.test:8443"}, "x", None, "b.test"),
    ({"pass_host": "pass"}, "api.example.com", "Other.test:444", "other.test"),
    ({"pass_host": "pass", "tls": {"sni": "pinned.test"}}, "x", "y", "pinned.test"),
    ({"pass_host": "pass"}, "", None, "backend.internal"),  # HTTP/1.0 without Host
    ({"pass_host": "pass"}, "[::1]", None, "::1"),
])
def test_upstream_tls_name_follows_the_host_sent_upstream(upstream, ctx_host, plugin_host,
                                                          expected):
    config = GatewayConfig.model_validate({"upstreams": [
        {"id": "u", "scheme": "https", "nodes": {"backend.internal:443": 1}, **upstream}]})
    tls = UpstreamTls(config.upstreams[0])
    ctx = RequestContext("GET", "/", "", [], ctx_host, ("127.0.0.1", 1), ("127.0.0.1", 2),
                         "1.1")
    ctx.upstream_host = plugin_host
    node = UpstreamNode("backend.internal", 443, 1)
    assert tls.server_name(node, ctx) == expected
    key = tls.pool_key(node, ctx)
    assert key[:3] == ("backend.internal", 443, expected) and key != node.key
