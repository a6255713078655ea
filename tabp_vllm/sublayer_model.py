"""The vLLM model that serves sublayer masks: vLLM's own heterogeneous-layer Llama (DeciLM,
vllm/model_executor/models/nemotron_nas.py), whose `config.block_configs[i].attention.no_op` /
`.ffn.no_op` leave a block's attention or MLP out, and whose KV cache is sized from the attention
layers that exist.

One fix on top, and the reason this is a registered subclass rather than `DeciLMForCausalLM`
itself (patches/README.md): DeciLMDecoderLayer.forward, for a block whose attention is a no-op
while no residual exists yet (block 0, or every block before it removed whole), passes
`residual=None` to the fused add+RMSNorm in front of the MLP, which then returns one tensor where
two are unpacked (an error, or with 2 tokens a silent wrong split). Here that block starts the
residual stream itself, as the attention's RMSNorm would have.

Registered (lazily, by name) from the plugin entry point `tabp_vllm.loader.register`.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.nemotron_nas import (DeciLMDecoderLayer, DeciLMForCausalLM,
                                                     DeciModel)


class TabpSublayerDecoderLayer(DeciLMDecoderLayer):
    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None and self._is_no_op_attention and not self._is_no_op_ffn:
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            return self.mlp(hidden_states), residual
        return super().forward(positions, hidden_states, residual)


class TabpSublayerForCausalLM(DeciLMForCausalLM):
    """DeciLMForCausalLM with TabpSublayerDecoderLayer blocks (weights, KV sizing, no-op
    handling: all DeciLM's)."""

    def _init_model(self, vllm_config, prefix: str = ""):
        return DeciModel(vllm_config=vllm_config, prefix=prefix,
                         layer_type=TabpSublayerDecoderLayer)
