"""What kube-apiserver's apiextensions does with a CRD's openAPIV3Schema, offline.

`structural_errors(crd)`: the rules a CRD's schemas must follow to be accepted
(k8s.io/apiextensions-apiserver: pkg/apis/apiextensions/validation/validation.go and
pkg/apiserver/schema/validation.go, as documented under "Specifying a structural
schema"), one message per violation, naming the schema path.

`admit(schema, obj, strict=...)`: what the server does to an object before storing it:
drops non-nullable nulls without a default, drops unknown fields (reported as errors
under strict field validation), then validates, with `nullable` allowing null and an
`enum` checked on null like on any value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jsonschema

TYPES = {"array", "boolean", "integer", "number", "object", "string"}
# Keys a schema node may carry (apiextensions' JSONSchemaProps, minus the unsupported).
KNOWN_KEYS = {
    "type", "format", "title", "description", "default", "enum", "example",
    "externalDocs", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "minLength", "maxLength", "pattern", "items", "minItems", "maxItems",
    "properties", "required", "additionalProperties", "minProperties", "maxProperties",
    "nullable", "allOf", "anyOf", "oneOf", "not",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type", "x-kubernetes-validations",
}  # fmt: skip
# Not allowed under allOf/anyOf/oneOf/not ("must be empty to be structural").
NESTED_FORBIDDEN = {
    "type", "default", "title", "description", "nullable", "additionalProperties",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type", "x-kubernetes-validations",
}  # fmt: skip
VALIDATION_REASONS = {
    "FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate",
}  # fmt: skip
_SELF_FIELD = re.compile(r"\bself\.([A-Za-z_][A-Za-z0-9_]*)")
_FIELD_PATH = re.compile(r"^(\.[A-Za-z_][A-Za-z0-9_]*|\[('[^']*'|\d+)\])+$")


def structural_errors(crd: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    for version in crd["spec"]["versions"]:
        root = version.get("schema", {}).get("openAPIV3Schema")
        where = f"spec.versions[{version['name']}].schema.openAPIV3Schema"
        if root is None:
            errors.append(f"{where}: required")
            continue
        errors.extend(_root_errors(root, where))
        errors.extend(_node_errors(root, where, level="root"))
    return errors


def _root_errors(root: dict[str, Any], where: str) -> Iterator[str]:
    if root.get("type") != "object":
        yield f"{where}.type: must be object at the root"
    if "additionalProperties" in root:
        yield f"{where}.additionalProperties: must not be used at the root"
    if root.get("nullable"):
        yield f"{where}.nullable: cannot be true at the root"
    properties = root.get("properties", {})
    for name in ("apiVersion", "kind"):
        if name in properties and properties[name].get("type") != "string":
            yield f"{where}.properties[{name}].type: must be string"
    metadata = properties.get("metadata")
    if metadata is not None:
        extra = (set(metadata) - {"type", "properties"}) | (
            set(metadata.get("properties", {})) - {"name", "generateName"}
        )
        if metadata.get("type") != "object" or extra:
            yield f"{where}.properties[metadata]: may only be {{type: object}}"


def _node_errors(node: dict[str, Any], where: str, *, level: str) -> Iterator[str]:
    unknown = set(node) - KNOWN_KEYS
    if unknown:
        yield f"{where}: unsupported keys {sorted(unknown)}"
    kind = node.get("type")
    untyped_ok = node.get("x-kubernetes-int-or-string") or node.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    if kind == "null":
        yield f"{where}.type: type cannot be set to null, use nullable as an alternative"
    elif kind is not None and kind not in TYPES:
        yield f"{where}.type: {kind!r} is not one of {sorted(TYPES)}"
    elif kind is None and level != "root" and not untyped_ok:
        yield f"{where}.type: must not be empty for specified {level}"
    if node.get("uniqueItems"):
        yield f"{where}.uniqueItems: cannot be set to true"
    properties = node.get("properties") or {}
    additional = node.get("additionalProperties")
    if properties and additional is not None and additional is not True:
        yield f"{where}.additionalProperties: additionalProperties and properties are mutual exclusive"  # noqa: E501
    for name in node.get("required", []):
        if name not in properties:
            yield f"{where}.required: {name!r} is not a property"
    if kind == "array":
        items = node.get("items")
        if not isinstance(items, dict):
            yield f"{where}.items: must be a single schema for an array"
    elif "items" in node:
        yield f"{where}.items: only arrays have items"
    if node.get("x-kubernetes-preserve-unknown-fields") is False:
        yield f"{where}.x-kubernetes-preserve-unknown-fields: must be true or undefined"
    if node.get("x-kubernetes-int-or-string") and node.get("x-kubernetes-preserve-unknown-fields"):
        yield f"{where}.x-kubernetes-preserve-unknown-fields: must be false with int-or-string"
    yield from _nullable_errors(node, where)
    yield from _list_errors(node, where)
    yield from _map_type_errors(node, where)
    yield from _value_errors(node, where)
    yield from _cel_errors(node, where)
    for keyword in ("allOf", "anyOf", "oneOf"):
        for index, option in enumerate(node.get(keyword, [])):
            yield from _nested_errors(option, f"{where}.{keyword}[{index}]")
    if "not" in node:
        yield from _nested_errors(node["not"], f"{where}.not")
    for name, child in properties.items():
        yield from _node_errors(child, f"{where}.properties[{name}]", level="object fields")
    if isinstance(additional, dict):
        yield from _node_errors(additional, f"{where}.additionalProperties", level="object fields")
    if isinstance(node.get("items"), dict):
        yield from _node_errors(node["items"], f"{where}.items", level="array items")


def _nested_errors(node: dict[str, Any], where: str) -> Iterator[str]:
    for key in sorted(NESTED_FORBIDDEN & set(node)):
        yield f"{where}.{key}: must be empty to be structural"
    for name, child in (node.get("properties") or {}).items():
        yield from _nested_errors(child, f"{where}.properties[{name}]")
    if isinstance(node.get("items"), dict):
        yield from _nested_errors(node["items"], f"{where}.items")


def _nullable_errors(node: dict[str, Any], where: str) -> Iterator[str]:
    # kube-openapi checks an enum on null too: a nullable enum without null refuses null.
    if node.get("nullable") and "enum" in node and None not in node["enum"]:
        yield f"{where}.enum: nullable, but null is not in the enum (the server refuses null)"
    if "nullable" in node and not isinstance(node["nullable"], bool):
        yield f"{where}.nullable: must be a boolean"


def _list_errors(node: dict[str, Any], where: str) -> Iterator[str]:
    list_type = node.get("x-kubernetes-list-type")
    keys = node.get("x-kubernetes-list-map-keys")
    if keys is not None and list_type != "map":
        yield f"{where}.x-kubernetes-list-type: must be map if x-kubernetes-list-map-keys is set"
    if list_type is None:
        return
    if list_type not in ("atomic", "set", "map"):
        yield f"{where}.x-kubernetes-list-type: {list_type!r} is not atomic, set or map"
    if node.get("type") != "array":
        yield f"{where}.type: must be array if x-kubernetes-list-type is specified"
        return
    items = node.get("items") or {}
    if list_type in ("set", "map") and items.get("nullable"):
        yield f"{where}.items.nullable: cannot be nullable with x-kubernetes-list-type {list_type}"
    if list_type != "map":
        return
    if not keys:
        yield f"{where}.x-kubernetes-list-map-keys: must not be empty for a map list"
        return
    if items.get("type") != "object":
        yield f"{where}.items.type: must be object if x-kubernetes-list-type is map"
    item_properties = items.get("properties") or {}
    for key in keys:
        prop = item_properties.get(key)
        if prop is None:
            yield f"{where}.x-kubernetes-list-map-keys: {key!r} is not an item property"
            continue
        if key not in items.get("required", []) and "default" not in prop:
            yield f"{where}.items.properties[{key}]: a map key must be required or defaulted"
        if prop.get("nullable"):
            yield f"{where}.items.properties[{key}].nullable: a map key cannot be nullable"
        if prop.get("type") not in ("string", "integer", "number", "boolean"):
            yield f"{where}.items.properties[{key}].type: a map key must be a scalar"
    if len(set(keys)) != len(keys):
        yield f"{where}.x-kubernetes-list-map-keys: must not contain duplicate entries"


def _map_type_errors(node: dict[str, Any], where: str) -> Iterator[str]:
    map_type = node.get("x-kubernetes-map-type")
    if map_type is None:
        return
    if map_type not in ("granular", "atomic"):
        yield f"{where}.x-kubernetes-map-type: {map_type!r} is not granular or atomic"
    if node.get("type") != "object":
        yield f"{where}.type: must be object if x-kubernetes-map-type is specified"


def _value_errors(node: dict[str, Any], where: str) -> Iterator[str]:
    if "pattern" in node:
        try:
            re.compile(node["pattern"])
        except re.error as exc:
            yield f"{where}.pattern: not a regular expression: {exc}"
    if node.get("type", "object") not in TYPES:
        return  # reported above; nothing to validate values against
    if "default" in node:
        # Defaults are validated against their own schema (and pruned) by the server.
        problems = list(_validator(node).iter_errors(node["default"]))
        for problem in problems:
            yield f"{where}.default: {problem.message}"
    for value in node.get("enum", []):
        if value is None:
            continue
        for problem in _validator({k: v for k, v in node.items() if k != "enum"}).iter_errors(
            value
        ):
            yield f"{where}.enum: {value!r}: {problem.message}"


def _cel_errors(node: dict[str, Any], where: str) -> Iterator[str]:
    rules = node.get("x-kubernetes-validations")
    if rules is None:
        return
    if not isinstance(rules, list) or not rules:
        yield f"{where}.x-kubernetes-validations: must be a non-empty list"
        return
    properties = node.get("properties") or {}
    for index, rule in enumerate(rules):
        at = f"{where}.x-kubernetes-validations[{index}]"
        expression = rule.get("rule")
        if not isinstance(expression, str) or not expression.strip():
            yield f"{at}.rule: rule is not specified"
            continue
        if not _balanced(expression):
            yield f"{at}.rule: unbalanced parentheses or quotes"
        if properties:
            for name in _SELF_FIELD.findall(expression):
                if name not in properties:
                    yield f"{at}.rule: self.{name} is not a property of this object"
        message = rule.get("message")
        if message is not None and (not message or "\n" in message):
            yield f"{at}.message: must be non-empty and on one line"
        if message is None and "\n" in expression:
            yield f"{at}.message: required when the rule spans lines"
        field_path = rule.get("fieldPath")
        if field_path is not None:
            if not _FIELD_PATH.match(field_path):
                yield f"{at}.fieldPath: {field_path!r} is not a valid path"
            elif field_path.startswith("."):
                first = re.match(r"\.([A-Za-z_][A-Za-z0-9_]*)", field_path)
                if first and properties and first.group(1) not in properties:
                    yield f"{at}.fieldPath: {field_path!r} names no property"
        if "reason" in rule and rule["reason"] not in VALIDATION_REASONS:
            yield f"{at}.reason: {rule['reason']!r} is not one of {sorted(VALIDATION_REASONS)}"
        unknown = set(rule) - {"rule", "message", "messageExpression", "fieldPath", "reason"}
        unknown -= {"optionalOldSelf"}
        if unknown:
            yield f"{at}: unknown keys {sorted(unknown)}"


def _balanced(expression: str) -> bool:
    depth, quote = 0, ""
    for char in expression:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0 and not quote


# --- what the server does to an object ---


def _as_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """`nullable` as JSON Schema's `type: [T, "null"]`; the enum left as it is."""
    out = {k: v for k, v in node.items() if k in KNOWN_KEYS - {"nullable"} and "x-kube" not in k}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {k: _as_jsonschema(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _as_jsonschema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_as_jsonschema(option) for option in out[key]]
    return out


def _validator(schema: dict[str, Any]) -> jsonschema.Validator:
    return jsonschema.Draft7Validator(_as_jsonschema(schema))


def _prune(value: Any, schema: dict[str, Any], path: str, unknown: list[str]) -> Any:
    if isinstance(value, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        keep_unknown = schema.get("x-kubernetes-preserve-unknown-fields")
        out = {}
        for key, child in value.items():
            child_schema = (properties or {}).get(key)
            if child_schema is None and isinstance(additional, dict):
                child_schema = additional
            if child_schema is None:
                if keep_unknown or additional is True:
                    out[key] = child
                else:
                    unknown.append(f"{path}.{key}")
                continue
            if child is None and not child_schema.get("nullable") and "default" not in child_schema:
                continue  # a non-nullable null is dropped, as unset
            out[key] = _prune(child, child_schema, f"{path}.{key}", unknown)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(v, schema["items"], f"{path}[{i}]", unknown) for i, v in enumerate(value)]
    return value


def admit(schema: dict[str, Any], obj: dict[str, Any], *, strict: bool = False) -> list[str]:
    """The errors the server answers for `obj` (empty: stored, unknown fields dropped)."""
    unknown: list[str] = []
    # metadata is ObjectMeta, checked by the server's own rules, not the CRD's schema.
    pruned = _prune({k: v for k, v in obj.items() if k != "metadata"}, schema, "", unknown)
    errors = [f"unknown field {name.lstrip('.')!r}" for name in unknown] if strict else []
    for problem in _validator(schema).iter_errors(pruned):
        location = ".".join(str(part) for part in problem.absolute_path)
        errors.append(f"{location}: {problem.message}")
    return errors
