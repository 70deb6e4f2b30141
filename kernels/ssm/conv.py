"""PyTorch path of bidirectional Mamba's two depthwise convolutions + SiLU (Vim), in the original order.

Route 0 is Mamba's causal depthwise conv1d; route 1 is the backward direction's causal conv over the
reversed sequence, written in the original token order, where it is anti-causal:

    y_0[t] = silu(b_0 + sum_k w_0[k] x[t - (K-1) + k])        (zero padded on the left)
    y_1[t] = silu(b_1 + sum_k w_1[k] x[t + (K-1) - k])        (zero padded on the right)

so that y_1 = flip(silu(causal_conv(flip(x)))) with no flipped copies. Token-major throughout: each
tap is one multiply-add of a shifted slice of the zero-padded input (no (b, d, l) copies). With a
per-route projection weight P (2, N, d) (Vim's x_proj), also proj_r[t] = P_r y_r[t], one batched
matmul over the routes.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor


def torch_bidirectional_conv1d_silu(x, weight, bias: Optional[Tensor] = None, proj_weight: Optional[Tensor] = None
                                    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Inputs validated by ``bidirectional_conv1d_silu``: x (b, l, d), weight (2, d, K), bias (2, d),
    proj_weight (2, N, d).

    Returns (b, l, 2, d) in x's dtype, computed in x's dtype (as ``nn.Conv1d`` would), and with
    proj_weight also the (b, l, 2, N) projection, contiguous."""
    K, L = weight.shape[-1], x.shape[1]
    xp = F.pad(x, (0, 0, K - 1, K - 1))                # x[t] at row t + K - 1
    w = weight.to(x.dtype)
    routes = []
    for r in range(2):
        # tap k reads x[t - (K-1) + k] (route 0) or x[t + (K-1) - k] (route 1): padded row t + first[k]
        first = [k if r == 0 else 2 * (K - 1) - k for k in range(K)]
        y = xp[:, first[0]:first[0] + L] * w[r, :, 0]
        if bias is not None:
            y = y + bias[r].to(x.dtype)
        for k in range(1, K):
            y = y.addcmul_(xp[:, first[k]:first[k] + L], w[r, :, k])
        routes.append(y)
    y = F.silu(torch.stack(routes, dim=2))
    if proj_weight is None:
        return y
    # one einsum (a batched matmul over the routes); a bmm on flattened routes followed by unflatten + permute
    # is mistranslated by the ONNX exporter (torch 2.14 / onnxscript 0.7: wrong values, no error)
    return y, torch.einsum("blrd,rnd->blrn", y, proj_weight.to(x.dtype)).contiguous()
