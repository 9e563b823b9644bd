"""Dropout decisions of the Triton kernels; the scheme is described in fastformer/ops/dropout.py."""

import triton
import triton.language as tl


@triton.jit
def dropout_keep(
    seed,  # int64 Philox key
    offsets,  # int64 flat element indices; the counter
    thresh,  # keep when the top 24 random bits are >= thresh (see threshold24)
):
    r = tl.randint(seed, offsets)
    # compare 24 bits as int32 so the test does not depend on unsigned promotion rules
    return (r >> 8).to(tl.int32) >= thresh
