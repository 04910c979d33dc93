"""The editor's XML check (web/js/newbie_xml_check.js, run under Node) against the server's parser
(pipeline/xml_prompt.py): on every prompt both must agree on "fine" or give the very same error message
(problem, hint, line and column). Needs Node only, no browser and no ComfyUI."""
from __future__ import annotations

import json
import random
import shutil
import subprocess

import pytest

from pipeline.xml_prompt import SYSTEM_PROMPT_LOW_QUALITY, SYSTEM_PROMPT_XML, PromptError, parse_prompt, skeleton

from chromium_page import HERE

CHECKER = HERE.parents[1] / "web" / "js" / "newbie_xml_check.js"

if shutil.which("node") is None:
    pytest.skip("no node on PATH: the editor's XML check cannot be run (scripts/install_browser.sh installs it)",
                allow_module_level=True)

HANDWRITTEN = [
    "",
    "1girl, smile",
    "<character_1>\n  <n>x</n>\n    <n>ab</n><appearance>blue_hair\n</character_1>",
    "1girl\n<character_1>\n<gender>1girl</gender>\n",
    "<character_1>\n  <appearance>blue_hair</clothing>\n</character_1>",
    "1girl\n  </appearance>",
    "<character_1>\n<gender>1girl</gender>\n<character_2></character_2></character_1>",
    "<character_1><appearance>blue_hair\n  <clothing>shirt</clothing></appearance></character_1>",
    "<caption>a <b>bold</b> move</caption>",
    "a\nb <>", "</>", "x\n<a$b>", '<character_1 id="1"></character_1>', "</ a>", "<a/ >", "</a/>",
    "<character_1>\n<gender 1girl</gender>", "smile <!-- todo", "a <![CDATA[x]]>",
    '1girl\n<?xml-stylesheet href="http://x/y.xsl"?>', '<?xml version="1.0"?>\n<caption>x</caption>',
    '  <?xml version="1.0"?><a></a>', "x <?xml version='1.0'?>",
    "<caption>tom\n  &nbsp;jerry</caption>", "x &#0; y", "x &#xD800;", "x &#" + "9" * 5000 + ";", "&#x10FFFF; &#65;",
    "rock & roll, a < b, <3, x&y, AT&T, 5 > 4, <caption>Q&A: 1 < 2 & done</caption>",
    '<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><foo>&xxe;</foo>',
    "1girl <character_1></character_1>\n<!entity x SYSTEM 'http://e/'>",
    "<character_1><n>a</n></character_1><character_1><gender>1boy</gender></character_1>",
    "<appearance>x</appearance><count>2</count><count><style>x</style></count>",
    "<general_tags><character_1></character_1></general_tags>",
    "<foo><bar><baz></baz></bar></foo>", "<a><b></a></b>", "<a><b></c></b></a>",
    "<character_1/><general_tags />", "<n>\u00e9\U0001F600</n>\n\U0001F600 <b", "\U0001F600\U0001F600 </x>",
    "<a\x1c></a>", "<a\x1cb></a>", "<a\ufeff></a>",
    SYSTEM_PROMPT_XML + "<character_1></character_2>",
    SYSTEM_PROMPT_XML + SYSTEM_PROMPT_LOW_QUALITY + "<caption>x",
    "You are an assistant who draws. <Prompt Start> <a></b>",
    "You are an assistant who draws. " + "x" * 2000 + "<Prompt Start> <a>",
    skeleton(0), skeleton(1), skeleton(3),
]


def _mutants(seed: int, count: int) -> list[str]:
    """Valid prompts broken at random places with the pieces people get wrong."""
    rng = random.Random(seed)
    bases = [skeleton(1), skeleton(2), SYSTEM_PROMPT_XML + skeleton(1),
             "<character_1><n>$character_1$</n><appearance>blue_hair</appearance></character_1>\n"
             "<general_tags><count>1girl</count></general_tags>\n<caption>A &amp; B &#233;</caption>",
             '<?xml version="1.0"?>\n<!-- note -->\n<caption>x</caption> loose, tags']
    pieces = ["<", ">", "/", "</appearance>", "<n>", "</n>", "<character_2>", "</character_1>", "<general_tags>",
              "&", "&amp;", "&nbsp;", "&#0;", "&#x41;", "<!--", "-->", "<?xml ?>", "<?php", "\n", " ", "<a b>",
              "<caption>", "\u00e9", "\U0001F600", "\x1c", "<!DOCTYPE", "<!x>", "<>", "</>", "<3"]
    out = []
    for _ in range(count):
        text = rng.choice(bases)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text) + 1)
            action = rng.random()
            if action < 0.6:
                text = text[:i] + rng.choice(pieces) + text[i:]
            elif action < 0.9:
                text = text[:i] + text[i + rng.randint(1, 12):]
            else:
                j = rng.randrange(len(text) + 1)
                text = text[:min(i, j)] + text[max(i, j):] + text[min(i, j):max(i, j)]
        out.append(text)
    return out


def _python_verdict(text: str):
    """The error message, or what the editor's status line reports of a good prompt."""
    try:
        parsed = parse_prompt(text)
    except PromptError as error:
        return str(error)
    return f"ok: xml={parsed.shape == 'xml'}, characters={len(parsed.characters)}"


def _js_verdicts(texts: list[str]) -> list[dict]:
    script = (f"import {{ checkPrompt, skeleton }} from {json.dumps(CHECKER.as_uri())};\n"
              "let input = ''; for await (const chunk of process.stdin) input += chunk;\n"
              "const { texts, skeletons } = JSON.parse(input);\n"
              "process.stdout.write(JSON.stringify({ verdicts: texts.map(checkPrompt),"
              " skeletons: skeletons.map((n) => skeleton(n)) }));\n")
    done = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True,
                          input=json.dumps({"texts": texts, "skeletons": [0, 1, 2, 3]}), timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_editor_check_gives_the_servers_verdict_on_every_prompt():
    texts = HANDWRITTEN + _mutants(seed=6, count=3000)
    answer = _js_verdicts(texts)
    mismatches = []
    errors = 0
    for text, js in zip(texts, answer["verdicts"]):
        if js.get("json"):
            continue  # the JSON wrapper is left to the server
        expected = _python_verdict(text)
        got = f"ok: xml={js['elements'] > 0}, characters={js['characters']}" if js["ok"] else js["message"]
        errors += not js["ok"]
        if got != expected:
            mismatches.append(f"{text[:120]!r}\n  python: {expected}\n  editor: {got}")
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ:\n" + "\n".join(mismatches[:10])
    assert errors > len(texts) // 3, "the corpus should be mostly broken prompts"


def test_editor_skeleton_is_the_servers_skeleton():
    answer = _js_verdicts([])
    assert answer["skeletons"] == [skeleton(n) for n in range(4)]
