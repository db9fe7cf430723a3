"""tproxy: transparent interception of traffic whose clients do not know a proxy exists.

The config shape is accepted now so the seed config validates; the interception machinery
(nftables TPROXY rules, policy routing, IP_TRANSPARENT listeners) arrives with issue 3, and
until then `sluicegate run` refuses a config that uses this plugin instead of ignoring it.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from sluicegate.config.model import parse_listen
from sluicegate.plugins.base import Plugin, PluginConfig, register


class TproxyConfig(PluginConfig):
    listen: str = Field("0.0.0.0:80", description="Address and port of the transparent "
                        "listener; intercepted traffic to this port is captured.")
    tproxy: bool = Field(True, description="true: capture traffic transparently (TPROXY); "
                         "false: an ordinary listener.")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value


@register
class Tproxy(Plugin):
    name = "tproxy"
    priority = 0
    schema = TproxyConfig
    available = False
    unavailable_reason = ("transparent interception is not available in this version of "
                          "sluicegate yet (TPROXY support is being built); remove this entry "
                          "to run the rest of the config")
    # The named service may be absent: intercepted traffic then goes to its original
    # destination (validate warns instead of failing).
    service_optional = True
