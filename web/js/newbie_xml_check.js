// A fast, dependency-free check of NewBie XML prompts for the editor: the same errors, at the same line and
// column, with the same words as the server's parser (pipeline/xml_prompt.py), which stays the authority.
// It only finds errors; it does not build the prompt. The JSON template wrapper is left to the server.
// tests/browser/test_xml_check_js.py runs this file under Node against the Python parser.

const SYSTEM_PROMPTS = [
  "You are an assistant designed to generate high-quality anime images based on xml format prompts. <Prompt Start>",
  "You are an assistant designed to generate high-quality anime images with the highest degree of image-text " +
    "alignment based on textual prompts. <Prompt Start>",
  "You are an assistant designed to generate low-quality images based on textual prompts. <Prompt Start>",
];
const PROMPT_MARKER = "<Prompt Start>";
const ASSISTANT_OPENING = "You are an assistant";
const KNOWN_GENERAL_TAGS = new Set(["count", "style", "artists", "background", "environment", "perspective",
  "lighting", "atmosphere", "quality", "objects", "other", "resolution"]);
const PREDEFINED_ENTITIES = new Set(["lt", "gt", "amp", "quot", "apos"]);
const MAX_PROMPT_CHARS = 1_000_000;

// Python's str.isspace() / re's \s, which differ from JavaScript's \s (U+001C..U+001F, U+0085, U+FEFF).
const SPACE = "\\t\\n\\v\\f\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const NAME = "[A-Za-z_][A-Za-z0-9_.\\-]*";
const TAG_NAME = new RegExp(`^${NAME}$`);
const CHARACTER_BLOCK = /^character_[1-9][0-9]{0,5}$/;
const REFERENCE = new RegExp(`&(?:#[0-9]+|#[xX][0-9a-fA-F]+|${NAME});`, "g");
const DTD = /<!(?:doctype|entity|element|attlist)/i;
const DTD_AT = /<!(?:doctype|entity|element|attlist)/iy;
const MARKUP_START = new RegExp(`<(?:(/?)(${NAME})[${SPACE}]*(/?)>|[A-Za-z_/!?>])`, "g");
const NON_SPACE = new RegExp(`[^${SPACE}]`, "g");
const TRAILING_SPACE = new RegExp(`[${SPACE}]+$`);
const IS_SPACE = new RegExp(`^[${SPACE}]$`);
const SPACE_RUN = new RegExp(`[${SPACE}]+`);

class PromptError extends Error {
  constructor(index, problem, hint) {
    super(problem);
    this.index = index;
    this.problem = problem;
    this.hint = hint ?? null;
  }
}

function skipSpace(text, index) {
  NON_SPACE.lastIndex = index;
  const found = NON_SPACE.exec(text);
  return found ? found.index : text.length;
}

// Python slices and lengths count code points; JavaScript strings count UTF-16 units.
const codePoints = (text) => Array.from(text).length;
function snippet(text, limit = 40) {
  const chars = Array.from(text);
  return chars.length <= limit ? text : chars.slice(0, limit).join("") + "\u2026";
}

function stripSystemPrompts(text) {
  let start = skipSpace(text, 0);
  for (;;) {
    let end = -1;
    for (const prompt of SYSTEM_PROMPTS) {
      if (text.startsWith(prompt, start)) {
        end = start + prompt.length;
        break;
      }
    }
    if (end === -1) {
      if (!text.startsWith(ASSISTANT_OPENING, start)) return start;
      const marker = text.slice(start, start + 2000).indexOf(PROMPT_MARKER);
      if (marker === -1) return start;
      end = start + marker + PROMPT_MARKER.length;
    }
    start = skipSpace(text, end);
  }
}

function looksLikeJson(text, start) {
  const i = skipSpace(text, start);
  return text[i] === "{" && text[skipSpace(text, i + 1)] === '"';
}

class Checker {
  constructor(text, start) {
    this.text = text;
    this.start = start;
    this.stack = [{ name: "", pos: start, role: "top" }];
    this.elements = 0;
    this.characters = new Set();
    this.general = false;
    this.caption = false;
  }

  run() {
    const text = this.text;
    let i = this.start;
    MARKUP_START.lastIndex = i;
    let found;
    while ((found = MARKUP_START.exec(text)) !== null) {
      const lt = found.index;
      if (lt > i) this.checkText(i, lt);
      const [, closing, name, selfClosing] = found;
      if (name === undefined || (closing && selfClosing)) {
        i = this.markup(lt); // comments, declarations and every malformed tag
      } else {
        if (closing) this.close(name, lt);
        else {
          this.open(name, lt);
          if (selfClosing) this.close(name, lt);
        }
        i = lt + found[0].length;
      }
      MARKUP_START.lastIndex = i;
    }
    this.checkText(i, text.length);
    if (this.stack.length > 1) {
      const open = this.stack[this.stack.length - 1];
      throw new PromptError(open.pos, `<${open.name}> opened here is never closed`,
        "close it before the end of the prompt");
    }
  }

  checkText(a, b) {
    const segment = this.text.slice(a, b);
    if (!segment.includes("&")) return;
    REFERENCE.lastIndex = 0;
    let match;
    while ((match = REFERENCE.exec(segment)) !== null) {
      const ref = match[0];
      const pos = a + match.index;
      const body = ref.slice(1, -1);
      if (!body.startsWith("#")) {
        if (PREDEFINED_ENTITIES.has(body)) continue;
        throw new PromptError(pos, `unknown entity ${snippet(ref)}`,
          "only &lt; &gt; &amp; &quot; &apos; and numeric references like &#233; are allowed; " +
          "write &amp; for a literal &");
      }
      const hex = body[1] === "x" || body[1] === "X";
      const digits = (hex ? body.slice(2) : body.slice(1)).replace(/^0+/, "") || "0";
      const code = digits.length <= 7 ? parseInt(digits, hex ? 16 : 10) : -1;
      if (code <= 0 || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) {
        throw new PromptError(pos, `${snippet(ref)} is not a valid character reference`,
          "use a code point between 1 and 10FFFF, or write &amp; for a literal &");
      }
    }
  }

  markup(lt) {
    const text = this.text;
    const after = text[lt + 1];
    if (after === "!") {
      if (text.startsWith("<!--", lt)) {
        const end = text.indexOf("-->", lt + 4);
        if (end === -1) throw new PromptError(lt, "comment opened here is never closed", "end it with -->");
        return end + 3;
      }
      DTD_AT.lastIndex = lt;
      if (DTD_AT.test(text)) throw dtdError(lt);
      throw new PromptError(lt, "'<!' markup other than comments is not allowed in prompts",
        "remove it, or write &lt; for a literal '<'");
    }
    if (after === "?") return this.declaration(lt);
    const gt = text.indexOf(">", lt);
    const limit = gt === -1 ? text.length : gt;
    let nextLt = text.indexOf("<", lt + 1);
    if (nextLt >= limit) nextLt = -1;
    if (gt === -1 || nextLt !== -1) {
      const stop = nextLt !== -1 ? nextLt : text.length;
      throw new PromptError(lt,
        `tag ${snippet(text.slice(lt, stop).replace(TRAILING_SPACE, ""))} is missing its closing '>'`,
        "finish the tag with '>', or write &lt; for a literal '<'");
    }
    const inner = text.slice(lt + 1, gt);
    const closing = inner.startsWith("/");
    const selfClosing = !closing && inner.endsWith("/");
    const name = inner.slice(closing ? 1 : 0, selfClosing ? inner.length - 1 : inner.length)
      .replace(TRAILING_SPACE, "");
    this.checkName(name, inner, lt);
    if (closing) this.close(name, lt);
    else {
      this.open(name, lt);
      if (selfClosing) this.close(name, lt);
    }
    return gt + 1;
  }

  checkName(name, inner, lt) {
    if (TAG_NAME.test(name)) return;
    if (!name) {
      throw new PromptError(lt, `empty tag name <${inner}>`,
        "write a name such as <appearance>, or &lt; for a literal '<'");
    }
    const first = name.slice(skipSpace(name, 0)).split(SPACE_RUN)[0];
    if (name !== first && !IS_SPACE.test(name[0]) && TAG_NAME.test(first)) {
      throw new PromptError(lt, `<${snippet(inner)}> has attributes, which NewBie prompts do not use`,
        `write <${first}> without them`);
    }
    throw new PromptError(lt, `<${snippet(inner)}> is not a valid tag name`,
      "tag names use letters, digits and _ (e.g. <character_1>); write &lt; for a literal '<'");
  }

  declaration(lt) {
    const text = this.text;
    const isXmlDecl = text.startsWith("<?xml", lt) && lt + 5 < text.length &&
      (IS_SPACE.test(text[lt + 5]) || text[lt + 5] === "?");
    const end = text.indexOf("?>", lt + 2);
    if (isXmlDecl && lt === skipSpace(text, this.start) && end !== -1) return end + 2;
    throw new PromptError(lt, "processing instructions are not allowed in prompts",
      "remove the <?...?> part (an <?xml ...?> declaration is only accepted at the very start)");
  }

  open(name, lt) {
    const parent = this.stack[this.stack.length - 1];
    if (parent.role === "field" || parent.role === "caption") {
      throw new PromptError(lt, `<${name}> cannot go inside <${parent.name}> (fields do not nest)`,
        `close </${parent.name}> before <${name}>`);
    }
    const isCharacter = CHARACTER_BLOCK.test(name);
    if (parent.role !== "top" && (isCharacter || name === "general_tags")) {
      throw new PromptError(lt, `<${name}> cannot go inside <${parent.name}> (blocks do not nest)`,
        `close </${parent.name}> before <${name}>`);
    }
    this.elements += 1;
    let role = "field";
    if (name === "caption") {
      role = "caption";
      this.caption = true;
    } else if (parent.role === "top") {
      if (isCharacter) {
        role = "character";
        this.characters.add(Number(name.slice("character_".length)));
      } else if (name === "general_tags") {
        role = "general";
        this.general = true;
      } else if (!KNOWN_GENERAL_TAGS.has(name)) {
        role = "other";
      }
    }
    this.stack.push({ name, pos: lt, role });
  }

  close(name, lt) {
    const stack = this.stack;
    const top = stack[stack.length - 1];
    if (top.name === name && top.role !== "top") {
      stack.pop();
      return;
    }
    if (stack.length === 1) {
      throw new PromptError(lt, `</${name}> has no matching <${name}>`, `remove it, or add <${name}> before it`);
    }
    if (stack.slice(1).some((element) => element.name === name)) {
      // Crossing tags: point at the element that was left open.
      throw new PromptError(top.pos, `<${top.name}> opened here is never closed`, `close it before </${name}>`);
    }
    throw new PromptError(lt, `</${name}> closes <${top.name}>, which is still open`, `close </${top.name}> first`);
  }
}

function dtdError(index) {
  return new PromptError(index, "DTDs and entity declarations are not allowed in prompts",
    "remove the <!DOCTYPE ...>/<!ENTITY ...> part");
}

function located(text, error) {
  const lineStart = error.index === 0 ? 0 : text.lastIndexOf("\n", error.index - 1) + 1;
  const line = text.slice(0, lineStart).split("\n").length;
  const column = codePoints(text.slice(lineStart, error.index)) + 1;
  const head = `line ${line}, column ${column}: ${error.problem}`;
  return { ok: false, line, column, index: error.index, problem: error.problem, hint: error.hint,
    message: error.hint ? `${head}; ${error.hint}` : head };
}

/**
 * Check a prompt as the server will. Returns {ok: true, json, elements, characters, general, caption} or
 * {ok: false, line, column, index, problem, hint, message}; `message` reads exactly like the server's error.
 */
export function checkPrompt(text) {
  if (codePoints(text) > MAX_PROMPT_CHARS) {
    const length = codePoints(text).toLocaleString("en-US");
    return located(text, new PromptError(0, `the prompt is ${length} characters long`,
      `keep it under ${MAX_PROMPT_CHARS.toLocaleString("en-US")}`));
  }
  try {
    const dtd = DTD.exec(text);
    if (dtd) throw dtdError(dtd.index);
    const start = stripSystemPrompts(text);
    if (looksLikeJson(text, start)) {
      return { ok: true, json: true, elements: 0, characters: 0, general: false, caption: false };
    }
    const checker = new Checker(text, start);
    checker.run();
    return { ok: true, json: false, elements: checker.elements, characters: checker.characters.size,
      general: checker.general, caption: checker.caption };
  } catch (error) {
    if (error instanceof PromptError) return located(text, error);
    throw error;
  }
}

const CHARACTER_HINTS = [["gender", "1girl"], ["appearance", "long_hair, blue_eyes"],
  ["clothing", "school_uniform"], ["expression", "smile"], ["action", "standing"], ["position", "center"],
  ["interaction", "looking_at_viewer"], ["body_type", "slim"]];
const GENERAL_HINTS = [["style", "anime_style, digital_art"], ["artists", "artist_name"],
  ["background", "simple_background"], ["environment", "outdoors"], ["perspective", "cowboy_shot"],
  ["lighting", "soft_lighting"], ["atmosphere", "cheerful"], ["quality", "high_quality, masterpiece"],
  ["objects", "flower"], ["other", "none"], ["resolution", "highres"]];

/** One <character_N> block with every usual field (pipeline/xml_prompt.skeleton writes the same lines). */
export function characterBlock(index) {
  return [`<character_${index}>`, `  <n>$character_${index}$</n>`,
    ...CHARACTER_HINTS.map(([name, hint]) => `  <${name}>${hint}</${name}>`), `</character_${index}>`].join("\n");
}

/** The same text as pipeline/xml_prompt.skeleton(n): n character blocks and <general_tags>. */
export function skeleton(nCharacters = 1) {
  const lines = [];
  for (let index = 1; index <= nCharacters; index++) lines.push(characterBlock(index));
  const count = nCharacters === 0 ? "no_humans" : nCharacters === 1 ? "1girl" : `${nCharacters}girls`;
  lines.push("<general_tags>", `  <count>${count}</count>`,
    ...GENERAL_HINTS.map(([name, hint]) => `  <${name}>${hint}</${name}>`), "</general_tags>");
  return lines.join("\n");
}
