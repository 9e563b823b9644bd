"""Launchers, input checks and custom ops (``torch.ops.fastformer.*``), one module per op."""
