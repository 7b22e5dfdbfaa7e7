"""The CLIP text transformer that Stable Diffusion conditions on (Radford et al. 2021).

    token ids (B, 77)  ->  hidden states (B, 77, D)

Token + position embeddings, pre-norm transformer layers with a causal mask, a final LayerNorm.
SD 1.x: OpenAI ViT-L/14 text tower (12 layers, D = 768, quick-GELU). SD 2.x: OpenCLIP ViT-H/14
(D = 1024, GELU), of which SD uses the penultimate layer: the config runs 23 of its 24 layers
and the final LayerNorm is still applied, as SD 2 does.

Parameter names are transformers' `CLIPTextModel` names without the `text_model.` and
`encoder.` levels (model_io.py renames).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffedit.models.attention import attention
from diffedit.models.config import TextEncoderConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.activation = quick_gelu if activation == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.self_attn = SelfAttention(c.width, c.heads)
        self.layer_norm2 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.mlp = MLP(c.width, c.mlp_width, c.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def embedding(count: int, width: int) -> nn.Embedding:
    """`nn.Embedding(count, width)` with the same N(0, 1) init, skipped where the model is built on
    the meta device to be loaded: there torch's `normal_` imports torch._dynamo, 1.3-2 s of every load."""
    weight = torch.empty(count, width)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding.from_pretrained(weight, freeze=False)


class Embeddings(nn.Module):
    def __init__(self, c: TextEncoderConfig):
        super().__init__()
        self.token_embedding = embedding(c.vocab_size, c.width)
        self.position_embedding = embedding(c.max_length, c.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class TextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) -> the hidden states SD conditions on (B, L, D)."""
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)
