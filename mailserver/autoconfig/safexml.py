"""Parse a small XML request without DTDs: no entities, no external references.

expat expands internal entities (the "billion laughs" bomb) and ElementTree offers no
switch to forbid them, so any document type declaration is refused as soon as expat
sees it, before a single entity is declared; undeclared entity references are then
already errors.  The caller bounds the input size; the nesting depth is bounded here.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.parsers import expat

MAX_DEPTH = 32


class XMLRefused(ValueError):
    """Malformed XML, or XML using features this parser refuses."""


def parse(data: bytes) -> ET.Element:
    """The root element of `data`; raises XMLRefused for anything unsafe or malformed."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator="}")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    depth = 0

    def refuse(*_: object) -> None:
        raise XMLRefused("document type declarations and entities are not accepted")

    def start(name: str, attributes: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise XMLRefused(f"elements nested deeper than {MAX_DEPTH}")
        builder.start(_qualified(name), {_qualified(k): v for k, v in attributes.items()})

    def end(name: str) -> None:
        nonlocal depth
        depth -= 1
        builder.end(_qualified(name))

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
        return builder.close()
    except expat.ExpatError as e:
        raise XMLRefused(f"malformed XML: {expat.ErrorString(e.code)}") from None
    except AssertionError:  # TreeBuilder: no root element
        raise XMLRefused("malformed XML: no element") from None
    except XMLRefused:  # a DOCTYPE or depth refusal from a handler: as it is
        raise
    except (LookupError, ValueError) as e:   # an encoding expat cannot use ("utf-7", "hex")
        raise XMLRefused(f"unusable XML encoding: {type(e).__name__}") from None


def _qualified(name: str) -> str:
    """expat's 'uri}local' as ElementTree's '{uri}local'."""
    return "{" + name if "}" in name else name


def local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


def child(element: ET.Element, name: str) -> ET.Element | None:
    """The first child whose local name is `name`, whatever its namespace."""
    for c in element:
        if local_name(c.tag) == name:
            return c
    return None
