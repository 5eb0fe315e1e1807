"""The torch side of the DiT family (arch/dit.py): the module that calls diffusers'
`DiTTransformer2DModel` as the generation task does. Kept apart so that importing the family (the
registry, `weit inspect`, `weit list-archs`) does not import torch."""

from __future__ import annotations

from torch import Tensor, nn


def no_label_dropout(model: nn.Module) -> nn.Module:
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    return model


class DiTDenoiser(nn.Module):
    """(x_t, t, y) → ε for a diffusers `DiTTransformer2DModel` (`DiTAdapter.apply`).

    Turns diffusers' own label dropout off (`LabelEmbedding.dropout_prob = 0`, an attribute, not a
    weight or a config entry). In train mode diffusers drops labels with the global, unseeded RNG,
    and independently in every block's embedder and again in the output layer's (block 0's), so one
    image would be conditioned on its class in some blocks and on 'no class' in others. The
    generation task drops labels itself, once per image, from its generator
    (tasks/diffusion.noised). The null row of the table stays: `null_class` still selects it. With
    `out_channels` = 2·in (a learned variance) weit trains the ε half only; the other half then
    gets no gradient."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = no_label_dropout(model)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return eps(self.model, x, t, y)


def eps(call, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    out = call(x, timestep=t, class_labels=y).sample
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out
