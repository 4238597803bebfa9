"""PyTorch reference definitions of every module that `residual` ports to Rust.

These are the ground truth of the parity tests: `export.py` runs them and writes what they compute.

* `ConvSDSLayer` / `ConvSDSHead`: the Samsung SDS question-answering head shown in the seed document.
* `SiD*`: the SiD tabular model of affjljoo3581/Job-Recommend-Competition (`src/modeling.py`, commit
  bb41cdd), restated here attribute for attribute so that its state_dict keys, initialisation and
  computation are the original's.

Departures from the originals are only those TorchScript or the seed's bug force; each is marked
"CHANGED".
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------------
# ConvSDS (the seed document)
# --------------------------------------------------------------------------------------------------


class ConvSDSLayer(nn.Module):
    """Conv1d over the sequence axis (tokens as channels), k=3 then k=1, `x + relu(.)`, LayerNorm."""

    def __init__(self, input_size: int, hidden_dim: int):
        super().__init__()
        self.conv1 = nn.Conv1d(
            in_channels=input_size, out_channels=input_size * 2, kernel_size=3, padding=1
        )
        self.conv2 = nn.Conv1d(in_channels=input_size * 2, out_channels=input_size, kernel_size=1)
        self.layer_norm = nn.LayerNorm(hidden_dim)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.conv2(out)
        out = x + self.activation(out)
        out = self.layer_norm(out)
        return out


class ConvSDSHead(nn.Module):
    """[B, L, H] -> [B, L, num_labels] (start and end logits for num_labels == 2)."""

    def __init__(
        self, n_layers: int = 5, input_size: int = 512, hidden_size: int = 768, num_labels: int = 2
    ):
        super().__init__()
        self.n_layers = n_layers
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.classifier = nn.Linear(self.hidden_size, num_labels)
        # CHANGED: the seed builds `self.convs` inside forward(), so every call draws fresh random
        # conv weights that are never trained and never moved to the model's device (and the module
        # cannot be scripted). They are built once here, under the same attribute name, so the
        # state_dict keys (`convs.{i}.conv1.weight`, ...) are the ones the seed's model has after
        # its first forward.
        self.convs = nn.Sequential(
            *[ConvSDSLayer(self.input_size, self.hidden_size) for _ in range(self.n_layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        return self.classifier(out)


def qa_span_loss(
    logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
) -> torch.Tensor:
    """The span loss of extractive question-answering heads (as HF's `*ForQuestionAnswering`):
    positions are clamped to [0, L] and position L (beyond the sequence) is ignored."""
    start_logits, end_logits = logits.split(1, dim=-1)
    start_logits = start_logits.squeeze(-1)
    end_logits = end_logits.squeeze(-1)
    ignored_index = start_logits.size(1)
    start_positions = start_positions.clamp(0, ignored_index)
    end_positions = end_positions.clamp(0, ignored_index)
    start_loss = F.cross_entropy(start_logits, start_positions, ignore_index=ignored_index)
    end_loss = F.cross_entropy(end_logits, end_positions, ignore_index=ignored_index)
    return (start_loss + end_loss) / 2


# --------------------------------------------------------------------------------------------------
# SiD (Job-Recommend-Competition, src/modeling.py @ bb41cdd)
# --------------------------------------------------------------------------------------------------


@dataclass
class SiDConfig:
    num_categories_list: List[int]
    num_numerical_features: int
    num_text_features: int
    text_input_size: int
    embedding_size: int = 64
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 18
    num_transform_blocks: int = 1
    num_attention_blocks: int = 1
    hidden_dropout_prob: float = 0.5
    attention_dropout_prob: float = 0.5
    drop_path_prob: float = 0.5
    embed_init_std: float = 0.02
    num_labels: Optional[int] = None

    @property
    def num_total_categories(self) -> int:
        return sum(self.num_categories_list)

    @property
    def num_categorical_features(self) -> int:
        return len(self.num_categories_list)

    @property
    def num_total_features(self) -> int:
        return self.num_categorical_features + self.num_numerical_features + self.num_text_features

    @property
    def total_embedding_size(self) -> int:
        return self.num_total_features * self.embedding_size


class StochasticDepth(nn.Module):
    """Drops whole rows in training. As in the original, kept rows are divided by `p` (not `1 - p`)."""

    def __init__(self, drop_path_prob: float = 0.1):
        super().__init__()
        self.drop_path_prob = drop_path_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_path_prob == 0 or not self.training:
            return hidden_states
        mask = torch.rand((hidden_states.size(0), 1), device=hidden_states.device)
        mask = (mask > self.drop_path_prob).type_as(hidden_states) / self.drop_path_prob
        return mask * hidden_states


class SiDEmbeddings(nn.Module):
    """categorical [B, C] int64, numerical [B, N], text [B, T, D] -> embeddings [B, C + N + T, E]."""

    def __init__(self, config: SiDConfig):
        super().__init__()
        self.categorical_embeddings = nn.Embedding(config.num_total_categories, config.embedding_size)
        self.numerical_direction = nn.Parameter(
            torch.rand(config.num_numerical_features, config.embedding_size)
        )
        self.numerical_anchor = nn.Parameter(
            torch.rand(config.num_numerical_features, config.embedding_size)
        )
        self.text_projections = nn.ModuleList(
            nn.Linear(config.text_input_size, config.embedding_size, bias=False)
            for _ in range(config.num_text_features)
        )
        self.register_buffer(
            "categorical_embedding_offsets",
            torch.tensor([[0] + config.num_categories_list[:-1]]).cumsum(1),
        )

    def forward(
        self,
        categorical_inputs: torch.Tensor,
        numerical_inputs: torch.Tensor,
        text_inputs: torch.Tensor,
    ) -> torch.Tensor:
        categorical_inputs = categorical_inputs + self.categorical_embedding_offsets
        categorical_embeddings = self.categorical_embeddings(categorical_inputs)

        numerical_embeddings = numerical_inputs[:, :, None] * self.numerical_direction
        numerical_embeddings = numerical_embeddings + self.numerical_anchor

        stacked_weight = torch.stack([layer.weight.transpose(0, 1) for layer in self.text_projections])
        text_embeddings = torch.einsum("btm,tmn->btn", text_inputs, stacked_weight)

        return torch.cat((categorical_embeddings, numerical_embeddings, text_embeddings), dim=1)


class SiDResidualBlock(nn.Module):
    """Gated MLP with a residual connection: h + dropout(a * sigmoid(g)), [a, g] = FF(h)."""

    def __init__(self, config: SiDConfig):
        super().__init__()
        self.feedforward = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size * 2),
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.feedforward(hidden_states)
        output, gating = output.chunk(2, dim=1)
        output = output * gating.sigmoid()
        return hidden_states + self.dropout(output)


class SiDLayer(nn.Module):
    def __init__(self, config: SiDConfig, use_attention: bool = True):
        super().__init__()
        if use_attention:
            self.attention = nn.Sequential(
                *[SiDResidualBlock(config) for _ in range(config.num_attention_blocks)],
                nn.Linear(config.hidden_size, config.num_total_features),
                nn.Sigmoid(),
            )
            self.dropout = nn.Dropout(config.attention_dropout_prob)
        self.projection = nn.Linear(config.total_embedding_size, config.hidden_size)
        self.transform = nn.Sequential(
            *[SiDResidualBlock(config) for _ in range(config.num_transform_blocks)]
        )
        self.droppath = StochasticDepth(config.drop_path_prob)

    # CHANGED: the original annotates the result as `tuple[torch.Tensor, torch.Tensor]` but returns
    # one tensor; TorchScript checks the annotation, so it is corrected to `torch.Tensor`.
    def forward(
        self, input_embeddings: torch.Tensor, hidden_states: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if hasattr(self, "attention") and hidden_states is not None:
            attention_probs = self.attention(hidden_states)
            attention_probs = self.dropout(attention_probs)
            input_embeddings = input_embeddings * attention_probs[:, :, None]

        output = self.projection(input_embeddings.flatten(1))
        output = self.transform(output)

        if hidden_states is not None:
            return hidden_states + self.droppath(output)
        return output


class SiDModel(nn.Module):
    def __init__(self, config: SiDConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiDEmbeddings(config)
        self.layers = nn.ModuleList(
            SiDLayer(config, use_attention=i > 0) for i in range(config.num_hidden_layers)
        )
        self.normalization = nn.LayerNorm(config.hidden_size)
        self.init_weights()

    def init_weights(self, module: Optional[nn.Module] = None):
        if module is None:
            self.apply(self.init_weights)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.embed_init_std)
        elif isinstance(module, SiDEmbeddings):
            nn.init.normal_(module.numerical_direction, std=self.config.embed_init_std)
            nn.init.normal_(module.numerical_anchor, std=self.config.embed_init_std)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, 5**0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        categorical_inputs: torch.Tensor,
        numerical_inputs: torch.Tensor,
        text_inputs: torch.Tensor,
    ) -> torch.Tensor:
        input_embeddings = self.embeddings(categorical_inputs, numerical_inputs, text_inputs)
        hidden_states = None
        for layer in self.layers:
            hidden_states = layer(input_embeddings, hidden_states)

        hidden_states = self.normalization(hidden_states)
        return hidden_states


class SiDClassifier(nn.Module):
    def __init__(self, config: SiDConfig):
        super().__init__()
        self.model = SiDModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        categorical_inputs: torch.Tensor,
        numerical_inputs: torch.Tensor,
        text_inputs: torch.Tensor,
    ) -> torch.Tensor:
        hidden_states = self.model(categorical_inputs, numerical_inputs, text_inputs)
        return self.classifier(hidden_states)
