"""KernelWarehouse's attention: how each kernel cell of a layer weighs the cells of its warehouse, per example.

Li and Yao, "KernelWarehouse: Rethinking the Design of Dynamic Convolution", ICML 2024, arXiv:2406.07879.

For a layer whose kernel is split into ``M`` cells ("mixtures") and a warehouse of ``C`` cells, the attention is
``GAP(x) -> Linear -> norm -> ReLU -> Linear`` giving ``M x (C + 1)`` logits per example (the extra entry is the
"zero" cell, which holds no weights), each row divided by its L1 norm (``+ 1e-3``; signed, not a softmax). The
temperature ``t`` (a buffer, annealed 1 -> 0 at the start of training) blends in a fixed one-hot attention:
``(1 - t) * a + t * onehot``; ``onehot`` assigns each of the layer's cells its own warehouse cell (or the zero cell,
when the warehouse has fewer cells than the layers need), as the official code's temperature initialisation does.

With ``nonlocal_basis_ratio < 1`` the logits of the warehouse cells owned by other layers ("non-local") are produced
through a smaller basis: ``Linear(num_basis -> C - L)`` of ``num_basis = max(int((C - L) * ratio), 16)`` logits,
plus a learned bias over all ``M x (C + 1)`` entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condconv.utils.checks import positive_int

__all__ = ["KWAttention", "NORMS", "one_hot_assignment"]

#: The attention trunk's normalisation: 'batch' (the official BatchNorm1d, the Linear before it has no bias),
#: 'layer' (LayerNorm) or 'none'; the last two work at batch size 1 in training.
NORMS = ("batch", "layer", "none")


def one_hot_assignment(num_mixtures: int, start: int, cell_num_ratio: float) -> tuple[list[int], int]:
    """The warehouse cell each of a layer's ``num_mixtures`` kernel cells is tied to at temperature 1.

    With ``cell_num_ratio >= 1`` (whole number) kernel cell ``m`` takes warehouse cell ``start + m * ratio``; with a
    ratio ``1 / n`` below 1, kernel cell ``m`` takes the next unused warehouse cell when ``m % n == (m // n) % n``,
    the zero cell (index ``-1``) otherwise.

    Returns:
        ``(assigned, end)``: the assigned warehouse cell per kernel cell (``-1``: the zero cell) and the index after
        the layer's last own cell.
    """
    assigned = []
    if cell_num_ratio >= 1.0:
        step = int(cell_num_ratio)
        for m in range(num_mixtures):
            assigned.append(start + m * step)
        return assigned, start + num_mixtures * step
    n = int(1.0 / cell_num_ratio)
    for m in range(num_mixtures):
        if m % n == (m // n) % n:
            assigned.append(start)
            start += 1
        else:
            assigned.append(-1)
    return assigned, start


class KWAttention(nn.Module):
    """Attention of one KernelWarehouse layer: ``(B, C_in, *spatial)`` -> ``(B, num_mixtures, num_cells)``.

    Args:
        in_channels: channels of the layer's input (pooled over every spatial axis).
        num_cells: cells in the layer's warehouse (``C``).
        num_mixtures: kernel cells of the layer (``M``).
        start: index of the layer's first own cell in the warehouse.
        cell_num_ratio: the warehouse's cell_num_ratio (fixes the one-hot assignment and the local cells).
        reduction: hidden width ``max(int(in_channels * reduction), 16)``. Default 0.0625.
        norm: one of :data:`NORMS`. Default ``'batch'``.
        nonlocal_basis_ratio: below 1, non-local cells get their logits through a basis (module docstring).
            Default 1.0.
        temperature: initial temperature in [0, 1] (a buffer). Default 0.0 (the end of the official annealing).
    """

    #: values :func:`condconv.set_temperature` may give this module's ``temperature`` buffer
    temperature_bounds = (0.0, 1.0)

    def __init__(self, in_channels: int, num_cells: int, num_mixtures: int, start: int, cell_num_ratio: float, *,
                 reduction: float = 0.0625, norm: str = "batch", nonlocal_basis_ratio: float = 1.0,
                 temperature: float = 0.0) -> None:
        super().__init__()
        positive_int(in_channels, "in_channels")
        positive_int(num_cells, "num_cells")
        positive_int(num_mixtures, "num_mixtures")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        hidden = max(int(in_channels * reduction), 16)
        self.num_cells, self.num_mixtures, self.start = num_cells, num_mixtures, start
        self.cell_num_ratio = float(cell_num_ratio)
        self.num_local = int(cell_num_ratio * num_mixtures)
        self.fc1 = nn.Linear(in_channels, hidden, bias=norm != "batch")
        self.norm = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}.get(norm, lambda _: nn.Identity())(hidden)
        self.num_basis = 0
        if nonlocal_basis_ratio >= 1.0:
            self.fc2 = nn.Linear(hidden, num_mixtures * (num_cells + 1))
            self.fc3 = None
            self.basis_bias = None
        else:
            num_nonlocal = num_cells - self.num_local
            self.num_basis = max(int(num_nonlocal * nonlocal_basis_ratio), 16)
            self.fc2 = nn.Linear(hidden, num_mixtures * (self.num_local + self.num_basis + 1), bias=False)
            self.fc3 = nn.Linear(self.num_basis, num_nonlocal, bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(num_mixtures * (num_cells + 1)))
        assigned, self.end = one_hot_assignment(num_mixtures, start, cell_num_ratio)
        one_hot = torch.zeros(num_mixtures, num_cells + 1)
        one_hot[torch.arange(num_mixtures), torch.tensor(assigned, dtype=torch.long)] = 1.0
        self.register_buffer("one_hot", one_hot, persistent=False)
        if not 0.0 <= float(temperature) <= 1.0:
            raise ValueError(f"temperature must be a number in [0, 1], got {temperature!r}")
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: He normal (fan-out) Linear weights, zero biases, unit norm scales."""
        for layer in (self.fc1, self.fc2, self.fc3):
            if layer is not None:
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        if isinstance(self.norm, (nn.BatchNorm1d, nn.LayerNorm)):
            nn.init.ones_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)
        if self.basis_bias is not None:
            nn.init.zeros_(self.basis_bias)

    def _to_cells(self, logits: Tensor) -> Tensor:
        """Basis logits ``(N, L + num_basis + 1)`` -> cell logits ``(N, C + 1)`` (local cells at their place)."""
        local = logits[:, :self.num_local]
        nonlocal_ = self.fc3(logits[:, self.num_local:-1])
        start = self.start
        return torch.cat([nonlocal_[:, :start], local, nonlocal_[:, start:], logits[:, -1:]], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C_in, *spatial)`` -> attention ``(B, num_mixtures, num_cells)`` (the zero cell dropped)."""
        batch = x.shape[0]
        pooled = x.flatten(2).mean(-1) if x.dim() > 2 else x
        hidden = F.relu(self.norm(self.fc1(pooled)))
        logits = self.fc2(hidden)
        if self.fc3 is not None:
            logits = self._to_cells(logits.reshape(batch * self.num_mixtures, -1)).reshape(batch, -1)
            logits = logits + self.basis_bias
        att = logits.reshape(batch, self.num_mixtures, self.num_cells + 1)
        att = att / (att.abs().sum(-1, keepdim=True) + 1e-3)
        t = self.temperature.to(att.dtype)
        att = (1.0 - t) * att + t * self.one_hot.to(att.dtype)
        return att[..., :-1]

    def extra_repr(self) -> str:
        basis = f", num_basis={self.num_basis}" if self.fc3 is not None else ""
        return f"cells={self.start}:{self.end} of {self.num_cells}, mixtures={self.num_mixtures}{basis}"
