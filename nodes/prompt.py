"""XML Prompt Flatten: parse and validate NewBie XML prompts and condition the model the way it was trained."""
from __future__ import annotations

from comfy_api.latest import io

from ..pipeline import conditioning, xml_prompt
from . import outputs

_PLACEHOLDER = ("<character_1><n>$character_1$</n><gender>1girl</gender><appearance>blue_hair, long_hair"
                "</appearance><expression>smile</expression></character_1>\n<general_tags><count>1girl</count>"
                "<style>anime_style</style><quality>masterpiece, best_quality</quality></general_tags>\n"
                "<caption>A girl with long blue hair smiles at the viewer.</caption>")
_DEFAULT_NEGATIVE = "lowres, bad_anatomy, bad_hands, text, error, worst_quality, low_quality, jpeg_artifacts, watermark"


class NewBieXMLPromptFlatten(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieXMLPromptFlatten",
            display_name="XML Prompt Flatten",
            category="NewBie",
            description="Validates a NewBie XML prompt (errors give line and column) and encodes it as NewBie was "
                        "trained: system prompt + XML to Gemma-3, the XML alone to Jina CLIP v2.",
            inputs=[
                io.String.Input("text", multiline=True, placeholder=_PLACEHOLDER,
                                tooltip="NewBie XML (<character_1>…, <general_tags>…, <caption>…), plain tags, text "
                                        "that already starts with a NewBie system prompt, or upstream's JSON "
                                        "template wrapper."),
                io.Combo.Input("mode", options=list(xml_prompt.ENCODER_MODES), default="official",
                               tooltip="official: system prompt + text to Gemma, text alone to Jina (as trained). "
                                       "tags: the flattened tag list to both (for prompts written for other "
                                       "models). raw: the text as typed to both (upstream ComfyUI's behaviour)."),
                io.String.Input("negative", multiline=True, default=_DEFAULT_NEGATIVE,
                                tooltip="Negative prompt; gets the same treatment as the positive one."),
                io.Clip.Input("clip", optional=True,
                              tooltip="NewBie's CLIP (from NewBie Loader or DualCLIPLoader type newbie). Without it "
                                      "only the text outputs are produced."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.String.Output(display_name="gemma_text", tooltip="Exactly what Gemma-3 encodes."),
                io.String.Output(display_name="jina_text", tooltip="Exactly what Jina CLIP v2 encodes."),
                io.String.Output(display_name="tags", tooltip="The prompt flattened to a tag list."),
                io.String.Output(display_name="report", tooltip="Characters and fields found, warnings."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # to tell a missing CLIP to the nodes that need it
        )

    @classmethod
    def execute(cls, text, mode, negative, clip=None) -> io.NodeOutput:
        pos, neg, tags, report = conditioning.prepare(text, negative, mode)
        if clip is None:
            positive, negative_cond = outputs.unavailable(
                cls.hidden.prompt, cls.hidden.unique_id, {0: "positive", 1: "negative"},
                "XML Prompt Flatten has no CLIP to encode with: connect NewBie Loader's CLIP to its clip input "
                "(without a CLIP it gives only the text outputs)")
        else:
            positive, is_newbie = conditioning.encode_split(clip, *pos, input_name=conditioning.POSITIVE)
            negative_cond, _ = conditioning.encode_split(clip, *neg, input_name=conditioning.NEGATIVE)
            if not is_newbie:
                report += "\nnote: this CLIP is not NewBie's (Gemma-3 + Jina); it got the prompt without system prompt"
        return io.NodeOutput(positive, negative_cond, pos[0], pos[1], tags, report)


NODES = [NewBieXMLPromptFlatten]
