"""A griffe extension: turns the reST bits of the library's docstrings into Markdown for mkdocstrings.

The docstrings are Google style (Args/Returns/Example) with a few reST constructs that Sphinx users
expect: ``:class:`X``` roles, ``:math:`x``` and ``.. math::`` blocks, simple ``====`` tables, and ``#:``
comments documenting constants.
Here roles become links to the API reference (or code), math becomes arithmatex ``$...$`` and
``$$...$$``, and simple tables become Markdown tables, so the rendered reference shows the equations.
"""

from __future__ import annotations

import pathlib
import re
import textwrap

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")


def _public_names() -> set[str]:
    try:
        import recurrent

        return set(recurrent.__all__)
    except Exception:  # the reference still builds, without links
        return set()


_PUBLIC = _public_names()


def _role(match: re.Match, *, bare_is_public: bool = True) -> str:
    """A link to the reference for a public name of ``recurrent``, else code."""
    target = match.group(1)
    name = target.removeprefix("recurrent.")
    explicit = target.startswith("recurrent.")
    if name in _PUBLIC and (explicit or bare_is_public):
        return f"[`{name}`][recurrent.{name}]"
    return f"`{target}`"


def _math_block(lines: list[str], start: int) -> tuple[list[str], int]:
    """Collects the indented body after a ``.. math::`` line; returns Markdown lines and the next index."""
    indent = len(lines[start]) - len(lines[start].lstrip())
    body, i = [], start + 1
    while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
        body.append(lines[i])
        i += 1
    while body and not body[-1].strip():
        body.pop()
    math = textwrap.dedent("\n".join(body)).strip()
    if "&" in math or "\\\\" in math:
        math = "\\begin{aligned}\n" + math + "\n\\end{aligned}"
    pad = " " * indent
    return ["", pad + "$$", *[pad + line for line in math.splitlines()], pad + "$$", ""], i


def _table(lines: list[str], start: int) -> tuple[list[str], int]:
    """Converts a reST simple table (``====  ====`` rules) starting at ``start`` to Markdown."""
    rule = lines[start]
    indent = len(rule) - len(rule.lstrip())
    spans = [m.span() for m in re.finditer(r"=+", rule)]
    rows, i, rules = [], start + 1, 1
    while i < len(lines) and rules < 3:
        line = lines[i]
        if re.fullmatch(r"\s*[= ]+", line) and "=" in line:
            rules += 1
        elif line.strip():
            cells = [line[a : b if k + 1 < len(spans) else None].strip() for k, (a, b) in enumerate(spans)]
            rows.append(cells)
        i += 1
    if not rows:
        return [rule], start + 1
    pad = " " * indent
    out = ["", pad + "| " + " | ".join(rows[0]) + " |", pad + "|" + " --- |" * len(spans)]
    out += [pad + "| " + " | ".join(row) + " |" for row in rows[1:]]
    return [*out, ""], i


_GROUPED = re.compile(r"(\s*)(\w+(?:, \w+)+):(?: (.*))?")


def _grouped_args(lines: list[str], start: int) -> tuple[list[str], int]:
    """``a, b, c: description`` in an Args section becomes one entry per name (griffe wants one)."""
    match = _GROUPED.fullmatch(lines[start])
    indent, names, first = match.group(1), match.group(2).split(", "), match.group(3) or ""
    body, i = [], start + 1
    while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > len(indent):
        body.append(lines[i])
        i += 1
    out = []
    for name in names:
        out += [f"{indent}{name}: {first}".rstrip(), *body]
    return out, i


def convert(text: str, *, bare_is_public: bool = True) -> str:
    """The Markdown version of a docstring written with reST roles, math and simple tables.

    ``bare_is_public``: a role without the ``recurrent.`` prefix names a public object of
    ``recurrent`` (false in submodules such as ``recurrent.nnx``, whose ``Cell`` is its own).
    """
    lines, out, i, section = text.splitlines(), [], 0, None
    while i < len(lines):
        line = lines[i]
        if re.fullmatch(r"\w[\w ]*:", line.strip()) and not line.startswith(" "):
            section = line.strip()[:-1]
        if section in ("Args", "Arguments", "Parameters") and _GROUPED.fullmatch(line):
            block, i = _grouped_args(lines, i)
            out += block
        elif line.strip() == ".. math::":
            block, i = _math_block(lines, i)
            out += block
        elif re.fullmatch(r"\s*=+(\s+=+)+\s*", line):
            block, i = _table(lines, i)
            out += block
        else:
            out.append(line)
            i += 1
    text = "\n".join(out)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return _ROLE.sub(lambda m: _role(m, bare_is_public=bare_is_public), text)


def _comment_docstring(obj: griffe.Object) -> str | None:
    """The ``#:`` comment lines just above an attribute (Sphinx's docstring for constants)."""
    if obj.filepath is None or obj.lineno is None or isinstance(obj.filepath, list):
        return None
    lines = pathlib.Path(obj.filepath).read_text().splitlines()
    comment, i = [], obj.lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#:"):
        comment.insert(0, lines[i].lstrip()[2:].strip())
        i -= 1
    return "\n".join(comment) or None


class ReSTToMarkdown(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is None and obj.is_attribute:
            text = _comment_docstring(obj)
            if text:
                obj.docstring = griffe.Docstring(text, parent=obj)
        if obj.docstring is not None:
            submodule = obj.path.startswith(("recurrent.nnx", "recurrent.interop"))
            obj.docstring.value = convert(obj.docstring.value, bare_is_public=not submodule)

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        # The root package is reported here, not to on_object.
        self.on_object(obj=pkg)
