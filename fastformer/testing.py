"""Numerical checks shared by the tests and the GPU check.

The rule is flash-attn's: an output of ours may be at most twice as far from a float64 reference as
PyTorch computing the same thing in the same low dtype, plus a small absolute floor.
"""

from __future__ import annotations

import torch

# absolute floor added to the 2x rule, per dtype
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close_2x(
    name: str, ours: torch.Tensor, ref64: torch.Tensor, pt: torch.Tensor, atol: float | None = None
) -> None:
    """|ours - ref64|.max <= 2 * |pt - ref64|.max + atol, with NaN positions required to agree.

    ours: result under test; ref64: float64 reference; pt: torch in the same dtype as ``ours``.
    """
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    nan_ours, nan_ref = torch.isnan(ours), torch.isnan(ref64)
    assert torch.equal(nan_ours.cpu(), nan_ref.cpu()), f"{name}: NaN pattern differs from the reference"
    keep = ~nan_ref
    ours, ref64, pt = ours[keep], ref64[keep], pt[keep]
    tol = ATOL.get(ours.dtype, 1e-5) if atol is None else atol
    err, err_pt = max_err(ours, ref64), max_err(pt, ref64)
    assert err <= 2 * err_pt + tol, f"{name}: max error {err:.3e} > 2 * torch's {err_pt:.3e} + {tol:.1e}"
