"""Issue 14, pure logic: which input an error is in, unreadable characters, token limits, numbers that are not."""
from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipeline import conditioning, prompt_limits, xml_prompt  # noqa: E402
from pipeline.errors import NewBieError, require_finite  # noqa: E402
from pipeline.xml_prompt import PromptError  # noqa: E402

BAD_XML = "<character_1>\n  <appearance>blue_hair\n</character_1>"


class FakeSentencePiece:
    """Like ComfyUI's SPieceTokenizer: one token per word, plus BOS; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text):
        self.calls += 1
        return {"input_ids": [2] + [1] * len(text.split())}


class FakeHalf:
    def __init__(self, vocab_size):
        self.tokenizer = FakeSentencePiece()
        self.inv_vocab = dict.fromkeys(range(vocab_size))


class FakeTokenizer:
    def __init__(self, vocab_size=262_144):
        self.gemma = FakeHalf(vocab_size)


# -- which input ------------------------------------------------------------------------------------------------

def test_xml_error_in_negative_prompt_names_the_negative_input():
    with pytest.raises(PromptError) as info:
        conditioning.prepare(xml_prompt.skeleton(1), BAD_XML, "official")
    message = str(info.value)
    assert message.startswith("negative prompt (negative), line 2, column 3: <appearance>"), message


def test_xml_error_in_positive_prompt_names_the_positive_input():
    with pytest.raises(PromptError) as info:
        conditioning.prepare(BAD_XML, "lowres", "official")
    assert str(info.value).startswith("positive prompt (text), line 2, column 3:"), str(info.value)


def test_parse_prompt_without_input_name_keeps_the_old_message():
    # The editor's live check (web/) shows exactly parse_prompt's message; it must not change.
    with pytest.raises(PromptError) as info:
        xml_prompt.parse_prompt(BAD_XML)
    assert str(info.value).startswith("line 2, column 3:")


def test_input_name_survives_pickle():
    error = PromptError("x", line=3, column=4, hint="y", input_name="negative prompt")
    assert str(pickle.loads(pickle.dumps(error))) == str(error) == "negative prompt, line 3, column 4: x; y"


# -- characters the tokenizers cannot read ------------------------------------------------------------------------

@pytest.mark.parametrize("text,line,column,code", [
    ("blue_hair, \ud800smile", 1, 12, "U+D800"),
    ("<character_1>\n<n>\udfff</n></character_1>", 2, 4, "U+DFFF"),
    ("a\ud83d\ude00", 1, 2, "U+D83D"),  # a pair left as two code points is still two unreadable halves
])
def test_lone_surrogates_are_refused_with_line_and_column(text, line, column, code):
    with pytest.raises(PromptError) as info:
        xml_prompt.parse_prompt(text, input_name="positive prompt")
    error = info.value
    assert (error.line, error.column) == (line, column)
    assert code in str(error) and str(error).startswith("positive prompt, "), str(error)


def test_surrogate_escaped_in_the_json_wrapper_points_at_the_escape():
    text = '{"image": {"tags": "<a>x\\ud800</a>", "caption": "ok"}}'
    with pytest.raises(PromptError) as info:
        xml_prompt.parse_prompt(text)
    assert (info.value.line, info.value.column) == (1, text.index("\\ud800") + 1), str(info.value)


def test_surrogate_in_json_caption_is_refused():
    text = '{"image": {"tags": "<a>x</a>", "caption": "\\udc00"}}'
    with pytest.raises(PromptError) as info:
        xml_prompt.parse_prompt(text)
    assert info.value.column == text.index("\\udc00") + 1


def test_real_astral_characters_are_fine():
    parsed = xml_prompt.parse_prompt('{"image": {"tags": "<a>\\ud83d\\ude00 \U0001F600</a>"}}')
    assert "\U0001F600 \U0001F600" in parsed.body
    xml_prompt.check_encodable("smile \U0001F600")


# -- token limits --------------------------------------------------------------------------------------------

def test_check_text_refuses_too_many_gemma_tokens_with_the_numbers():
    text = " ".join(["tag"] * 600)  # 601 tokens with BOS
    with pytest.raises(prompt_limits.PromptTooLongError) as info:
        prompt_limits.check_text(FakeTokenizer(), text, "negative prompt (negative)")
    message = str(info.value)
    assert message.startswith("negative prompt (negative): Gemma-3 gets 601 tokens, 89 more than the 512"), message
    assert "shorten it by at least 89 tokens" in message


def test_check_text_accepts_the_limit_exactly():
    prompt_limits.check_text(FakeTokenizer(), " ".join(["tag"] * 511), "text")  # 512 with BOS


def test_check_text_refuses_over_the_character_cap_without_tokenizing():
    tokenizer = FakeTokenizer()
    with pytest.raises(prompt_limits.PromptTooLongError) as info:
        prompt_limits.check_text(tokenizer, "a" * (prompt_limits.MAX_TEXT_CHARS + 1), "text")
    assert "1,000,001 characters" in str(info.value)
    assert tokenizer.gemma.tokenizer.calls == 0


def test_check_text_refuses_surrogates_before_tokenizing():
    tokenizer = FakeTokenizer()
    with pytest.raises(PromptError, match="U\\+D800"):
        prompt_limits.check_text(tokenizer, "a\ud800", "prompt text")
    assert tokenizer.gemma.tokenizer.calls == 0


def test_check_tokens_counts_every_batch_of_each_half():
    tokens = {"gemma": [[(1, 1.0)] * 300], "jina": [[(1, 1.0)] * 2000, [(1, 1.0)] * 100]}
    with pytest.raises(prompt_limits.PromptTooLongError, match="Jina CLIP v2 gets 2,100 tokens, 52 more"):
        prompt_limits.check_tokens(FakeTokenizer(), tokens, "x " * 2100, "prompt text")
    prompt_limits.check_tokens(FakeTokenizer(), tokens, "x", "prompt text", halves=("gemma",))


def test_toy_vocabulary_gets_scaled_limits():
    toy = prompt_limits.limits_for(FakeTokenizer(vocab_size=400))
    assert toy["gemma"][1] == 512 * prompt_limits.TOY_SCALE
    assert prompt_limits.limits_for(FakeTokenizer())["gemma"] == ("Gemma-3", 512)
    assert prompt_limits.limits_for(object()) == prompt_limits.ENCODER_LIMITS  # unknown tokenizer: official


# -- numbers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_require_finite_refuses_non_numbers(value):
    with pytest.raises(NewBieError, match=r"Euler Ancestral Sampler: eta is .*, not a number; give"):
        require_finite(value, "eta", "Euler Ancestral Sampler", "a number from 0 to 2")


def test_require_finite_passes_numbers_through():
    assert require_finite(0.5, "eta", "node", "x") == 0.5
