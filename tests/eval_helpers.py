"""A tiny real model with a byte-level tokenizer, so any benchmark text can be encoded."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import tiny_llama

DATA = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: 256 byte tokens plus <pad>, <bos>, <eos>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=256)


def tiny_byte_model(folder: Path | None = None, seed: int = 0):
    """(model, tokenizer); saved to `folder` when given."""
    tokenizer = byte_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed)
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, 1, 2
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    if folder is not None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return model, tokenizer
