"""Scan, convolution and decode-step operators: one module per back-end, every one behind the operator contract
(`contract.Ops`), with a sequential reference twin (`reference`) that tests hold the others to. Where each
back-end's operators live: docs/ARCHITECTURE.md."""
