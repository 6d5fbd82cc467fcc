"""Offline tooling: data, objectives, ZO and BP calibration, bank building, evaluation, the training recipe."""
