"""The ops, one package per stem (``layer_norm``, ``attention``, ``ffn``), each split by job the same way:
``api`` (public functions, input checks), ``op`` (argument object, ``torch.ops.fastformer.*`` custom ops with
fakes and autograd), then one module per backend (``torch_impl``, ``triton_impl``, ``cuda_impl``).
``dropout`` is the shared Philox scheme and ``_custom`` the shared custom-op machinery."""
