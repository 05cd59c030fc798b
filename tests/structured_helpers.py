"""Shared pieces of the structured-output tests: a byte-level BPE tokenizer that can spell JSON, seeded
random schemas from the supported subset, and a small validator for that subset (no jsonschema
dependency)."""

import numpy as np

from npgpt.tokenizer import BPETokenizer

from helpers import corpus

JSON_TEXT = ' {"name": "bob", "age": 12, "tags": ["a", "b"], "ok": true, "x": null, "v": -1.5e3} ' * 5


def bpe_tokenizer(size=320):
    """Byte-level BPE: every byte is a token, and merges make multi-byte ones (the walk is tested)."""
    return BPETokenizer.train(corpus(300) + JSON_TEXT, size)


def random_schema(rng, depth=0):
    """A random schema of the supported subset (objects, arrays, strings, numbers, integers, booleans,
    null, enums, anyOf, additionalProperties: false), small enough to close in ~100 tokens."""
    kinds = ["string", "number", "integer", "boolean", "null", "enum"]
    if depth < 2:
        kinds += ["object", "object", "array"]
    if depth == 0:
        kinds = ["object"]
    k = kinds[rng.integers(len(kinds))]
    if k == "string":
        s = {"type": "string"}
        if rng.random() < 0.5:
            s["maxLength"] = int(rng.integers(1, 12))
            if rng.random() < 0.5:
                s["minLength"] = int(rng.integers(0, s["maxLength"] + 1))
        return s
    if k == "enum":
        pool = ["red", "green", 3, 4.5, True, None, "a b"]
        return {"enum": [pool[i] for i in rng.choice(len(pool), int(rng.integers(1, 4)), replace=False)]}
    if k == "array":
        s = {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": int(rng.integers(1, 4))}
        if rng.random() < 0.5:
            s["minItems"] = int(rng.integers(0, s["maxItems"] + 1))
        return s
    if k == "object":
        n = int(rng.integers(1, 4))
        props = {f"k{depth}{i}": random_schema(rng, depth + 1) for i in range(n)}
        if rng.random() < 0.2:
            name = next(iter(props))
            props[name] = {"anyOf": [props[name], {"type": "null"}]}
        req = [p for p in props if rng.random() < 0.6]
        return {"type": "object", "properties": props, "required": req, "additionalProperties": False,
                "title": "T"}
    return {"type": k}


def _is(v, t):
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return {"string": str, "boolean": bool, "null": type(None), "array": list, "object": dict}[t] is type(v)


def validate(v, s, defs=None):
    """Whether value v is valid under schema s (the subset npgpt.structured supports)."""
    defs = defs if defs is not None else {**s.get("$defs", {})} if isinstance(s, dict) else {}
    if s is True or s == {}:
        return True
    if "$ref" in s:
        return validate(v, defs[s["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in s:
        return any(validate(v, a, defs) for a in s["anyOf"])
    if "const" in s:
        return v == s["const"] and type(v) is type(s["const"])
    if "enum" in s:
        return any(v == e and type(v) is type(e) for e in s["enum"])
    t = s.get("type")
    types = t if isinstance(t, list) else [t]
    if t is not None and not any(_is(v, x) for x in types):
        return False
    if isinstance(v, str):
        return s.get("minLength", 0) <= len(v) <= s.get("maxLength", np.inf)
    if isinstance(v, list):
        return (s.get("minItems", 0) <= len(v) <= s.get("maxItems", np.inf)
                and all(validate(x, s.get("items", True), defs) for x in v))
    if isinstance(v, dict):
        props = s.get("properties", {})
        if any(r not in v for r in s.get("required", [])):
            return False
        if s.get("additionalProperties", True) is False and any(k not in props for k in v):
            return False
        return all(validate(x, props[k], defs) for k, x in v.items() if k in props)
    return True
