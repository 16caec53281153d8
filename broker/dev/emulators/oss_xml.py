"""OSS's XML bodies: results built from (tag, value-or-children) nodes, and ``<Error>`` answers."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import TypeAlias

from aiohttp import web

from broker.dev.emulators.oss_errors import OssError

__all__ = ["Node", "error_response", "xml_response"]

Node: TypeAlias = tuple[str, "str | Sequence[Node]"]


def xml_response(
    root: str,
    nodes: Sequence[Node],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """``<root>`` holding ``nodes``, as ``application/xml``."""
    return web.Response(
        body=_xml(root, nodes), status=status, content_type="application/xml", headers=headers
    )


def error_response(request: web.Request, err: OssError, request_id: str) -> web.Response:
    """``<Error>`` with Code, Message, RequestId, HostId, details, EC; HEAD: in x-oss-err."""
    nodes: list[Node] = [
        ("Code", err.code),
        ("Message", err.message),
        ("RequestId", request_id),
        ("HostId", request.host),
    ]
    nodes += [(k, v if isinstance(v, str) else list(v.items())) for k, v in err.details.items()]
    headers = {}
    if err.ec:
        nodes += [
            ("EC", err.ec),
            ("RecommendDoc", f"https://api.aliyun.com/troubleshoot?q={err.ec}"),
        ]
        headers["x-oss-ec"] = err.ec
    body = _xml("Error", nodes)
    if request.method == "HEAD":
        headers["x-oss-err"] = base64.b64encode(body).decode()
        return web.Response(status=err.status, headers=headers)
    return web.Response(
        body=body, status=err.status, content_type="application/xml", headers=headers
    )


def _xml(root: str, nodes: Sequence[Node]) -> bytes:
    element = ET.Element(root)
    _fill(element, nodes)
    text = ET.tostring(element, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{text}'.encode()


def _fill(parent: ET.Element, nodes: Sequence[Node]) -> None:
    for tag, value in nodes:
        child = ET.SubElement(parent, tag)
        if isinstance(value, str):
            child.text = value
        else:
            _fill(child, value)
