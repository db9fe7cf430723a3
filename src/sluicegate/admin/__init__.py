"""The Admin API: APISIX's `/apisix/admin/<kind>` REST paths and JSON shapes over a
`ConfigStore`.

`server` runs it (aiohttp: the control plane, not the data plane's hot path), `auth` guards
it (client address, `X-API-KEY`), `resources` reads and changes resources, validating every
change with the file loader's validator on the whole resulting document, and `openapi`
describes it.
"""
