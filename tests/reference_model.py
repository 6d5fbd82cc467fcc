"""A plain, literal Mamba1/Mamba2 language model for tests: one token at a time, float64, straight from the
weights, applying scale sets as their definition reads (Δ' = s·Δ; A' = s·A).

Independent of `runtime.model` (it shares no code with it), so agreement means both are right.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F


def _mixer_weight(W, layer, name):
    return W[f"layers.{layer}.mixer.{name}"]


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _decimate(residual, deltas, decimation):
    """DeciMamba's rule, literally: keep the last R positions and, of the ones before, the K whose Δ has the
    largest norm, K = max(min(L - R, L_base), min_len) capped at L - R; original order."""
    L = len(residual)
    R = min(decimation.keep_last, L)
    K = min(L - R, max(min(L - R, decimation.l_base), decimation.min_len))
    norms = [float(torch.linalg.norm(delta)) for delta in deltas[:L - R]]
    top = sorted(range(L - R), key=lambda t: -norms[t])[:K]
    return residual[sorted(top) + list(range(L - R, L))]


def reference_logits(config, weights: dict[str, torch.Tensor], tokens: list[int],
                     delta_scales=None, a_scales=None, decimation=None) -> torch.Tensor:
    """Logits (l, V) for one sequence. delta_scales / a_scales: per layer a tensor broadcastable to
    (d_inner,) / (d_inner, d_state) for Mamba1 and (nheads,) for Mamba2, or None. `decimation` (read for its
    layer, l_base, min_len and keep_last only) drops positions after that layer: logits (k, V) of the kept."""
    W = {k: v.double() for k, v in weights.items()}
    c = config
    eps = c.norm_eps
    L = len(tokens)
    residual = W["embedding.weight"][tokens]  # (l, D)
    for i in range(c.n_layer):
        p = partial(_mixer_weight, W, i)
        u = _rms(residual, W[f"layers.{i}.norm.weight"], eps)
        proj = u @ p("in_proj.weight").T
        conv_w = p("conv1d.weight")[:, 0]  # (c, k)
        k = conv_w.shape[-1]
        s_delta = None if delta_scales is None else delta_scales[i].double()
        s_a = None if a_scales is None else a_scales[i].double()
        if c.arch == "mamba1":
            d, n, r = c.d_inner, c.d_state, c.dt_rank
            x, z = proj[:, :d], proj[:, d:]
            xp = torch.cat([torch.zeros(k - 1, d, dtype=x.dtype), x])
            x = torch.stack([(xp[t:t + k].T * conv_w).sum(-1) + p("conv1d.bias") for t in range(L)])
            x = F.silu(x)
            A = -torch.exp(p("A_log"))  # (d, n)
            if s_a is not None:
                A = (s_a[:, None] if s_a.dim() == 1 else s_a) * A  # per channel, or per channel and state
            h = torch.zeros(d, n, dtype=x.dtype)
            ys, deltas = [], []
            for t in range(L):
                dbl = p("x_proj.weight") @ x[t]
                dt, B, C = dbl[:r], dbl[r:r + n], dbl[r + n:]
                delta = F.softplus(p("dt_proj.weight") @ dt + p("dt_proj.bias"))  # (d,)
                if s_delta is not None:
                    delta = s_delta * delta
                deltas.append(delta)
                h = torch.exp(delta[:, None] * A) * h + delta[:, None] * B[None, :] * x[t][:, None]
                ys.append((h @ C + p("D") * x[t]) * F.silu(z[t]))
            y = torch.stack(ys)
        else:
            d, n, g, H, P = c.d_inner, c.d_state, c.ngroups, c.nheads, c.headdim
            z, xBC, dt = proj[:, :d], proj[:, d:d + c.conv_dim], proj[:, d + c.conv_dim:]
            xp = torch.cat([torch.zeros(k - 1, c.conv_dim, dtype=xBC.dtype), xBC])
            xBC = F.silu(torch.stack([(xp[t:t + k].T * conv_w).sum(-1) + p("conv1d.bias") for t in range(L)]))
            A = -torch.exp(p("A_log"))  # (H,)
            if s_a is not None:
                A = s_a * A
            h = torch.zeros(H, P, n, dtype=xBC.dtype)
            ys, deltas = [], []
            for t in range(L):
                x = xBC[t, :d].reshape(H, P)
                B = xBC[t, d:d + g * n].reshape(g, n).repeat_interleave(H // g, 0)  # (H, n)
                C = xBC[t, d + g * n:].reshape(g, n).repeat_interleave(H // g, 0)
                delta = F.softplus(dt[t] + p("dt_bias")).clamp(*c.dt_limit)  # (H,)
                if s_delta is not None:
                    delta = s_delta * delta
                deltas.append(delta)
                h = torch.exp(delta * A)[:, None, None] * h + (delta[:, None] * x)[..., None] * B[:, None, :]
                yt = (h @ C[..., None]).squeeze(-1) + p("D")[:, None] * x  # (H, P)
                yt = yt.reshape(d) * F.silu(z[t])
                yt = yt.reshape(g, d // g)
                yt = yt * torch.rsqrt(yt.pow(2).mean(-1, keepdim=True) + eps)
                ys.append(yt.reshape(d) * p("norm.weight"))
            y = torch.stack(ys)
        residual = residual + y @ p("out_proj.weight").T
        if decimation is not None and i == decimation.layer:
            residual = _decimate(residual, deltas, decimation)
            L = len(residual)
    hidden = _rms(residual, W["norm_f.weight"], eps)
    head = W.get("lm_head.weight", W["embedding.weight"])
    return hidden @ head.T  # float64, differentiable in the scales
