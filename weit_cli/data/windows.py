"""Context windows of K steps for the control task, drawn from a dataset prepared by
data/trajectories.py.

`sample_windows` draws a batch from a seeded torch Generator, laid out as in the Decision
Transformer paper's gym code (Chen et al. 2021, `experiment.py: get_batch`): episodes drawn with
probability proportional to their length, a uniform start inside the episode, the window cut at the
episode's end and padded on the *left* (states 0, actions −10, returns-to-go 0, timesteps 0,
attention mask 0), returns-to-go divided by a scale. `window_dataset` draws a fixed set of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from weit_cli.data.trajectories import ControlSet
from weit_cli.errors import WeitError

#: Padding of the actions of a window's masked positions (DT's gym code; any value works under the mask).
ACTION_PAD = -10.0


@dataclass
class Windows:
    """A batch of K-step context windows, left-padded."""

    states: Tensor  # (B, K, obs)
    actions: Tensor  # (B, K, act)
    returns_to_go: Tensor  # (B, K, 1)
    timesteps: Tensor  # (B, K) int64
    attention_mask: Tensor  # (B, K) float, 1 on real steps

    def to(self, device: torch.device | str) -> Windows:
        return Windows(*(t.to(device) for t in self.batch()))

    def batch(self) -> tuple[Tensor, ...]:
        """The control task's batch: (states, actions, returns-to-go, timesteps, attention mask)."""
        return (self.states, self.actions, self.returns_to_go, self.timesteps, self.attention_mask)


def sample_windows(data: ControlSet, batch_size: int, context: int, generator: torch.Generator) -> Windows:
    """B windows of K steps, drawn as in the DT gym code (see the module docstring)."""
    if batch_size < 1 or context < 1:
        raise WeitError(f"batch size and context must be positive, got {batch_size} and {context}", "e.g. 64 and 20")
    lengths = data.lengths
    episode = torch.multinomial(lengths.double(), batch_size, replacement=True, generator=generator)
    length = lengths[episode]
    offset = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * length).long().clamp_max(length - 1)
    real = torch.minimum(length - offset, torch.tensor(context))  # steps of each window that exist
    pad = context - real
    j = torch.arange(context)
    valid = j[None, :] >= pad[:, None]
    index = data.bounds[episode, 0][:, None] + offset[:, None] + (j[None, :] - pad[:, None])
    index = torch.where(valid, index, torch.zeros_like(index))
    mask = valid.to(torch.float32)
    v = valid[..., None]
    return Windows(
        states=torch.where(v, data.states[index], 0.0),
        actions=torch.where(v, data.actions[index], ACTION_PAD),
        returns_to_go=torch.where(v, data.returns_to_go[index][..., None], 0.0),
        timesteps=torch.where(valid, data.timesteps[index], 0),
        attention_mask=mask,
    )

def window_dataset(data: ControlSet, n: int, context: int, generator: torch.Generator, chunk: int = 4096) -> TensorDataset:
    """`n` windows drawn with `sample_windows` in chunks (one generator: the same windows whatever
    the chunk), as a TensorDataset in the batch order of `Windows.batch`."""
    parts = [sample_windows(data, min(chunk, n - i), context, generator).batch() for i in range(0, n, chunk)]
    return TensorDataset(*(torch.cat(ts) for ts in zip(*parts)))


def empty_windows(obs_dim: int, act_dim: int, context: int) -> TensorDataset:
    k = context
    return TensorDataset(torch.zeros(0, k, obs_dim), torch.zeros(0, k, act_dim), torch.zeros(0, k, 1), torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k))
