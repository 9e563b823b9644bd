"""Triton kernels of fastformer (installed as ``fastformer.kernels``); launchers live in ``fastformer/ops/<op>/``.

One file per op stem (``attention``, ``ffn``, ``layer_norm``) plus ``dropout`` (the shared Philox decision).
Naming, the same in every kernel: a launched kernel is ``<what>_kernel``; pointer arguments are in capitals
(``X``, ``W``, ``Q``, ``Lse``); runtime scalars are in lower case (``m``, ``n``, ``stride_xm``, ``seed``);
constexprs are in capitals and annotated ``tl.constexpr``.
"""
