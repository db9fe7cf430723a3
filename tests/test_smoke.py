import json
import urllib.request

from harness import route_to


def test_gateway_proxies_to_nginx_and_echo(nginx, echo, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "n", "uri": "/", "upstream": {"nodes": {nginx.address: 1}}},
        {"id": "e", "uri": "/echo/*", "upstream": {"nodes": {echo.address: 1}}},
    ]})
    with urllib.request.urlopen(gateway.url + "/") as response:
        assert response.read().decode() == nginx.BODY
    with urllib.request.urlopen(gateway.url + "/echo/x?y=1") as response:
        info = json.loads(response.read())
    assert info["target"] == "/echo/x?y=1"
    assert route_to  # imported helper is usable
