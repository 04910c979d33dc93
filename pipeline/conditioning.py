"""Conditioning NewBie the way it was trained: one text for Gemma-3, another for Jina CLIP v2.

ComfyUI's NewBie tokenizer (comfy/text_encoders/newbie.py) returns {"gemma": ..., "jina": ...} tokens of the
same text; here each half is tokenized from its own text and the two are encoded together, so the result is
ComfyUI's own CONDITIONING (Gemma hidden states + Jina pooled vector) and works with every sampler node.
"""
from __future__ import annotations

from . import prompt_limits, xml_prompt

# How errors name the node's two text boxes.
POSITIVE = "positive prompt (text)"
NEGATIVE = "negative prompt (negative)"


def encode_split(clip, gemma_text: str, jina_text: str, input_name: str = POSITIVE):
    """CONDITIONING from `gemma_text` for Gemma and `jina_text` for Jina; other CLIPs get `jina_text` alone.

    The text is checked against what the encoders take (pipeline/prompt_limits.py) before anything is encoded,
    whichever loader built the CLIP; errors name `input_name`."""
    prompt_limits.check_text(clip.tokenizer, gemma_text, input_name)
    tokens_gemma = clip.tokenize(gemma_text)
    if "gemma" not in tokens_gemma or "jina" not in tokens_gemma:
        # Not NewBie's text encoders: the prompt without a system prompt is what other models understand.
        return clip.encode_from_tokens_scheduled(clip.tokenize(jina_text)), False
    prompt_limits.check_tokens(clip.tokenizer, tokens_gemma, gemma_text, input_name, halves=("gemma",))
    prompt_limits.check_text(clip.tokenizer, jina_text, input_name)
    tokens_jina = clip.tokenize(jina_text)
    prompt_limits.check_tokens(clip.tokenizer, tokens_jina, jina_text, input_name, halves=("jina",))
    return clip.encode_from_tokens_scheduled({"gemma": tokens_gemma["gemma"], "jina": tokens_jina["jina"]}), True


def prepare(text: str, negative: str, mode: str):
    """Parse both prompts and give (positive texts, negative texts, flattened tags, report)."""
    parsed = xml_prompt.parse_prompt(text, input_name=POSITIVE)
    parsed_neg = xml_prompt.parse_prompt(negative, input_name=NEGATIVE) if negative.strip() else None
    pos = xml_prompt.encoder_texts(parsed, mode)
    neg = xml_prompt.encoder_texts(parsed_neg, mode) if parsed_neg else ("", "")
    report = xml_prompt.report(parsed)
    if parsed_neg and parsed_neg.warnings:
        report += "\nnegative prompt warnings:\n" + "\n".join("  " + w for w in parsed_neg.warnings)
    return pos, neg, xml_prompt.flatten_tags(parsed), report
