"""The lab's word-level vocabulary and its Hugging Face tokenizer."""

from __future__ import annotations

from bganalysis.lab import grammar

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def vocabulary() -> list[str]:
    """Return the lab's words in id order: special tokens first, then a fixed sorted list."""
    words = set(grammar.DIGITS) | set(grammar.CONNECTIVES) | set(grammar.EQUALITY_WORDS)
    words |= set(grammar.ANSWER_WORDS) | set(grammar.KEYWORDS) | set(grammar.NAMES)
    words |= set(grammar.TASK_WORDS) | {"+", "-", ":", ";", "out"}
    return list(SPECIAL_TOKENS) + sorted(words)


def lab_tokenizer():
    """Build the lab tokenizer: whitespace-split words, `<bos>` prepended to every text.

    Returns a `PreTrainedTokenizerFast`, so `save_pretrained` writes the usual files and
    students trained on the lab are ordinary Hugging Face checkpoints.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )
