"""Word-level tokenizers for the caption grammar, in the two slots FluxPipeline fills.

Both use T5's special-token layout (pad 0, eos 1, unk 2), append the end token, and are saved as
`tokenizer.json` so that `PreTrainedTokenizerFast.from_pretrained` (which FluxPipeline calls through
the class recorded in model_index.json) loads them without any bitflux code. CLIPTextModel pools at the
first end token when its eos_token_id is not 2, which is why eos is 1 here.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from .scenes import vocabulary

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def vocab() -> dict[str, int]:
    words = [PAD, EOS, UNK] + vocabulary()
    return {w: i for i, w in enumerate(words)}


def build_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(WordLevel(vocab(), unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, EOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )
