"""Unit tests for pipeline.xml_prompt (pure Python: no torch, no ComfyUI)."""
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import xml_prompt
from pipeline.xml_prompt import (
    SYSTEM_PROMPT_LOW_QUALITY,
    SYSTEM_PROMPT_TEXT,
    SYSTEM_PROMPT_XML,
    PromptError,
    encoder_texts,
    flatten_tags,
    parse_prompt,
    report,
    skeleton,
)

OFFICIAL_EXAMPLE = """\
<character_1><n>$character_1$</n><gender>1girl</gender><appearance>blue_hair, long_twintails, teal_eyes</appearance>
<clothing>white_shirt</clothing><expression>smile</expression><position>center_left</position></character_1>
<general_tags><count>1girl</count><style>anime_style, digital_art</style><quality>high_quality, masterpiece</quality></general_tags>
"""
OFFICIAL_FLAT = ("1girl, blue_hair, long_twintails, teal_eyes, white_shirt, smile, center_left, "
                 "anime_style, digital_art, high_quality, masterpiece")


def error_of(text: str) -> PromptError:
    with pytest.raises(PromptError) as info:
        parse_prompt(text)
    return info.value


# --------------------------------------------------------------------------
# Shapes

def test_official_example_parses():
    p = parse_prompt(OFFICIAL_EXAMPLE)
    assert (p.shape, p.kind) == ("xml", "xml")
    assert p.system_prompt_found is None
    assert p.body == OFFICIAL_EXAMPLE.strip()
    assert len(p.characters) == 1
    character = p.characters[0]
    assert character.index == 1
    assert character.name == "$character_1$"
    assert character.fields == {
        "n": ["$character_1$"],
        "gender": ["1girl"],
        "appearance": ["blue_hair", "long_twintails", "teal_eyes"],
        "clothing": ["white_shirt"],
        "expression": ["smile"],
        "position": ["center_left"],
    }
    assert p.general == {
        "count": ["1girl"],
        "style": ["anime_style", "digital_art"],
        "quality": ["high_quality", "masterpiece"],
    }
    assert p.caption == "" and p.loose_tags == [] and p.warnings == []
    assert flatten_tags(p) == OFFICIAL_FLAT


BARE_XML = """
  masterpiece, 1girl

<character_2>
    <n>hatsune_miku</n>
    <appearance>
        aqua_hair,
        twintails
    </appearance>
</character_2>
<character_1>
    <n>$character_1$</n>
    <appearance>blue_hair</appearance>
</character_1>
  best_quality
<general_tags>
    <style>anime_style</style>
</general_tags>
<caption>Two girls, side by side &amp; laughing: "look!" (it's sunny); fin.</caption>
"""


def test_bare_xml_several_blocks_indentation_caption_and_loose_tags():
    p = parse_prompt(BARE_XML)
    assert (p.shape, p.kind) == ("xml", "xml")
    assert [c.index for c in p.characters] == [1, 2]  # index order, not written order
    assert p.characters[1].fields == {"n": ["hatsune_miku"], "appearance": ["aqua_hair", "twintails"]}
    assert p.characters[0].name == "$character_1$"
    assert p.general == {"style": ["anime_style"]}
    assert p.caption == """Two girls, side by side & laughing: "look!" (it's sunny); fin."""
    assert p.loose_tags == ["masterpiece", "1girl", "best_quality"]
    assert p.warnings == []
    assert p.body == BARE_XML.strip()  # kept as written, entities and all
    assert flatten_tags(p) == (
        "blue_hair, hatsune_miku, aqua_hair, twintails, anime_style, masterpiece, 1girl, best_quality")


def test_plain_text_is_kind_text_with_comma_pieces_as_loose_tags():
    p = parse_prompt("  1girl,  solo ,blue   hair\nsmile,,\n")
    assert (p.shape, p.kind) == ("text", "text")
    assert p.loose_tags == ["1girl", "solo", "blue hair", "smile"]
    assert p.body == "1girl,  solo ,blue   hair\nsmile,,"
    assert flatten_tags(p) == "1girl, solo, blue hair, smile"


def test_fullwidth_comma_also_separates_tags():
    assert parse_prompt("1girl，solo").loose_tags == ["1girl", "solo"]


def test_comments_and_xml_declaration_are_dropped():
    text = '<?xml version="1.0"?>\n<!-- note -->\n<character_1><gender>1girl<!-- x --></gender></character_1>'
    p = parse_prompt(text)
    assert p.characters[0].fields == {"gender": ["1girl"]}
    assert p.body == "<character_1><gender>1girl</gender></character_1>"


def test_self_closing_and_empty_fields_are_kept_empty():
    p = parse_prompt("<character_1><clothing/><appearance></appearance></character_1>")
    assert p.characters[0].fields == {"clothing": [], "appearance": []}


def test_duplicate_character_blocks_merge_with_warning():
    p = parse_prompt("<character_1><gender>1girl</gender></character_1>\n"
                     "<character_1><appearance>red_hair</appearance></character_1>")
    assert p.characters[0].fields == {"gender": ["1girl"], "appearance": ["red_hair"]}
    assert p.warnings == ["line 2, column 1: <character_1> appears more than once; its fields are merged"]


# --------------------------------------------------------------------------
# System prompts

@pytest.mark.parametrize("system_prompt", [SYSTEM_PROMPT_XML, SYSTEM_PROMPT_TEXT, SYSTEM_PROMPT_LOW_QUALITY])
@pytest.mark.parametrize("body", ["<character_1><gender>1girl</gender></character_1>", "1girl, smile"])
def test_system_prompt_in_front_is_recognised_and_never_doubled(system_prompt, body):
    p = parse_prompt(system_prompt + body)
    assert p.system_prompt_found == system_prompt
    assert p.body == body
    gemma, jina = encoder_texts(p, "official")
    assert gemma.count("<Prompt Start>") == 1
    assert jina == body
    expected = system_prompt  # the one typed is kept, never replaced nor doubled
    assert gemma == expected + body


def test_system_prompt_constants_are_exact():
    assert SYSTEM_PROMPT_XML == ("You are an assistant designed to generate high-quality anime images "
                                 "based on xml format prompts. <Prompt Start> ")
    assert SYSTEM_PROMPT_TEXT == ("You are an assistant designed to generate high-quality anime images "
                                  "with the highest degree of image-text alignment based on textual "
                                  "prompts. <Prompt Start> ")
    assert SYSTEM_PROMPT_LOW_QUALITY == ("You are an assistant designed to generate low-quality images "
                                         "based on textual prompts. <Prompt Start> ")


def test_system_prompt_without_trailing_space_or_pasted_twice():
    text = "\n" + SYSTEM_PROMPT_XML.rstrip() + "\n" + SYSTEM_PROMPT_XML + "<caption>hi</caption>"
    p = parse_prompt(text)
    assert p.system_prompt_found == SYSTEM_PROMPT_XML
    assert p.body == "<caption>hi</caption>"
    assert encoder_texts(p, "official")[0] == SYSTEM_PROMPT_XML + "<caption>hi</caption>"
    assert p.warnings == ["line 3, column 1: a second system prompt was stripped; it is sent only once"]


def test_mismatched_system_prompt_is_replaced_with_a_warning():
    p = parse_prompt(SYSTEM_PROMPT_LOW_QUALITY + "bad_hands, blurry")
    assert p.warnings == ["line 1, column 1: the low-quality system prompt in front was stripped; "
                          "official mode uses the plain-text one for this prompt"]


def test_unrecognised_system_prompt_variant_is_stripped_with_warning():
    p = parse_prompt("You are an assistant that draws. <Prompt Start> 1girl")
    assert p.system_prompt_found == "You are an assistant that draws. <Prompt Start> "
    assert p.loose_tags == ["1girl"]
    assert p.warnings[0] == "line 1, column 1: unrecognised system prompt stripped from the front"


# --------------------------------------------------------------------------
# JSON wrapper

WRAPPER_TAGS = "<character_1><n>$character_1$</n><gender>1girl</gender></character_1>\n<general_tags><count>1girl</count></general_tags>"


def wrapper(tags=WRAPPER_TAGS, caption="A girl & a cat <3, at dusk."):
    return json.dumps({"character_1": {"bbox": [0.1, 0.2, 0.5, 0.9], "name": "$character_1$"},
                       "image": {"tags": tags, "caption": caption}}, indent=2)


@pytest.mark.parametrize("front", ["", SYSTEM_PROMPT_XML, SYSTEM_PROMPT_TEXT + "\n"])
def test_json_wrapper_takes_tags_and_caption(front):
    p = parse_prompt(front + wrapper())
    assert (p.shape, p.kind) == ("json", "xml")
    assert p.system_prompt_found == (front.strip() + " " if front else None)
    assert p.characters[0].fields == {"n": ["$character_1$"], "gender": ["1girl"]}
    assert p.general == {"count": ["1girl"]}
    assert p.caption == "A girl & a cat <3, at dusk."
    assert p.body == WRAPPER_TAGS + "\n<caption>A girl & a cat <3, at dusk.</caption>"
    assert encoder_texts(p, "official") == (SYSTEM_PROMPT_XML + p.body, p.body)
    assert flatten_tags(p) == "1girl"


def test_json_caption_is_escaped_only_where_it_would_read_as_markup():
    p = parse_prompt(wrapper(caption="x <b>bold</b> &amp; y"))
    assert p.body.endswith("<caption>x &lt;b>bold&lt;/b> &amp;amp; y</caption>")
    assert parse_prompt(p.body).caption == "x <b>bold</b> &amp; y"


def test_json_caption_ignored_when_tags_have_their_own():
    text = '{"image": {"tags": "<caption>own</caption>",\n "caption": "other"}}'
    p = parse_prompt(text)
    assert p.caption == "own"
    assert p.warnings == ['line 2, column 14: the JSON "caption" is ignored: the tags already have a <caption>']


def test_json_wrapper_with_plain_tags_string():
    p = parse_prompt('{"image": {"tags": "1girl, solo", "caption": ""}}')
    assert (p.shape, p.kind, p.loose_tags, p.body) == ("json", "text", ["1girl", "solo"], "1girl, solo")


def test_malformed_json_wrapper_reports_position():
    text = '{\n  "image": {\n    "tags": "<character_1>"\n    "caption": "x"\n  }\n}'
    e = error_of(text)
    assert (e.line, e.column) == (4, 5)
    assert str(e) == ("line 4, column 5: the JSON prompt is not valid JSON: Expecting ',' delimiter; "
                      'check quotes, commas and braces here (write \\" for a quote inside a JSON string)')


def test_malformed_json_after_system_prompt_reports_position_in_typed_text():
    e = error_of(SYSTEM_PROMPT_XML + '\n{"image": {"tags": "x",}}')
    assert (e.line, e.column) == (2, 24)


def test_error_inside_json_tags_maps_back_through_escapes():
    # The \n and \" escapes are two characters each in the typed text.
    text = '{"image": {\n "tags": "<character_1>\\n<n>\\"q\\"</n><gender>1girl</character_1>"}}'
    e = error_of(text)
    assert str(e) == ("line 2, column 38: <gender> opened here is never closed; "
                      "close it before </character_1>")


def test_json_without_image_is_an_error():
    e = error_of('{"prompt": "1girl"}')
    assert e.problem == 'the JSON prompt has no "image" object with string "tags" and/or "caption"'
    assert (e.line, e.column) == (1, 1)


def test_text_after_json_is_an_error():
    e = error_of('{"image": {"tags": "1girl"}}\nsmile')
    assert (e.line, e.column, e.problem) == (2, 1, "unexpected text after the JSON prompt")


def test_json_with_absurd_number_is_a_prompt_error():
    e = error_of('{"image": {"tags": "x"}, "n": ' + "1" * 5000 + "}")
    assert e.problem.startswith("the JSON prompt could not be read: ")


def test_brace_without_quote_is_plain_text_not_json():
    assert parse_prompt("{blue_hair}, smile").loose_tags == ["{blue_hair}", "smile"]


# --------------------------------------------------------------------------
# Errors: exact text and position

ERROR_CASES = [
    # (input, line, column, tag, full message)
    ("<character_1>\n  <n>x</n>\n    <n>ab</n><appearance>blue_hair\n</character_1>",
     3, 14, "appearance",
     "<appearance> opened here is never closed; close it before </character_1>"),
    ("1girl\n<character_1>\n<gender>1girl</gender>\n",
     2, 1, "character_1",
     "<character_1> opened here is never closed; close it before the end of the prompt"),
    ("<character_1>\n  <appearance>blue_hair</clothing>\n</character_1>",
     2, 24, "clothing",
     "</clothing> closes <appearance>, which is still open; close </appearance> first"),
    ("1girl\n  </appearance>",
     2, 3, "appearance",
     "</appearance> has no matching <appearance>; remove it, or add <appearance> before it"),
    ("<character_1>\n<gender>1girl</gender>\n<character_2></character_2></character_1>",
     3, 1, "character_2",
     "<character_2> cannot go inside <character_1> (blocks do not nest); "
     "close </character_1> before <character_2>"),
    ("<character_1><appearance>blue_hair\n  <clothing>shirt</clothing></appearance></character_1>",
     2, 3, "clothing",
     "<clothing> cannot go inside <appearance> (fields do not nest); "
     "close </appearance> before <clothing>"),
    ("<caption>a <b>bold</b> move</caption>",
     1, 12, "b",
     "<b> cannot go inside <caption> (fields do not nest); close </caption> before <b>"),
    ("a\nb <>",
     2, 3, None,
     "empty tag name <>; write a name such as <appearance>, or &lt; for a literal '<'"),
    ("</>", 1, 1, None,
     "empty tag name </>; write a name such as <appearance>, or &lt; for a literal '<'"),
    ("x\n<a$b>",
     2, 1, None,
     "<a$b> is not a valid tag name; tag names use letters, digits and _ (e.g. <character_1>); "
     "write &lt; for a literal '<'"),
    ('<character_1 id="1"></character_1>',
     1, 1, "character_1",
     '<character_1 id="1"> has attributes, which NewBie prompts do not use; write <character_1> without them'),
    ("<character_1>\n<gender 1girl</gender>",
     2, 1, None,
     "tag <gender 1girl is missing its closing '>'; finish the tag with '>', or write &lt; for a literal '<'"),
    ("smile <!-- todo",
     1, 7, None, "comment opened here is never closed; end it with -->"),
    ("a <![CDATA[x]]>",
     1, 3, None,
     "'<!' markup other than comments is not allowed in prompts; remove it, or write &lt; for a literal '<'"),
    ('1girl\n<?xml-stylesheet href="http://x/y.xsl"?>',
     2, 1, None,
     "processing instructions are not allowed in prompts; remove the <?...?> part "
     "(an <?xml ...?> declaration is only accepted at the very start)"),
    ("<caption>tom\n  &nbsp;jerry</caption>",
     2, 3, None,
     "unknown entity &nbsp;; only &lt; &gt; &amp; &quot; &apos; and numeric references like &#233; "
     "are allowed; write &amp; for a literal &"),
    ("x &#0; y", 1, 3, None,
     "&#0; is not a valid character reference; use a code point between 1 and 10FFFF, "
     "or write &amp; for a literal &"),
    ("x &#xD800;", 1, 3, None,
     "&#xD800; is not a valid character reference; use a code point between 1 and 10FFFF, "
     "or write &amp; for a literal &"),
    ("x &#" + "9" * 5000 + ";", 1, 3, None,
     "&#" + "9" * 38 + "… is not a valid character reference; "
     "use a code point between 1 and 10FFFF, or write &amp; for a literal &"),
]


@pytest.mark.parametrize("text, line, column, tag, message", ERROR_CASES,
                         ids=[case[4].split(";")[0][:40] for case in ERROR_CASES])
def test_error_messages_and_positions(text, line, column, tag, message):
    e = error_of(text)
    assert str(e) == f"line {line}, column {column}: {message}"
    assert (e.line, e.column, e.tag) == (line, column, tag)
    assert isinstance(e, ValueError)
    assert e.problem and e.hint and message == f"{e.problem}; {e.hint}"


def test_prompt_error_survives_pickle():
    import pickle
    e = pickle.loads(pickle.dumps(error_of("<character_1>")))
    assert (str(e), e.line, e.column, e.tag) == (
        "line 1, column 1: <character_1> opened here is never closed; close it before the end of the prompt",
        1, 1, "character_1")


def test_crossing_tags_point_at_the_one_left_open():
    e = error_of("<scene><mood>calm</scene></mood>")
    assert str(e) == "line 1, column 8: <mood> opened here is never closed; close it before </scene>"


def test_too_long_prompt_is_refused_fast():
    start = time.perf_counter()
    e = error_of("a" * (xml_prompt.MAX_PROMPT_CHARS + 1))
    assert time.perf_counter() - start < 0.1
    assert str(e) == "line 1, column 1: the prompt is 1,000,001 characters long; keep it under 1,000,000"


# --------------------------------------------------------------------------
# Unknown tags: kept, warned, never errors

def test_unknown_tags_are_warnings_with_positions():
    text = ("<character_1>\n    <hair_colour>blue</hair_colour>\n    <style>chibi</style>\n</character_1>\n"
            "<scene><mood>calm, quiet</mood></scene>\n"
            "<character_3><gender>1boy</gender></character_3>\n"
            "<quality>masterpiece</quality>\n"
            "<general_tags>oops<lighting>rim_light</lighting></general_tags>")
    p = parse_prompt(text)
    assert p.characters[0].fields == {"hair_colour": ["blue"], "style": ["chibi"]}
    assert p.characters[1].index == 3  # character_N is known by pattern
    assert p.other_blocks == {"scene": {"mood": ["calm", "quiet"]}}
    assert p.general == {"quality": ["masterpiece"], "lighting": ["rim_light"]}
    assert p.loose_tags == ["oops"]
    assert p.warnings == [
        "line 2, column 5: unknown tag <hair_colour> kept as is",
        "line 3, column 5: <style> is not a usual field of <character_1>; kept as is",
        "line 5, column 1: unknown tag <scene> kept as is",
        "line 7, column 1: <quality> is outside <general_tags>; counted as a general tag",
        "line 8, column 15: text inside <general_tags> but outside any field kept as loose tags",
    ]
    assert flatten_tags(p) == "blue, chibi, 1boy, masterpiece, rim_light, calm, quiet, oops"


def test_warnings_are_capped():
    p = parse_prompt("".join(f"<x{i}></x{i}>" for i in range(200)))
    assert len(p.warnings) == xml_prompt.MAX_WARNINGS + 1
    assert p.warnings[-1] == "... and 150 more warnings"


# --------------------------------------------------------------------------
# Entities and hostile documents

def test_predefined_and_numeric_entities_are_decoded():
    p = parse_prompt("<character_1><n>a &lt;b&gt; &quot;c&quot; &apos;d&apos; &amp; &#233; &#xE9; &#X41;</n>"
                     "</character_1>")
    assert p.characters[0].fields["n"] == ["a <b> \"c\" 'd' & é é A"]


def test_entity_producing_a_comma_splits_tags():
    assert parse_prompt("<character_1><n>a&#44;b</n></character_1>").characters[0].fields["n"] == ["a", "b"]


def test_bare_ampersand_and_angle_bracket_are_text():
    p = parse_prompt("rock & roll, a < b, <3, x&y, AT&T, 5 > 4, <caption>Q&A: 1 < 2 & done</caption>")
    assert p.loose_tags == ["rock & roll", "a < b", "<3", "x&y", "AT&T", "5 > 4"]
    assert p.caption == "Q&A: 1 < 2 & done"


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<lolz>&lol9;</lolz>"""
XXE = '<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><foo>&xxe;</foo>'


@pytest.mark.parametrize("text, line, column", [
    (BILLION_LAUGHS, 2, 1),
    (XXE, 1, 1),
    ("1girl <character_1></character_1>\n<!entity x SYSTEM 'http://e/'>", 2, 1),
    (SYSTEM_PROMPT_XML + XXE, 1, len(SYSTEM_PROMPT_XML) + 1),
    ('{"image": {"tags": "' + XXE.replace('"', '\\"') + '"}}', 1, 21),
])
def test_dtd_and_entity_declarations_are_refused_fast(text, line, column):
    start = time.perf_counter()
    e = error_of(text)
    assert time.perf_counter() - start < 1.0
    assert str(e) == (f"line {line}, column {column}: DTDs and entity declarations are not allowed "
                      "in prompts; remove the <!DOCTYPE ...>/<!ENTITY ...> part")


def test_dtd_hidden_behind_json_escape_is_refused_too():
    e = error_of('{"image": {"tags": "\\u003c!DOCTYPE x []>"}}')
    assert e.problem == "DTDs and entity declarations are not allowed in prompts"
    assert (e.line, e.column) == (1, 21)


def test_undeclared_entity_alone_is_refused():
    assert error_of("<foo>&xxe;</foo>").problem == "unknown entity &xxe;"


# --------------------------------------------------------------------------
# encoder_texts, flatten, report, skeleton

def test_encoder_texts_modes_exact():
    typed = "  " + SYSTEM_PROMPT_XML + "<character_1><n>$character_1$</n><gender>1girl</gender></character_1>\n"
    p = parse_prompt(typed)
    body = "<character_1><n>$character_1$</n><gender>1girl</gender></character_1>"
    assert encoder_texts(p, "official") == (SYSTEM_PROMPT_XML + body, body)
    assert encoder_texts(p, "tags") == ("1girl", "1girl")
    assert encoder_texts(p, "raw") == (typed, typed)


def test_encoder_texts_plain_text_and_tags_fallback():
    p = parse_prompt("1girl, smile")
    assert encoder_texts(p, "official") == (SYSTEM_PROMPT_TEXT + "1girl, smile", "1girl, smile")
    caption_only = parse_prompt("<caption>A quiet street.</caption>")
    assert encoder_texts(caption_only, "tags") == ("<caption>A quiet street.</caption>",) * 2


def test_encoder_texts_unknown_mode():
    with pytest.raises(ValueError) as info:
        encoder_texts(parse_prompt("1girl"), "gemma")
    assert str(info.value) == "unknown prompt mode 'gemma'; use one of: official, tags, raw"


def test_flatten_skips_placeholders_and_duplicates():
    p = parse_prompt("<character_1><n>$character_1$</n><gender>1girl</gender></character_1>"
                     "<character_2><n>$character_2$</n><gender>1girl</gender><n>rin</n></character_2>"
                     "<general_tags><count>2girls</count></general_tags>1girl, $x$, extra")
    assert flatten_tags(p) == "1girl, rin, 2girls, extra"


def test_flatten_escapes_only_what_would_read_back_as_markup():
    p = parse_prompt("<character_1><n>&lt;b&gt;, &amp;amp;, a &amp; b, a < b</n></character_1>")
    assert p.characters[0].fields["n"] == ["<b>", "&amp;", "a & b", "a < b"]
    flat = flatten_tags(p)
    assert flat == "&lt;b>, &amp;amp;, a & b, a < b"
    assert parse_prompt(flat).loose_tags == ["<b>", "&amp;", "a & b", "a < b"]


def test_flatten_never_reads_back_as_json():
    p = parse_prompt('$x$, {"image": 1}')
    flat = flatten_tags(p)
    assert flat == '&#123;"image": 1}'
    assert flatten_tags(parse_prompt(flat)) == flat


def test_report_mentions_shape_characters_fields_caption_and_warnings():
    text = SYSTEM_PROMPT_XML + BARE_XML.replace("<general_tags>", "<general_tags><mood>x</mood>")
    lines = report(parse_prompt(text)).splitlines()
    assert lines == [
        "shape: xml (kind xml)",
        "system prompt in front: XML (stripped)",
        "characters: 2",
        "  character_1 ($character_1$): n, appearance",
        "  character_2 (hatsune_miku): n, appearance",
        "general: mood, style",
        "loose tags: 3",
        "caption: yes",
        "warnings: 1",
        "  line 16, column 15: unknown tag <mood> kept as is",
    ]


@pytest.mark.parametrize("n", [0, 1, 3])
def test_skeleton_is_well_formed_and_has_every_known_field(n):
    p = parse_prompt(skeleton(n))
    assert p.warnings == [] and p.loose_tags == []
    assert [c.index for c in p.characters] == list(range(1, n + 1))
    for index, character in enumerate(p.characters, 1):
        assert set(character.fields) == xml_prompt.KNOWN_CHARACTER_TAGS
        assert character.name == f"${'character_'}{index}$"
    assert set(p.general) == xml_prompt.KNOWN_GENERAL_TAGS
    assert all(p.general.values())


def test_skeleton_rejects_negative():
    with pytest.raises(ValueError):
        skeleton(-1)


# --------------------------------------------------------------------------
# Properties

XMLISH = st.lists(st.sampled_from([
    "<", ">", "</", "/>", "character_1", "character_2", "general_tags", "caption", "appearance",
    "n", "$character_1$", "&amp;", "&", "&lt;", "&#65;", "&#x;", ";", "#", ",", " ", "\n", "\t",
    "blue_hair", "<!--", "-->", "<?xml ", "?>", "<!DOCTYPE", "{", '"', "}", ":", "image", "tags",
    SYSTEM_PROMPT_XML, "<Prompt Start>", "You are an assistant", "=", "'", "$", "，", "\\",
]), max_size=60).map("".join)

ANY_PROMPT = st.one_of(st.text(), XMLISH)


def parse_or_error(text):
    try:
        return parse_prompt(text)
    except PromptError as e:  # anything else propagates and fails the test
        assert e.line >= 1 and e.column >= 1 and str(e).startswith(f"line {e.line}, column {e.column}: ")
        return None


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_PROMPT)
def test_parse_returns_a_prompt_or_raises_prompt_error(text):
    parsed = parse_or_error(text)
    if parsed is not None:
        assert parsed.shape in ("xml", "text", "json") and parsed.kind in ("xml", "text")
        report(parsed)
        for mode in xml_prompt.ENCODER_MODES:
            encoder_texts(parsed, mode)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_PROMPT)
def test_flatten_is_stable(text):
    parsed = parse_or_error(text)
    if parsed is None:
        return
    flat = flatten_tags(parsed)
    again = parse_prompt(flat)
    assert again.shape == "text" and again.system_prompt_found is None
    assert flatten_tags(again) == flat


@settings(deadline=None, max_examples=200)
@given(ANY_PROMPT)
def test_error_positions_lie_inside_the_typed_text(text):
    try:
        parse_prompt(text)
    except PromptError as e:
        lines = text.split("\n")
        assert e.line <= len(lines)
        assert e.column <= len(lines[e.line - 1]) + 1


TAG = st.text(st.sampled_from("abcxyz_019 ()'\":.-&<>éあ"), min_size=1, max_size=12).map(
    lambda t: " ".join(t.split())).filter(bool)
FIELDS = st.dictionaries(st.sampled_from(sorted(xml_prompt.KNOWN_CHARACTER_TAGS)), st.lists(TAG, max_size=4), max_size=5)
GENERAL = st.dictionaries(st.sampled_from(sorted(xml_prompt.KNOWN_GENERAL_TAGS)), st.lists(TAG, max_size=4), max_size=5)


def escape_xml(tag):
    return tag.replace("&", "&amp;").replace("<", "&lt;")


@settings(deadline=None, max_examples=100)
@given(st.lists(FIELDS, max_size=3), GENERAL, st.sampled_from(["", "\n", "\n    "]))
def test_rendered_prompts_parse_back_to_what_was_rendered(characters, general, gap):
    def render(fields):
        return "".join(f"{gap}<{name}>{', '.join(map(escape_xml, tags))}</{name}>" for name, tags in fields.items())
    text = "".join(f"<character_{i}>{render(fields)}{gap}</character_{i}>{gap}"
                   for i, fields in enumerate(characters, 1))
    text += f"<general_tags>{render(general)}</general_tags>"
    p = parse_prompt(text)
    assert p.warnings == [] and p.loose_tags == []
    assert [c.fields for c in p.characters] == characters
    assert p.general == general


@settings(deadline=None, max_examples=10)
@given(st.one_of(st.text(min_size=1, max_size=30), XMLISH.filter(bool)))
def test_one_megabyte_adversarial_input_is_fast(seed):
    text = (seed * (xml_prompt.MAX_PROMPT_CHARS // len(seed) + 1))[:xml_prompt.MAX_PROMPT_CHARS]
    start = time.perf_counter()
    parsed = parse_or_error(text)
    if parsed is not None:
        flatten_tags(parsed)
    assert time.perf_counter() - start < 2.0


WORST_CASES = {
    "bare-lt": "< " * 500_000,
    "bare-amp": "&a" * 500_000,
    "entities": "&amp;" * 200_000,
    "empty-tags": "a, " * 333_333,
    "distinct-tags": ", ".join(f"tag{i}" for i in range(100_000)),
    "many-fields": "<character_1>" + "<appearance>blue_hair, red_eyes</appearance>" * 22_000 + "</character_1>",
    "unknown-blocks": "".join(f"<x{i}>y</x{i}>" for i in range(55_000)),
    "json-escapes": '{"image": {"tags": "' + "<character_1><n>\\u0041</n></character_1>" * 24_000 + '"}}',
    "open-comment": "<!--" + "-" * 999_000,
    "deep-json": '{"a": ' * 160_000,
    "long-char-ref": "&#" + "1" * 999_000 + ";",
}


@pytest.mark.parametrize("text", list(WORST_CASES.values()), ids=list(WORST_CASES))
def test_one_megabyte_known_worst_cases_are_fast(text):
    assert 900_000 < len(text) <= xml_prompt.MAX_PROMPT_CHARS
    start = time.perf_counter()
    parsed = parse_or_error(text)
    if parsed is not None:
        flatten_tags(parsed)
    assert time.perf_counter() - start < 2.0
