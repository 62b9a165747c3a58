"""Griffe extension for the docs site: the package's reST markup as Markdown.

The docstrings follow the Google layout (``Args:``, ``Returns:``) but write
cross-references and mathematics in reST, as Sphinx and ``help()`` read them:
``:func:`bayescurv.compute```, ``:meth:`fit```, ``:math:`\\delta```, ``.. math::``
blocks. mkdocstrings renders Markdown, where these would show raw (``:func:``
followed by code). Rather than rewrite several hundred docstrings, the docs build
(``mkdocs.yml``: mkdocstrings ``extensions``) translates them when the package is
loaded:

- a cross-reference role (``func``, ``class``, ``meth``, ``attr``, ``mod``,
  ``data``, ``exc``, ``obj``, ``const``; ``~`` shows the last component only;
  ``title <target>`` an explicit title) becomes an autorefs link to the API
  page that renders the target, resolved like Sphinx: in the object's own
  scope first (members, inherited members, imports), then its parents', then
  as an absolute path. A target no page renders (a private helper, torch)
  stays plain code, without a warning;
- ``:math:`x``` becomes ``$x$`` and a ``.. math::`` block a ``$$`` block, both
  typeset by ``pymdownx.arithmatex`` and MathJax.

Nothing here changes the package; ``help()`` still shows the reST source.
"""

from __future__ import annotations

import html
import re
from typing import Any

from griffe import Extension, Object

_ROLE = re.compile(
    r"(?<![\w`]):(?:py:)?(?P<role>func|class|meth|attr|mod|data|exc|obj|const|math):"
    r"`(?P<text>[^`]+)`"
)
_EXPLICIT = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^<>]+)>$", re.S)
_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")


def _members(obj: Any) -> dict[str, Any]:
    if getattr(obj, "is_class", False):
        try:
            return obj.all_members
        except Exception:  # noqa: BLE001 - unresolvable bases: own members only
            return obj.members
    return obj.members


def _final(obj: Any) -> Any | None:
    if getattr(obj, "is_alias", False):
        try:
            return obj.final_target
        except Exception:  # noqa: BLE001 - an alias to a package griffe did not load
            return None
    return obj


def _walk(start: Any, parts: list[str]) -> tuple[str, Any] | None:
    """``parts`` looked up from ``start``: the identifier of the rendered object (an
    inherited member keeps the path under the class that renders it) and the object."""
    obj, path = start, None
    for part in parts:
        member = _members(obj).get(part)
        if member is None:
            return None
        inherited = getattr(member, "inherited", False)
        target = _final(member)
        if target is None:
            return None
        path = member.path if inherited else target.path
        obj = target
    return path, obj


def _resolve(obj: Object, target: str, role: str, collection: Any) -> str | None:
    parts = target.lstrip(".").split(".")
    found = None
    scope: Any = obj if (obj.is_module or obj.is_class) else obj.parent
    while scope is not None and found is None:
        found = _walk(scope, parts)
        scope = scope.parent
    if found is None and (top := collection.members.get(parts[0])) is not None:
        found = (top.path, top) if len(parts) == 1 else _walk(top, parts[1:])
    if found is None:
        return None
    path, hit = found
    # A package that re-exports a function under its module's name
    # (``bayescurv.curvature.compute``): griffe keeps the module, Python the function.
    if role != "mod" and hit.is_module and parts[-1] in hit.members:
        inner = _walk(hit, [parts[-1]])
        if inner is not None:
            path = inner[0]
    return path


def _role(match: re.Match[str], obj: Object, collection: Any) -> str:
    role, text = match["role"], match["text"]
    if role == "math":
        return f"${text.strip()}$"
    explicit = _EXPLICIT.match(text)
    target = (explicit["target"] if explicit else text).strip().lstrip("!")
    short = target.startswith("~")
    target = target.lstrip("~")
    title = explicit["title"] if explicit else (target.rsplit(".", 1)[-1] if short else target)
    path = _resolve(obj, target, role, collection)
    if path is None:
        return f"`{title}`"
    return (
        f'<code><autoref identifier="{html.escape(path)}" optional>{html.escape(title)}'
        "</autoref></code>"
    )


def _math_blocks(text: str) -> str:
    """``.. math::`` (content on the directive line and/or indented below) as a
    ``$$`` block at the directive's indentation."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = _MATH_BLOCK.match(lines[i])
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        indent, body = m["indent"], [m["rest"]] if m["rest"].strip() else []
        i += 1
        block: list[str] = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():  # trailing blank lines stay outside
            block.pop()
            i -= 1
        body += [ln.strip() for ln in block if ln.strip() and not ln.strip().startswith(":")]
        if out and out[-1].strip():
            out.append("")
        out += [f"{indent}$$", *(f"{indent}{ln}" for ln in body), f"{indent}$$"]
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


def translate(text: str, obj: Object, collection: Any) -> str:
    """``text`` (a docstring of ``obj``) with its reST roles and math as Markdown."""
    if ".. math::" in text:
        text = _math_blocks(text)
    return _ROLE.sub(lambda m: _role(m, obj, collection), text)


class RestToMarkdown(Extension):
    """Rewrite every docstring of a loaded package once the whole package is known
    (cross-references need every module)."""

    def on_package(self, *, pkg: Any, loader: Any, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack = [pkg]
        while stack:
            obj = stack.pop()
            if obj.is_alias or id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = obj.docstring
            if doc is not None and (":`" in doc.value or ".. math::" in doc.value):
                doc.value = translate(doc.value, obj, loader.modules_collection)
            stack.extend(obj.members.values())
