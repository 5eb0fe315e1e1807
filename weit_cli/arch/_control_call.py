"""The call convention of the control task's models: that of transformers' DecisionTransformerModel,
today the one family of the control task. The family's adapter turns its module into what the task
calls, (states, actions, returns-to-go, timesteps, attention mask) → predicted actions (B, K, act):
`DecisionTransformerAdapter.apply` for composed weights and `task_forward` (`ControlForward`) for a
module, so that tasks/control.py and tasks/rollout.py know no library's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from torch import nn

from weit_cli.errors import WeitError

if TYPE_CHECKING:
    from torch import Tensor

#: A model that returns a mapping (transformers' ModelOutput is one) gives its actions under this key.
ACTIONS_KEY = "action_preds"


def model_inputs(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A control model's positional inputs for a batch: (states, actions, rewards, returns_to_go,
    timesteps, attention_mask), the order of transformers' `DecisionTransformerModel.forward`.

    The model reads no rewards (that forward takes and ignores them); zeros keep every input a
    tensor, so that a wrapper which moves or casts its inputs (a composed forward, DDP) sees only
    tensors."""
    import torch

    states, actions, rtg, timesteps, mask = batch
    return states, actions, torch.zeros_like(rtg), rtg, timesteps, mask


def action_output(out) -> Tensor:
    """The predicted actions (B, K, act) in what a control model returned.

    A tensor is the actions themselves (a forward that already reduces its output); a mapping —
    transformers' ModelOutput is an OrderedDict — holds them under `ACTIONS_KEY`. Anything else,
    e.g. the tuple of a `return_dict=False` call, whose order is the model's own, is refused."""
    from torch import Tensor

    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get(ACTIONS_KEY), Tensor):
        return out[ACTIONS_KEY]
    what = f"a mapping with keys {', '.join(map(str, out))}" if isinstance(out, Mapping) else f"a {type(out).__name__}"
    raise WeitError(
        f"the model returned {what}, not predicted actions",
        f"a control model returns the actions as a tensor, or a mapping with '{ACTIONS_KEY}' (transformers' ModelOutput)",
    )


class ControlForward(nn.Module):
    """A control model (a module, or any callable with its signature) as the control task calls it:
    the window's five tensors in, the predicted actions out (`model_inputs`, `action_output`). A
    module is a submodule, so modes, devices, parameters and DDP see through the wrapper."""

    def __init__(self, model: Callable):
        super().__init__()
        self.model = model

    def forward(self, states: Tensor, actions: Tensor, returns_to_go: Tensor, timesteps: Tensor, attention_mask: Tensor) -> Tensor:
        return action_output(self.model(*model_inputs((states, actions, returns_to_go, timesteps, attention_mask))))
