"""Batched ensemble layers: E independent MLPs evaluated as one batched matmul.

The dynamics ensemble, the GradientDICE heads and SAC's twin critics are all ensembles of
small MLPs. Storing member weights as one `[E, in, out]` tensor turns E matmuls into one
`baddbmm`, which is what makes ensembles cheap (as in CORL's sac_n.py).
"""

import math

import torch
import torch.nn as nn


class EnsembleLinear(nn.Module):
    """E linear layers. Input `[E, B, in]`, output `[E, B, out]`."""

    def __init__(self, num_members: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_members, 1, out_features))
        # The same init nn.Linear gives each member separately.
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """`members` (index tensor of length E') runs only those members on an `[E', B, in]` input."""
        weight, bias = self.weight, self.bias
        if members is not None:
            weight, bias = weight[members], bias[members]
        return torch.baddbmm(bias, x, weight)


class EnsembleMLP(nn.Module):
    """E MLPs with the same shape: Linear -> activation, repeated, then a linear output."""

    def __init__(
        self,
        num_members: int,
        in_features: int,
        out_features: int,
        hidden: list[int],
        activation: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        sizes = [in_features, *hidden]
        self.hidden = nn.ModuleList(EnsembleLinear(num_members, i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        self.output = EnsembleLinear(num_members, sizes[-1], out_features)
        self.activation = activation()

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.hidden:
            x = self.activation(layer(x, members))
        return self.output(x, members)
