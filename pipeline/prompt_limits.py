"""How much text NewBie's text encoders take, checked before anything is encoded.

Upstream's tokenizers do not bound a prompt: Gemma-3's has max_length 99999999 (one sequence of any length),
Jina's splits into 8192-token chunks (comfy/text_encoders/lumina2.py, jina_clip_2.py, sd1_clip.SDTokenizer). A
prompt of a million characters then becomes a Gemma sequence whose attention wants terabytes. The official code
gives Gemma at most 512 tokens (system prompt included) and Jina at most 2048, so NewBie never saw more; the pack
refuses longer prompts with the numbers instead of truncating them silently.

Works on any NewBie tokenizer (upstream's NewBieTokenizer or the pack's subclass) through feature checks, and
imports neither torch nor ComfyUI, so it runs in unit tests.
"""
from __future__ import annotations

from . import xml_prompt
from .errors import NewBieError

# (name in messages, most tokens, BOS/EOS included) per half of the NewBie tokenizer's output.
ENCODER_LIMITS = {"gemma": ("Gemma-3", 512), "jina": ("Jina CLIP v2", 2048)}
MAX_TEXT_CHARS = xml_prompt.MAX_PROMPT_CHARS  # before any tokenizing: keeps even the token count cheap
# The limits count the real tokenizers' tokens (Gemma-3: 262,144 pieces, XLM-RoBERTa: 250,002). A toy vocabulary,
# as in the pack's tiny test models (400 pieces), cuts the same text into ~2.5x more tokens; its limits are
# scaled so that the prompts that fit the real model fit it too.
TOY_VOCABULARY = 32_000
TOY_SCALE = 4


def limits_for(tokenizer) -> dict[str, tuple[str, int]]:
    """{half: (encoder name, most tokens)} for this NewBie tokenizer."""
    vocab = getattr(getattr(tokenizer, "gemma", None), "inv_vocab", None)
    if vocab is not None and len(vocab) < TOY_VOCABULARY:
        return {key: (name, limit * TOY_SCALE) for key, (name, limit) in ENCODER_LIMITS.items()}
    return ENCODER_LIMITS


class PromptTooLongError(NewBieError, ValueError):
    """A prompt with more tokens than an encoder takes; says which input, by how much, and what to do."""

    def __init__(self, input_name: str, problem: str, hint: str):
        self.input_name = input_name
        self.problem = problem
        self.hint = hint
        super().__init__(f"{input_name}: {problem}; {hint}")


def _too_long(input_name: str, encoder: str, limit: int, count: int, chars: int) -> PromptTooLongError:
    over = count - limit
    per_token = chars / count if count else 1.0
    return PromptTooLongError(
        input_name,
        f"{encoder} gets {count:,} tokens, {over:,} more than the {limit:,} it takes (NewBie's official limit; "
        "the system prompt counts too)",
        f"shorten it by at least {over:,} tokens (about {max(1, round(over * per_token)):,} characters)")


def check_text(tokenizer, text: str, input_name: str) -> None:
    """Refuse, cheaply and before the full tokenization, text the encoders cannot take: too many characters,
    characters the tokenizers cannot read, or more Gemma-3 tokens than the limit (counted by sentencepiece
    alone, which is linear and in C++; ComfyUI's tokenizing around it is Python per token)."""
    if len(text) > MAX_TEXT_CHARS:
        raise PromptTooLongError(input_name, f"the text is {len(text):,} characters long",
                                 f"keep it under {MAX_TEXT_CHARS:,} characters (and "
                                 f"{limits_for(tokenizer)['gemma'][1]} Gemma-3 tokens)")
    xml_prompt.check_encodable(text, input_name)
    sentencepiece = getattr(getattr(tokenizer, "gemma", None), "tokenizer", None)
    if callable(sentencepiece):  # ComfyUI's SPieceTokenizer: {"input_ids": [...]} with BOS, as Gemma gets it
        count = len(sentencepiece(text)["input_ids"])
        encoder, limit = limits_for(tokenizer)["gemma"]
        if count > limit:
            raise _too_long(input_name, encoder, limit, count, len(text))


def token_count(batches) -> int:
    """Tokens in one encoder's tokenize_with_weights output (a list of batches), padding included."""
    return sum(len(batch) for batch in batches)


def check_tokens(tokenizer, tokens: dict, text: str, input_name: str, halves=tuple(ENCODER_LIMITS)) -> None:
    """Refuse tokenized text (ComfyUI's {"gemma": ..., "jina": ...}) that has more tokens than an encoder takes."""
    limits = limits_for(tokenizer)
    for key in halves:
        if key in tokens:
            encoder, limit = limits[key]
            count = token_count(tokens[key])
            if count > limit:
                raise _too_long(input_name, encoder, limit, count, len(text))
