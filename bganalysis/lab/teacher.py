"""The exact lab teacher, wrapped as a Hugging Face causal LM.

`LabTeacher` is a `PreTrainedModel` whose logits are the exact log-probabilities of the
lab process, so the trainer, the rollout engine and `generate` use it like any other
model. It has no weights to learn; `save_pretrained` writes its settings and a one-element
placeholder tensor, and `AutoModelForCausalLM.from_pretrained` loads it back once
`bganalysis.lab` is imported (the import registers the model type).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from bganalysis.lab.process import LabProcess
from bganalysis.lab.tokenizer import vocabulary


class LabConfig(PretrainedConfig):
    """Settings of the lab teacher: the mistake rate `floor` and the `corrupt_noise`."""

    model_type = "bganalysis_lab"

    def __init__(self, floor: float = 1e-4, corrupt_noise: float = 0.5, **kwargs):
        words = vocabulary()
        kwargs.setdefault("vocab_size", len(words))
        kwargs.setdefault("bos_token_id", words.index("<bos>"))
        kwargs.setdefault("eos_token_id", words.index("<eos>"))
        kwargs.setdefault("pad_token_id", words.index("<pad>"))
        kwargs.setdefault("use_cache", False)
        kwargs.setdefault("num_hidden_layers", 0)  # no layers and no KV cache
        super().__init__(**kwargs)
        self.floor = floor
        self.corrupt_noise = corrupt_noise


class LabTeacher(PreTrainedModel, GenerationMixin):
    """Exact teacher of the lab: `forward(input_ids)` returns exact next-token log-probs."""

    config_class = LabConfig
    base_model_prefix = "lab"
    main_input_name = "input_ids"

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the exact process re-reads the prefix; a KV cache has nothing to hold

    def __init__(self, config: LabConfig | None = None):
        super().__init__(config or LabConfig())
        self.placeholder = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.process = LabProcess(self.config.floor, self.config.corrupt_noise)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Return exact log-probabilities as logits, [batch, seq, vocab] float32.

        Left or right padding is read from `attention_mask`. Left padding gets the
        distribution after `<bos>`, right padding repeats the one after the last real
        token. With `logits_to_keep=k > 0` only the last k positions are returned (the
        rollout engine requests 1).
        """
        batch, length = input_ids.shape
        keep = length if not logits_to_keep else min(int(logits_to_keep), length)
        rows = input_ids.tolist()
        masks = attention_mask.tolist() if attention_mask is not None else None
        logits = torch.empty(batch, keep, self.process.vocab_size)
        for row_index, row in enumerate(rows):
            start, end = 0, length
            if masks is not None and 1 in masks[row_index]:
                start = masks[row_index].index(1)
                end = length - masks[row_index][::-1].index(1)
            logits[row_index] = self._row_logits(row, start, end, length - keep)
        return CausalLMOutputWithPast(logits=logits.to(input_ids.device))

    def _row_logits(self, row: list[int], start: int, end: int, first_kept: int) -> torch.Tensor:
        process = self.process
        tokens = row[start:end]
        offset = 0
        if not tokens or tokens[0] != process.bos_id:
            tokens = [process.bos_id] + tokens  # a row without <bos> is read as if it had one
            offset = 1

        if len(row) - first_kept == 1 and end == len(row):
            return process.logprobs(process.state_after(tokens)).unsqueeze(0)

        # states_along(tokens)[i] is the state after tokens[0..i], the one position i predicts from.
        states = process.states_along(tokens)[offset:offset + end - start]
        full = [process.states_along([process.bos_id])[0]] * start + states
        full += [full[-1]] * (len(row) - end)
        return torch.stack([process.logprobs(state) for state in full[first_kept:]])

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
