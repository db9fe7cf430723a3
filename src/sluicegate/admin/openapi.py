"""The Admin API's OpenAPI 3.1 description, served at /apisix/admin/openapi.json.

Resource bodies reuse the config's JSON Schema (`config_json_schema`, built from the
pydantic models): the API and the config file describe a route with one schema. That schema
covers field types and shapes; reference and cross-field checks happen on write and answer
400 with the field path.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from sluicegate import __version__
from sluicegate.admin.resources import singular
from sluicegate.store.base import RESOURCE_KINDS, id_field

# The id patterns of config.model (ObjectId, ConsumerConfig.username).
ID_PATTERN = r"^[A-Za-z0-9_.\-]+$"
USERNAME_PATTERN = r"^[A-Za-z0-9_\-]+$"
SCHEMAS = "#/components/schemas/"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": SCHEMAS + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _rewrite_refs(node: Any) -> Any:
    """JSON Schema `#/$defs/X` → OpenAPI `#/components/schemas/X`."""
    if isinstance(node, dict):
        return {key: (value.replace("#/$defs/", SCHEMAS) if key == "$ref"
                      and isinstance(value, str) else _rewrite_refs(value))
                for key, value in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(value) for value in node]
    return node


ERRORS = {
    "401": _json(_ref("Error"), "missing or wrong X-API-KEY"),
    "403": _json(_ref("Error"), "the client address is not in admin.allow_admin"),
}


def _errors(*codes: str) -> dict[str, Any]:
    described = {
        "400": "invalid: `errors` lists each problem as field.path: reason",
        "404": "no such resource",
        "405": "method not allowed for this resource",
        "413": "body over 1 MiB",
    }
    return {**ERRORS, **{code: _json(_ref("Error"), described[code]) for code in codes}}


@lru_cache(maxsize=1)
def _openapi_document() -> dict[str, Any]:
    from sluicegate.config.schema import config_json_schema

    config_schema = config_json_schema()
    schemas: dict[str, Any] = _rewrite_refs(config_schema.pop("$defs", {}))
    schemas["Error"] = {
        "type": "object", "required": ["error_msg"],
        "properties": {"error_msg": {"type": "string"},
                       "errors": {"type": "array", "items": {"type": "string"}}}}
    schemas["Item"] = {
        "type": "object", "required": ["key", "value", "createdIndex", "modifiedIndex"],
        "properties": {"key": {"type": "string"}, "value": {"type": "object"},
                       "createdIndex": {"type": "integer"},
                       "modifiedIndex": {"type": "integer"}}}
    schemas["ItemList"] = {
        "type": "object", "required": ["list", "total"],
        "properties": {"list": {"type": "array", "items": _ref("Item")},
                       "total": {"type": "integer", "minimum": 0}}}
    schemas["Deleted"] = {
        "type": "object", "required": ["deleted", "key"],
        "properties": {"deleted": {"type": "string"}, "key": {"type": "string"}}}
    paths: dict[str, Any] = {}
    for kind in RESOURCE_KINDS:
        items = config_schema.get("properties", {}).get(kind, {}).get("items")
        # A kind the config model does not know yet is still served; its body is checked
        # by the validator alone.
        body_schema = _rewrite_refs(items) if items else {"type": "object"}
        key_field = id_field(kind)
        name = singular(kind)
        pattern = USERNAME_PATTERN if key_field == "username" else ID_PATTERN
        id_parameter = {"name": "id", "in": "path", "required": True,
                        "description": f"the {name}'s {key_field}",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 64,
                                   "pattern": pattern}}
        body = {"required": True, "content": {"application/json": {"schema": body_schema}}}
        # What a create answers leads to the item's other operations (stateful testing,
        # generated clients).
        links = {f"{verb}_{name}": {"operationId": f"{verb}_{name}",
                                    "parameters": {"id": f"$response.body#/value/{key_field}"}}
                 for verb in ("get", "patch", "delete")}
        created = {**_json(_ref("Item"), "created"), "links": links}
        # PUT to the collection names the resource in the body.
        keyed_body = {"required": True, "content": {"application/json": {"schema": {
            "allOf": [body_schema, {"type": "object", "required": [key_field],
                                    "properties": {key_field: id_parameter["schema"]}}]}}}}
        collection: dict[str, Any] = {
            "get": {"summary": f"list {kind}", "operationId": f"list_{kind}",
                    "responses": {"200": _json(_ref("ItemList"), f"every {name}"),
                                  **_errors()}},
            "put": {"summary": f"create or replace a {name} ({key_field} in the body)",
                    "operationId": f"put_{name}_by_body", "requestBody": keyed_body,
                    "responses": {"200": _json(_ref("Item"), "replaced"),
                                  "201": created,
                                  **_errors("400", "413")}},
        }
        if key_field == "id":
            collection["post"] = {
                "summary": f"create a {name} with a generated id",
                "operationId": f"post_{name}", "requestBody": body,
                "responses": {"201": created,
                              **_errors("400", "413")}}
        paths[f"/apisix/admin/{kind}"] = collection
        paths[f"/apisix/admin/{kind}/{{id}}"] = {
            "parameters": [id_parameter],
            "get": {"summary": f"one {name}", "operationId": f"get_{name}",
                    "responses": {"200": _json(_ref("Item"), f"the {name}"),
                                  **_errors("404")}},
            "put": {"summary": f"create or replace a {name}", "operationId": f"put_{name}",
                    "requestBody": body,
                    "responses": {"200": _json(_ref("Item"), "replaced"),
                                  "201": created,
                                  **_errors("400", "413")}},
            "patch": {"summary": f"change part of a {name} (JSON merge patch, RFC 7396: "
                                 "null removes a field)",
                      "operationId": f"patch_{name}",
                      "requestBody": {"required": True, "content": {
                          "application/json": {"schema": {"type": "object"}}}},
                      "responses": {"200": _json(_ref("Item"), "changed"),
                                    **_errors("400", "404", "413")}},
            "delete": {"summary": f"delete a {name} (refused while something uses it)",
                       "operationId": f"delete_{name}",
                       "responses": {"200": _json(_ref("Deleted"), "deleted"),
                                     **_errors("400", "404")}},
        }
    paths["/apisix/admin/config"] = {"get": {
        "summary": "the running config: settings and every resource (secrets redacted)",
        "operationId": "get_config",
        "responses": {"200": _json({"type": "object", "required": ["value"],
                                    "properties": {"value": {"type": "object"}}},
                                   "the config document"), **_errors()}}}
    paths["/apisix/admin/openapi.json"] = {"get": {
        "summary": "this description", "operationId": "get_openapi",
        "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1"), **_errors()}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "sluicegate Admin API", "version": __version__,
                 "description": "APISIX-compatible paths and JSON shapes. Every change is "
                                "validated as a whole config, as the file loader does."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"}}},
        "security": [{"apiKey": []}],
    }


def openapi_document() -> dict[str, Any]:
    """A copy: callers may change it."""
    return copy.deepcopy(_openapi_document())
