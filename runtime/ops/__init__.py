"""Scan and convolution operators, one module per back-end, each with a sequential reference twin.

Conventions shared by every back-end (so the mixers need not know which one runs):
- Δ arrives already discretised and scaled (softplus, clamp, per-sequence scale), float32;
- A arrives as a negative float32 tensor, shared `(d, n)` / `(h,)` or per sequence `(b, d, n)` / `(b, h)`
  (A-spectrum scales make it per sequence);
- states are float32; prefill returns a new state, decode updates the state in place.
"""
