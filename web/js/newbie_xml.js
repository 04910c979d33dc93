// XML Prompt Flatten in the editor: checks the prompt as you type (the first error, at its line and column, in a
// status line under the node, and a red outline on the text box that holds it), and offers the XML skeleton
// from the node's context menu. The server's parser stays the authority; this only saves a round trip.
import { app } from "../../../scripts/app.js";
import { characterBlock, checkPrompt, skeleton } from "./newbie_xml_check.js";

const NODE_TYPE = "NewBieXMLPromptFlatten";
const CHECKED_WIDGETS = ["text", "negative"];
const STATUS_HEIGHT = 36; // two lines: most messages fit whole on a node of the default width
const CHECK_DELAY_MS = 60;
const STYLE = `
textarea.newbie-xml-invalid { outline: 2px solid #e5484d !important; outline-offset: -2px; }
.newbie-xml-status { box-sizing: border-box; height: ${STATUS_HEIGHT}px; padding: 2px 6px; border-radius: 4px;
  font: 12px/16px ui-monospace, monospace; overflow: hidden; overflow-wrap: anywhere;
  display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 2; }
.newbie-xml-status[data-state="error"] { color: #fff; background: #b4232a; cursor: pointer; }
.newbie-xml-status[data-state="ok"] { color: #7fcf8a; }
.newbie-xml-status[data-state="info"] { color: #a0a0a0; }
`;

function addStyleOnce() {
  if (document.getElementById("newbie-xml-style")) return;
  const style = document.createElement("style");
  style.id = "newbie-xml-style";
  style.textContent = STYLE;
  document.head.append(style);
}

const widgetOf = (node, name) => node.widgets?.find((w) => w.name === name);
const isLinked = (node, name) => node.inputs?.some((input) => input.name === name && input.link != null);

function textareaOf(widget) {
  // Front ends before widget.element kept the textarea in inputEl. In the modern node design (Nodes 2.0) the
  // visible box is the front end's own component, so there only the status line shows the error.
  const element = widget?.element ?? widget?.inputEl;
  return element instanceof HTMLTextAreaElement ? element : null;
}

function summary(verdict, text) {
  if (verdict.json) return ["info", "JSON template: checked by the server when the prompt runs"];
  if (!text.trim()) return ["info", "empty prompt"];
  const parts = [];
  if (verdict.characters) parts.push(`${verdict.characters} character${verdict.characters > 1 ? "s" : ""}`);
  if (verdict.general) parts.push("general_tags");
  if (verdict.caption) parts.push("caption");
  if (parts.length) return ["ok", `\u2713 well-formed XML: ${parts.join(", ")}`];
  return ["ok", verdict.elements ? "\u2713 well-formed XML" : "\u2713 plain tags (no XML)"];
}

function check(node) {
  const state = node.newbieXml;
  if (!state) return;
  let failure = null;
  let textVerdict = null;
  for (const name of CHECKED_WIDGETS) {
    const widget = widgetOf(node, name);
    if (!widget) continue;
    const value = typeof widget.value === "string" ? widget.value : "";
    // A linked input is checked by the server; a blank negative prompt is not parsed at all.
    const skip = isLinked(node, name) || (name === "negative" && !value.trim());
    const verdict = skip ? { ok: true, linked: isLinked(node, name) } : checkPrompt(value);
    const textarea = textareaOf(widget);
    textarea?.classList.toggle("newbie-xml-invalid", !verdict.ok);
    textarea?.setAttribute("aria-invalid", String(!verdict.ok));
    if (!verdict.ok && !failure) failure = { name, verdict, textarea };
    if (name === "text") textVerdict = { verdict, value };
  }
  const status = state.status;
  let kind;
  let message;
  if (failure) {
    kind = "error";
    message = `\u2717 ${failure.name === "text" ? "" : "negative: "}${failure.verdict.message}`;
  } else if (!textVerdict || textVerdict.verdict.linked) {
    [kind, message] = ["info", "text comes from a link: checked by the server when the prompt runs"];
  } else {
    [kind, message] = summary(textVerdict.verdict, textVerdict.value);
  }
  status.dataset.state = kind;
  status.dataset.line = failure ? String(failure.verdict.line) : "";
  status.dataset.column = failure ? String(failure.verdict.column) : "";
  status.textContent = message;
  status.title = failure ? `${message}\n(click to go there)` : message;
  state.failure = failure;
}

function scheduleCheck(node) {
  const state = node.newbieXml;
  if (!state || state.timer) return;
  state.timer = setTimeout(() => {
    state.timer = null;
    check(node);
  }, CHECK_DELAY_MS);
}

function goToError(node) {
  const failure = node.newbieXml?.failure;
  const textarea = failure?.textarea;
  if (!textarea) return;
  const start = failure.verdict.index;
  const close = textarea.value.indexOf(">", start);
  textarea.focus();
  textarea.setSelectionRange(start, close !== -1 && close - start < 80 ? close + 1 : start + 1);
}

function setUp(node) {
  addStyleOnce();
  const status = document.createElement("div");
  status.className = "newbie-xml-status";
  status.dataset.testid = "newbie-xml-status";
  status.addEventListener("click", () => goToError(node));
  const widget = node.addDOMWidget("xml_check", "newbie-xml-status", status, {
    serialize: false, // neither in the saved workflow nor in the prompt sent to the server
    hideOnZoom: true,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => STATUS_HEIGHT,
    getMaxHeight: () => STATUS_HEIGHT,
  });
  widget.serialize = false;
  node.newbieXml = { status, timer: null, failure: null };
  for (const name of CHECKED_WIDGETS) {
    const checked = widgetOf(node, name);
    if (!checked) continue;
    const callback = checked.callback;
    checked.callback = function (...args) {
      const result = callback?.apply(this, args);
      scheduleCheck(node);
      return result;
    };
    textareaOf(checked)?.addEventListener("input", () => scheduleCheck(node));
  }
  scheduleCheck(node);
}

function setText(node, text) {
  const widget = widgetOf(node, "text");
  widget.value = text;
  const textarea = textareaOf(widget);
  if (textarea && textarea.value !== text) textarea.value = text;
  check(node);
  node.setDirtyCanvas?.(true, true);
}

function nextCharacterIndex(text) {
  let highest = 0;
  for (const match of text.matchAll(/<character_([1-9][0-9]{0,5})>/g)) highest = Math.max(highest, Number(match[1]));
  return highest + 1;
}

function addCharacterBlock(node) {
  const text = widgetOf(node, "text").value ?? "";
  const block = characterBlock(nextCharacterIndex(text));
  const general = text.search(/^[ \t]*<general_tags>/m);
  if (general !== -1) setText(node, `${text.slice(0, general)}${block}\n${text.slice(general)}`);
  else setText(node, text.trim() ? `${text.replace(/\s+$/, "")}\n${block}` : block);
}

function menuOptions(node) {
  const widget = widgetOf(node, "text");
  if (!widget || isLinked(node, "text")) return [];
  const blank = !(widget.value ?? "").trim();
  const skeletons = [1, 2, 3].map((n) => ({
    content: `NewBie XML: skeleton with ${n} character${n > 1 ? "s" : ""}${blank ? "" : " (clear the text first)"}`,
    disabled: !blank,
    callback: () => setText(node, skeleton(n)),
  }));
  const next = nextCharacterIndex(widget.value ?? "");
  return [...skeletons, { content: `NewBie XML: add a <character_${next}> block`, callback: () => addCharacterBlock(node) }];
}

app.registerExtension({
  name: "NewBie.XMLPrompt",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      setUp(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      scheduleCheck(this);
      return result;
    };
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function (...args) {
      const result = onConnectionsChange?.apply(this, args);
      scheduleCheck(this);
      return result;
    };
    const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
    nodeType.prototype.getExtraMenuOptions = function (canvas, options) {
      const result = getExtraMenuOptions?.apply(this, [canvas, options]);
      const ours = menuOptions(this);
      if (ours.length) options.push(null, ...ours);
      return result;
    };
  },
});
