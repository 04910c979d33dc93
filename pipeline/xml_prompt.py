"""Parse and check NewBie-image prompts (XML captions) without any XML library.

NewBie-image-Exp0.1 was trained on XML-ish captions::

    <character_1><n>$character_1$</n><gender>1girl</gender>
      <appearance>blue_hair, long_twintails</appearance></character_1>
    <general_tags><count>1girl</count><quality>masterpiece</quality></general_tags>
    <caption>A girl waving at the sea, at dusk.</caption>

Official inference feeds Gemma ``system_prompt + caption`` and Jina CLIP the
caption alone.  ``parse_prompt`` accepts what users actually paste:

1. bare XML: several top-level blocks with no single root, any indentation,
   comma-separated tags outside blocks (kept as *loose tags*), comments, an
   optional leading ``<?xml ...?>`` declaration (both dropped, from the body too);
2. any of the above preceded by a system prompt (``You are an assistant ...
   <Prompt Start>``): it is recognised, stripped and recorded, so that it is
   never sent twice.  Official mode always prepends the prompt that matches
   the body's kind; a different one found in front (e.g. the low-quality
   one) is reported in ``warnings``;
3. upstream ComfyUI's JSON wrapper, optionally after a system prompt:
   ``{"character_1": {...}, "image": {"tags": "<xml>", "caption": "..."}}``;
   the body becomes the ``tags`` XML followed by ``<caption>...</caption>``
   when the JSON has a caption and the XML has none;
4. plain text with no tags at all: kind ``"text"``; its comma-separated
   pieces are the loose tags (that is what makes ``tags`` mode useful for
   ordinary tag prompts).

Rules (hand-written scanner, linear time, never expands entities):

* Only ``&lt; &gt; &amp; &quot; &apos;`` and numeric ``&#NN;``/``&#xNN;`` are
  decoded; any other ``&name;`` is an error.  DTDs, entity declarations,
  CDATA and processing instructions are refused.  A bare ``&`` or ``<`` that
  cannot start a reference/tag (``rock & roll``, ``a < b``, ``<3``) is text.
* Attributes are refused (NewBie never used them, and the model would see
  them verbatim in official mode).
* Tag lists are split on commas (also ``，``) and line breaks; each tag is
  stripped and has inner whitespace collapsed to one space; empty pieces are
  dropped.
* Unknown tag names are kept and reported in ``warnings``; unknown
  top-level elements become blocks of their own (``ParsedPrompt.other_blocks``).
  Text inside a block but outside any field is kept as loose tags.
* Errors are ``PromptError`` with the 1-based line/column in the text exactly
  as the user typed it (also inside the JSON wrapper's ``tags`` string).

This module must stay free of torch/ComfyUI imports: it runs in unit tests.
"""
from __future__ import annotations

import bisect
import functools
import json
import json.decoder
import json.scanner
import re
from dataclasses import dataclass, field

SYSTEM_PROMPT_XML = (
    "You are an assistant designed to generate high-quality anime images based on "
    "xml format prompts. <Prompt Start> "
)
SYSTEM_PROMPT_TEXT = (
    "You are an assistant designed to generate high-quality anime images with the "
    "highest degree of image-text alignment based on textual prompts. <Prompt Start> "
)
SYSTEM_PROMPT_LOW_QUALITY = (
    "You are an assistant designed to generate low-quality images based on textual "
    "prompts. <Prompt Start> "
)
_SYSTEM_PROMPT_NAMES = {
    SYSTEM_PROMPT_XML: "XML",
    SYSTEM_PROMPT_TEXT: "plain-text",
    SYSTEM_PROMPT_LOW_QUALITY: "low-quality",
}
_PROMPT_MARKER = "<Prompt Start>"
_ASSISTANT_OPENING = "You are an assistant"

KNOWN_CHARACTER_TAGS = frozenset({
    "n", "gender", "appearance", "clothing", "expression", "action",
    "position", "interaction", "body_type",
})
KNOWN_GENERAL_TAGS = frozenset({
    "count", "style", "artists", "background", "environment", "perspective",
    "lighting", "atmosphere", "quality", "objects", "other", "resolution",
})
MAX_PROMPT_CHARS = 1_000_000
MAX_WARNINGS = 50  # a pasted wall of unknown tags must not flood the UI

ENCODER_MODES = ("official", "tags", "raw")

# All patterns below are anchored or single-pass with no nested quantifiers,
# so they run in linear time on any input.
_CHARACTER_BLOCK = re.compile(r"character_([1-9][0-9]{0,5})")  # bounded: int() stays cheap
_TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_REFERENCE_BODY = r"(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z_][A-Za-z0-9_.\-]*);"
_REFERENCE = re.compile("&" + _REFERENCE_BODY)
_DTD = re.compile(r"<!(?:doctype|entity|element|attlist)", re.IGNORECASE)
_NON_SPACE = re.compile(r"\S")
_TAG_SEPARATORS = re.compile(r"[,\uff0c\r\n]")
_PREDEFINED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}
# A '<' followed by a name, '/', '!', '?' or '>' starts markup; any other '<'
# ("a < b", "<3") is text.  When it is a well-formed tag, the groups are
# (closing '/', name, self-closing '/'), so the common case costs one C call.
# Name characters and \s are disjoint, so this cannot backtrack badly.
_MARKUP_START = re.compile(r"<(?:(/?)([A-Za-z_][A-Za-z0-9_.\-]*)\s*(/?)>|[A-Za-z_/!?>])")
# For flatten_tags: the '<' and '&' that the parser would read as markup / a reference.
# UTF-16 surrogate halves: a Python str can hold them (JSON's "\\ud800" decodes to one), but they have no UTF-8
# form, so the tokenizers' C++ side cannot take them.
_SURROGATE = re.compile("[\ud800-\udfff]")
_NEEDS_ESCAPE = re.compile(r"<(?=[A-Za-z_/!?>])|&(?=" + _REFERENCE_BODY + ")")


class PromptError(ValueError):
    """A prompt the model cannot be given; says where (in the typed text) and how to fix it."""

    def __init__(self, problem: str, *, line: int = 1, column: int = 1,
                 tag: str | None = None, hint: str | None = None, input_name: str | None = None):
        self.problem = problem
        self.line = line
        self.column = column
        self.tag = tag
        self.hint = hint
        self.input_name = input_name  # e.g. "negative prompt": a node has more than one text box
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"line {self.line}, column {self.column}: {self.problem}"
        if self.input_name:
            text = f"{self.input_name}, {text}"
        return f"{text}; {self.hint}" if self.hint else text

    def __reduce__(self):  # keep the fields through pickle/copy (keyword-only __init__)
        return (functools.partial(PromptError, line=self.line, column=self.column, tag=self.tag,
                                  hint=self.hint, input_name=self.input_name), (self.problem,))

    def in_input(self, input_name: str | None) -> "PromptError":
        """The same error, saying which input (e.g. "negative prompt") it is in."""
        return PromptError(self.problem, line=self.line, column=self.column, tag=self.tag, hint=self.hint,
                           input_name=input_name)


@dataclass
class Character:
    index: int
    fields: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str | None:
        names = self.fields.get("n")
        return names[0] if names else None


@dataclass
class ParsedPrompt:
    shape: str
    kind: str
    body: str
    system_prompt_found: str | None
    characters: list[Character]
    general: dict[str, list[str]]
    caption: str
    loose_tags: list[str]
    warnings: list[str]
    # Additions beyond the agreed API (defaults keep positional construction working):
    other_blocks: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    source: str = ""  # the text exactly as typed, for "raw" mode


# --------------------------------------------------------------------------
# Positions: everything the scanner sees is mapped back to the typed text.

class _Source:
    """The typed text plus a map from scanned-text indices back into it."""

    def __init__(self, original: str):
        self.original = original
        self.offsets: list[int] | None = None  # None: the scanned text *is* the original
        self._line_starts: list[int] | None = None
        self.warnings: list[str] = []
        self.dropped_warnings = 0

    def where(self, index: int) -> tuple[int, int]:
        if self.offsets is not None:
            index = self.offsets[min(max(index, 0), len(self.offsets) - 1)]
        if self._line_starts is None:  # built once, so each lookup is O(log n)
            starts = [0]
            find = self.original.find
            pos = find("\n")
            while pos != -1:
                starts.append(pos + 1)
                pos = find("\n", pos + 1)
            self._line_starts = starts
        line = bisect.bisect_right(self._line_starts, index)
        return line, index - self._line_starts[line - 1] + 1

    def error(self, index: int, problem: str, hint: str | None = None,
              tag: str | None = None) -> PromptError:
        line, column = self.where(index)
        return PromptError(problem, line=line, column=column, tag=tag, hint=hint)

    def warn(self, index: int, message: str) -> None:
        if len(self.warnings) >= MAX_WARNINGS:
            self.dropped_warnings += 1
            return
        line, column = self.where(index)
        self.warnings.append(f"line {line}, column {column}: {message}")

    def finished_warnings(self) -> list[str]:
        if self.dropped_warnings:
            return self.warnings + [f"... and {self.dropped_warnings} more warnings"]
        return list(self.warnings)


# --------------------------------------------------------------------------
# Small text helpers shared by the parser and by flatten_tags (which must
# escape exactly what the parser would otherwise read as markup).

def _split_tags(text: str) -> list[str]:
    tags = (" ".join(piece.split()) for piece in _TAG_SEPARATORS.split(text))
    return [tag for tag in tags if tag]


def _escape_for_prompt(text: str) -> str:
    """Escape only the '<' and '&' that would be read back as markup/references."""
    return _NEEDS_ESCAPE.sub(lambda m: "&lt;" if m.group() == "<" else "&amp;", text)


def _is_placeholder(tag: str) -> bool:
    return len(tag) >= 2 and tag[0] == "$" and tag[-1] == "$"


def _looks_like_json(text: str, start: int) -> bool:
    """'{' then optional whitespace then '"': the shape of the upstream wrapper."""
    i = _skip_space(text, start)
    if not text.startswith("{", i):
        return False
    j = _skip_space(text, i + 1)
    return text.startswith('"', j)


def _skip_space(text: str, index: int) -> int:
    found = _NON_SPACE.search(text, index)
    return found.start() if found else len(text)


def _snippet(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# --------------------------------------------------------------------------
# System prompt

def _strip_system_prompts(text: str, src: _Source) -> tuple[int, str | None]:
    """Return (index where the body starts, the system prompt found)."""
    found = None
    start = _skip_space(text, 0)
    while True:  # a prompt pasted twice is stripped twice, never sent twice
        for prompt in _SYSTEM_PROMPT_NAMES:
            if text.startswith(prompt.rstrip(), start):
                this, end = prompt, start + len(prompt.rstrip())
                break
        else:
            if not text.startswith(_ASSISTANT_OPENING, start):
                return start, found
            marker = text.find(_PROMPT_MARKER, start, start + 2000)
            if marker == -1:
                return start, found
            end = marker + len(_PROMPT_MARKER)
            this = text[start:end] + " "
            src.warn(start, "unrecognised system prompt stripped from the front")
        if found is not None:
            src.warn(start, "a second system prompt was stripped; it is sent only once")
        found = found or this
        start = _skip_space(text, end)


# --------------------------------------------------------------------------
# Markup scanner / parser

class _Element:
    """An open element on the parser's stack."""
    __slots__ = ("name", "pos", "role", "owner", "parts", "text_pos")

    def __init__(self, name: str, pos: int, role: str, owner: dict | None):
        self.name = name
        self.pos = pos      # index of its '<' in the scanned text
        self.role = role    # "top" | "character" | "general" | "other" | "field" | "caption"
        self.owner = owner  # blocks: their field dict; fields: the owning block's dict
        self.parts: list[str] = []  # decoded text inside it
        self.text_pos = -1  # where its first non-blank text starts (for warnings)


class _Parser:
    def __init__(self, text: str, start: int, src: _Source):
        self.text = text
        self.start = start
        self.src = src
        self.characters: dict[int, Character] = {}
        self.general: dict[str, list[str]] = {}
        self.other_blocks: dict[str, dict[str, list[str]]] = {}
        self.captions: list[str] = []
        self.loose: list[str] = []
        self.element_count = 0
        self.cut_spans: list[tuple[int, int]] = []  # comments / declaration, left out of the body
        self.stack = [_Element("", start, "top", None)]

    # -- driver --------------------------------------------------------
    def run(self) -> None:
        text, i = self.text, self.start
        search = _MARKUP_START.search
        while True:
            # Only a '<' that can start markup counts; in "a < b" or "<3" it is text.
            found = search(text, i)
            if found is None:
                break
            lt = found.start()
            if lt > i:
                self._text(i, lt)
            closing, name, self_closing = found.groups()
            if name is None or (closing and self_closing):
                i = self._markup(lt)  # comments, declarations, and every malformed tag
                continue
            if closing:
                self._close(name, lt)
            else:
                self._open(name, lt)
                if self_closing:
                    self._close(name, lt)
            i = found.end()
        self._text(i, len(text))
        if len(self.stack) > 1:
            open_ = self.stack[-1]
            raise self.src.error(
                open_.pos, f"<{open_.name}> opened here is never closed",
                "close it before the end of the prompt", open_.name)
        self._flush(self.stack[0])

    def body(self) -> str:
        pieces, prev = [], self.start
        for a, b in self.cut_spans:
            pieces.append(self.text[prev:a])
            prev = b
        pieces.append(self.text[prev:])
        return "".join(pieces).strip()

    # -- text ----------------------------------------------------------
    def _text(self, a: int, b: int) -> None:
        if a >= b:
            return
        decoded = self._decode(a, b)
        node = self.stack[-1]
        if node.text_pos < 0 and decoded.strip():
            node.text_pos = _skip_space(self.text, a)
        node.parts.append(decoded)

    def _decode(self, a: int, b: int) -> str:
        text = self.text
        if text.find("&", a, b) == -1:
            return text[a:b]
        out, prev = [], a
        # An '&' that does not start a reference ("rock & roll") stays text.
        for match in _REFERENCE.finditer(text, a, b):
            out.append(text[prev:match.start()])
            out.append(self._reference(match.group(), match.start()))
            prev = match.end()
        out.append(text[prev:b])
        return "".join(out)

    def _reference(self, ref: str, pos: int) -> str:
        body = ref[1:-1]
        if not body.startswith("#"):
            if body in _PREDEFINED_ENTITIES:
                return _PREDEFINED_ENTITIES[body]
            raise self.src.error(
                pos, f"unknown entity {_snippet(ref)}",
                "only &lt; &gt; &amp; &quot; &apos; and numeric references like &#233; "
                "are allowed; write &amp; for a literal &")
        hexadecimal = body[1:2] in ("x", "X")
        digits = (body[2:] if hexadecimal else body[1:]).lstrip("0") or "0"
        # Length check first: int() on thousands of digits is slow (and capped).
        code = int(digits, 16 if hexadecimal else 10) if len(digits) <= 7 else -1
        if code <= 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise self.src.error(
                pos, f"{_snippet(ref)} is not a valid character reference",
                "use a code point between 1 and 10FFFF, or write &amp; for a literal &")
        return chr(code)

    # -- markup --------------------------------------------------------
    def _markup(self, lt: int) -> int:
        """Handle markup at text[lt] == '<' that is not a plain tag; return the index after it."""
        text, src = self.text, self.src
        after = text[lt + 1]
        if after == "!":
            if text.startswith("<!--", lt):
                end = text.find("-->", lt + 4)
                if end == -1:
                    raise src.error(lt, "comment opened here is never closed", "end it with -->")
                self.cut_spans.append((lt, end + 3))
                return end + 3
            if _DTD.match(text, lt):
                raise _dtd_error(src, lt)
            raise src.error(lt, "'<!' markup other than comments is not allowed in prompts",
                            "remove it, or write &lt; for a literal '<'")
        if after == "?":
            return self._declaration(lt)
        gt = text.find(">", lt)
        next_lt = text.find("<", lt + 1, gt if gt != -1 else len(text))
        if gt == -1 or next_lt != -1:
            stop = next_lt if next_lt != -1 else len(text)
            raise src.error(lt, f"tag {_snippet(text[lt:stop].rstrip())} is missing its closing '>'",
                            "finish the tag with '>', or write &lt; for a literal '<'")
        inner = text[lt + 1:gt]
        closing = inner.startswith("/")
        self_closing = not closing and inner.endswith("/")
        name = inner[1 if closing else 0:len(inner) - 1 if self_closing else len(inner)].rstrip()
        self._check_name(name, inner, lt)
        if closing:
            self._close(name, lt)
        else:
            self._open(name, lt)
            if self_closing:
                self._close(name, lt)
        return gt + 1

    def _check_name(self, name: str, inner: str, lt: int) -> None:
        if _TAG_NAME.fullmatch(name):
            return
        if not name:
            raise self.src.error(lt, f"empty tag name <{inner}>",
                                 "write a name such as <appearance>, or &lt; for a literal '<'")
        first = name.split(None, 1)[0]
        if name != first and not name[0].isspace() and _TAG_NAME.fullmatch(first):
            raise self.src.error(
                lt, f"<{_snippet(inner)}> has attributes, which NewBie prompts do not use",
                f"write <{first}> without them", first)
        raise self.src.error(
            lt, f"<{_snippet(inner)}> is not a valid tag name",
            "tag names use letters, digits and _ (e.g. <character_1>); "
            "write &lt; for a literal '<'")

    def _declaration(self, lt: int) -> int:
        text = self.text
        is_xml_decl = text.startswith("<?xml", lt) and (
            lt + 5 < len(text) and (text[lt + 5].isspace() or text[lt + 5] == "?"))
        end = text.find("?>", lt + 2)
        if is_xml_decl and lt == _skip_space(text, self.start) and end != -1:
            self.cut_spans.append((lt, end + 2))
            return end + 2
        raise self.src.error(lt, "processing instructions are not allowed in prompts",
                             "remove the <?...?> part (an <?xml ...?> declaration "
                             "is only accepted at the very start)")

    def _open(self, name: str, lt: int) -> None:
        src, parent = self.src, self.stack[-1]
        self.element_count += 1
        if parent.role in ("field", "caption"):
            raise src.error(lt, f"<{name}> cannot go inside <{parent.name}> (fields do not nest)",
                            f"close </{parent.name}> before <{name}>", name)
        block_match = _CHARACTER_BLOCK.fullmatch(name)
        is_block = block_match is not None or name == "general_tags"
        if parent.role != "top" and is_block:
            raise src.error(lt, f"<{name}> cannot go inside <{parent.name}> (blocks do not nest)",
                            f"close </{parent.name}> before <{name}>", name)
        self._flush(parent)  # loose text before this element keeps its order
        if name == "caption":
            element = _Element(name, lt, "caption", None)
        elif parent.role == "top":
            element = self._open_top_level(name, lt, block_match)
        else:
            self._warn_field(name, parent, lt)
            element = _Element(name, lt, "field", parent.owner)
        self.stack.append(element)

    def _open_top_level(self, name: str, lt: int, block_match) -> _Element:
        if block_match:
            index = int(block_match.group(1))
            if index in self.characters:
                self.src.warn(lt, f"<{name}> appears more than once; its fields are merged")
            character = self.characters.setdefault(index, Character(index))
            return _Element(name, lt, "character", character.fields)
        if name == "general_tags":
            return _Element(name, lt, "general", self.general)
        if name in KNOWN_GENERAL_TAGS:
            self.src.warn(lt, f"<{name}> is outside <general_tags>; counted as a general tag")
            return _Element(name, lt, "field", self.general)
        if name in KNOWN_CHARACTER_TAGS:
            self.src.warn(lt, f"<{name}> is outside any <character_N> block; kept as is")
        else:
            self.src.warn(lt, f"unknown tag <{name}> kept as is")
        return _Element(name, lt, "other", self.other_blocks.setdefault(name, {}))

    def _warn_field(self, name: str, block: _Element, lt: int) -> None:
        if block.role == "other":
            return  # the unknown block itself was already reported
        known = KNOWN_CHARACTER_TAGS if block.role == "character" else KNOWN_GENERAL_TAGS
        if name in known:
            return
        if name in KNOWN_CHARACTER_TAGS or name in KNOWN_GENERAL_TAGS:
            self.src.warn(lt, f"<{name}> is not a usual field of <{block.name}>; kept as is")
        else:
            self.src.warn(lt, f"unknown tag <{name}> kept as is")

    def _close(self, name: str, lt: int) -> None:
        src, stack = self.src, self.stack
        top = stack[-1]
        if top.name == name and top.role != "top":
            self._flush(top)
            stack.pop()
            return
        if len(stack) == 1:
            raise src.error(lt, f"</{name}> has no matching <{name}>",
                            f"remove it, or add <{name}> before it", name)
        if any(element.name == name for element in stack[1:]):
            # Crossing tags: point at the element that was left open.
            raise src.error(top.pos, f"<{top.name}> opened here is never closed",
                            f"close it before </{name}>", top.name)
        raise src.error(lt, f"</{name}> closes <{top.name}>, which is still open",
                        f"close </{top.name}> first", name)

    def _flush(self, element: _Element) -> None:
        """Move the text collected inside `element` to where it belongs."""
        if element.role == "field":  # an empty field still shows up, as []
            element.owner.setdefault(element.name, [])
        if not element.parts:
            return
        text = "".join(element.parts)
        element.parts.clear()
        if element.role == "caption":
            self.captions.append(text.strip())
            return
        tags = _split_tags(text)
        if element.role == "field":
            element.owner[element.name].extend(tags)
            return
        if tags and element.role in ("character", "general"):
            self.src.warn(element.text_pos,
                          f"text inside <{element.name}> but outside any field kept as loose tags")
        self.loose.extend(tags)
        element.text_pos = -1


def _check_encodable(text: str, src: _Source) -> None:
    bad = _SURROGATE.search(text)
    if bad:
        raise src.error(bad.start(), f"U+{ord(bad.group()):04X} is half of a UTF-16 surrogate pair on its "
                        "own, which the text encoders cannot read",
                        "remove it (through the API, send the whole character: as UTF-8, or as a "
                        "\\ud83d\\ude00 pair)")


def check_encodable(text: str, input_name: str | None = None) -> None:
    """Raise PromptError (line and column, and `input_name` if given) if `text` holds a character the
    tokenizers cannot take."""
    try:
        _check_encodable(text, _Source(text))
    except PromptError as error:
        raise error.in_input(input_name) from None


def _dtd_error(src: _Source, index: int) -> PromptError:
    return src.error(index, "DTDs and entity declarations are not allowed in prompts",
                     "remove the <!DOCTYPE ...>/<!ENTITY ...> part")


# --------------------------------------------------------------------------
# JSON wrapper

class _LocatedStr(str):
    """A JSON string value that remembers where its raw text sits."""
    raw_start: int  # index just after the opening quote
    raw_end: int    # index of the closing quote


def _load_json_locating_strings(text: str, start: int):
    """json.raw_decode, but string values carry their raw position.

    The pure-Python scanner takes its string parser from the decoder, so we
    can hook it; keys still go through the normal (C) scanstring.
    """
    decoder = json.JSONDecoder(strict=False)  # hand-edited JSON has raw newlines

    def parse_string(s, end, strict):
        value, after = json.decoder.scanstring(s, end, strict)
        located = _LocatedStr(value)
        located.raw_start, located.raw_end = end, after - 1
        return located, after

    decoder.parse_string = parse_string
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    return decoder.raw_decode(text, start)


def _json_string_offsets(original: str, value: _LocatedStr) -> list[int]:
    """Index in `original` of each character of the decoded string (plus its end)."""
    offsets, i, end = [], value.raw_start, value.raw_end
    while i < end:
        escape = original.find("\\", i, end)
        if escape == -1:
            offsets.extend(range(i, end))
            break
        offsets.extend(range(i, escape))
        offsets.append(escape)
        i = escape + 2
        if original[escape + 1] == "u":  # \uXXXX; a surrogate pair decodes to one character
            high = int(original[escape + 2:escape + 6], 16)
            i = escape + 6
            if (0xD800 <= high <= 0xDBFF and original.startswith("\\u", i)
                    and 0xDC00 <= int(original[i + 2:i + 6], 16) <= 0xDFFF):
                i += 6
    offsets.append(end)
    if len(offsets) != len(value) + 1:  # should not happen; never mis-index
        offsets = [value.raw_start] * (len(value) + 1)
    return offsets


def _parse_json_wrapper(text: str, start: int, src: _Source):
    json_start = _skip_space(text, start)
    try:
        data, end = _load_json_locating_strings(text, json_start)
    except json.JSONDecodeError as exc:
        raise src.error(exc.pos, f"the JSON prompt is not valid JSON: {exc.msg}",
                        'check quotes, commas and braces here (write \\" for a quote '
                        "inside a JSON string)") from None
    except RecursionError:
        raise src.error(json_start, "the JSON prompt is nested too deeply") from None
    except ValueError as exc:  # e.g. a number with more digits than int() accepts
        raise src.error(json_start, f"the JSON prompt could not be read: {exc}") from None
    trailing = _skip_space(text, end)
    if trailing < len(text):
        raise src.error(trailing, "unexpected text after the JSON prompt",
                        "remove it, or put it inside the JSON \"tags\"")
    image = data.get("image") if isinstance(data, dict) else None
    tags = image.get("tags", "") if isinstance(image, dict) else None
    caption = image.get("caption", "") if isinstance(image, dict) else None
    if not isinstance(tags, str) or not isinstance(caption, str) or not (tags or caption):
        raise src.error(json_start, 'the JSON prompt has no "image" object with string '
                        '"tags" and/or "caption"',
                        'use {"image": {"tags": "<xml>", "caption": "text"}}')
    return tags, caption


# --------------------------------------------------------------------------
# Public API

def parse_prompt(text: str, input_name: str | None = None) -> ParsedPrompt:
    """Parse a prompt in any of the accepted shapes (see the module docstring).

    input_name (e.g. "negative prompt") is named in every error, for nodes with more than one text box."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be str, not {type(text).__name__}")
    try:
        return _parse_prompt(text)
    except PromptError as error:
        if input_name is None:
            raise
        raise error.in_input(input_name) from None


def _parse_prompt(text: str) -> ParsedPrompt:
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"the prompt is {len(text):,} characters long",
                          hint=f"keep it under {MAX_PROMPT_CHARS:,}")
    src = _Source(text)
    _check_encodable(text, src)
    dtd = _DTD.search(text)  # refused before anything else is looked at
    if dtd:
        raise _dtd_error(src, dtd.start())
    start, system_prompt = _strip_system_prompts(text, src)

    if _looks_like_json(text, start):
        tags, json_caption = _parse_json_wrapper(text, start, src)
        # JSON escapes can make what the typed text cannot hold (a lone "\\ud800"); check the decoded strings.
        if json_caption:
            src.offsets = _json_string_offsets(text, json_caption)
            _check_encodable(json_caption, src)
        # While the tags string is scanned, positions map back through the JSON escapes.
        src.offsets = _json_string_offsets(text, tags) if tags else [start]
        _check_encodable(tags, src)
        parser = _Parser(str(tags), 0, src)
        parser.run()
        src.offsets = None
        body = parser.body()
        if json_caption.strip() and parser.captions:
            src.warn(json_caption.raw_start, 'the JSON "caption" is ignored: the tags '
                     "already have a <caption>")
        elif json_caption.strip():
            parser.captions.append(json_caption.strip())
            caption_xml = f"<caption>{_escape_for_prompt(json_caption.strip())}</caption>"
            body = f"{body}\n{caption_xml}" if body else caption_xml
        shape = "json"
    else:
        parser = _Parser(text, start, src)
        parser.run()
        body = parser.body()
        shape = "xml" if parser.element_count else "text"

    kind = "xml" if parser.element_count or parser.captions else "text"
    if system_prompt is not None:
        applied = SYSTEM_PROMPT_XML if kind == "xml" else SYSTEM_PROMPT_TEXT
        if system_prompt != applied:
            found_name = _SYSTEM_PROMPT_NAMES.get(system_prompt, "unrecognised")
            src.warn(_skip_space(text, 0), f"the {found_name} system prompt in front was stripped; official "
                     f"mode uses the {_SYSTEM_PROMPT_NAMES[applied]} one for this prompt")
    return ParsedPrompt(
        shape=shape,
        kind=kind,
        body=body,
        system_prompt_found=system_prompt,
        characters=[parser.characters[i] for i in sorted(parser.characters)],
        general=parser.general,
        caption="\n".join(c for c in parser.captions if c),
        loose_tags=parser.loose,
        warnings=src.finished_warnings(),
        other_blocks=parser.other_blocks,
        source=text,
    )


def flatten_tags(parsed: ParsedPrompt) -> str:
    """All tags as one "a, b, c" list: characters, general, other blocks, loose.

    Placeholders ($character_1$) and repeats are dropped; the caption is not
    included.  The rare '<'/'&' that would read back as markup are escaped, and
    a leading '{' that would read back as the JSON wrapper becomes &#123;, so
    that parse_prompt(flatten_tags(p)) flattens to the same string.
    """
    seen: set[str] = set()
    ordered: list[str] = []

    def add(tags: list[str]) -> None:
        for tag in tags:
            if tag not in seen and not _is_placeholder(tag):
                seen.add(tag)
                ordered.append(tag)

    for character in sorted(parsed.characters, key=lambda c: c.index):
        for tags in character.fields.values():
            add(tags)
    for tags in parsed.general.values():
        add(tags)
    for block in parsed.other_blocks.values():
        for tags in block.values():
            add(tags)
    add(parsed.loose_tags)
    flat = ", ".join(_escape_for_prompt(tag) for tag in ordered)
    if _looks_like_json(flat, 0):
        flat = "&#123;" + flat[1:]
    return flat


def encoder_texts(parsed: ParsedPrompt, mode: str) -> tuple[str, str]:
    """(gemma_text, jina_text) for the given mode: "official", "tags" or "raw"."""
    if mode == "official":
        # A system prompt the user typed (e.g. the low-quality one in front of a negative) is kept, never doubled;
        # JSON-wrapped prompts are rebuilt as XML, so they get the XML system prompt they were trained with.
        typed = parsed.system_prompt_found if parsed.shape != "json" else None
        system_prompt = typed or (SYSTEM_PROMPT_XML if parsed.kind == "xml" else SYSTEM_PROMPT_TEXT)
        return system_prompt + parsed.body, parsed.body
    if mode == "tags":
        text = flatten_tags(parsed) or parsed.body
        return text, text
    if mode == "raw":
        return parsed.source, parsed.source
    raise ValueError(f"unknown prompt mode {mode!r}; use one of: {', '.join(ENCODER_MODES)}")


def report(parsed: ParsedPrompt) -> str:
    """A few human-readable lines describing what was understood."""
    lines = [f"shape: {parsed.shape} (kind {parsed.kind})"]
    if parsed.system_prompt_found:
        name = _SYSTEM_PROMPT_NAMES.get(parsed.system_prompt_found, "unrecognised")
        lines.append(f"system prompt in front: {name} (stripped)")
    if parsed.characters:
        lines.append(f"characters: {len(parsed.characters)}")
        for character in parsed.characters:
            label = f"character_{character.index}"
            if character.name:
                label += f" ({character.name})"
            fields = ", ".join(character.fields) or "no fields"
            lines.append(f"  {label}: {fields}")
    else:
        lines.append("characters: none")
    lines.append(f"general: {', '.join(parsed.general) or 'none'}")
    if parsed.other_blocks:
        lines.append(f"other blocks: {', '.join(parsed.other_blocks)}")
    if parsed.loose_tags:
        lines.append(f"loose tags: {len(parsed.loose_tags)}")
    lines.append(f"caption: {'yes' if parsed.caption else 'no'}")
    if parsed.warnings:
        lines.append(f"warnings: {len(parsed.warnings)}")
        lines.extend(f"  {warning}" for warning in parsed.warnings)
    return "\n".join(lines)


_CHARACTER_HINTS = (
    ("gender", "1girl"),
    ("appearance", "long_hair, blue_eyes"),
    ("clothing", "school_uniform"),
    ("expression", "smile"),
    ("action", "standing"),
    ("position", "center"),
    ("interaction", "looking_at_viewer"),
    ("body_type", "slim"),
)
_GENERAL_HINTS = (
    ("style", "anime_style, digital_art"),
    ("artists", "artist_name"),
    ("background", "simple_background"),
    ("environment", "outdoors"),
    ("perspective", "cowboy_shot"),
    ("lighting", "soft_lighting"),
    ("atmosphere", "cheerful"),
    ("quality", "high_quality, masterpiece"),
    ("objects", "flower"),
    ("other", "none"),
    ("resolution", "highres"),
)


def skeleton(n_characters: int = 1) -> str:
    """A well-formed template: one block per character plus <general_tags>."""
    if n_characters < 0:
        raise ValueError("n_characters must be 0 or more")
    lines = []
    for index in range(1, n_characters + 1):
        lines.append(f"<character_{index}>")
        lines.append(f"  <n>$character_{index}$</n>")
        lines.extend(f"  <{name}>{hint}</{name}>" for name, hint in _CHARACTER_HINTS)
        lines.append(f"</character_{index}>")
    count = {0: "no_humans", 1: "1girl"}.get(n_characters, f"{n_characters}girls")
    lines.append("<general_tags>")
    lines.append(f"  <count>{count}</count>")
    lines.extend(f"  <{name}>{hint}</{name}>" for name, hint in _GENERAL_HINTS)
    lines.append("</general_tags>")
    return "\n".join(lines)
