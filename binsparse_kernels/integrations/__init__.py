"""Bridges to the SAE libraries people already train and evaluate with.

Each submodule imports its library, so import only the one you use:

* ``binsparse_kernels.integrations.sparsify``: EleutherAI's sparsify (PyPI ``eai-sparsify``): drop-in
  ``fused_encoder`` / ``decoder_impl``, ``patch_sparsify()``, a binary coder for sparsify, converters.
* ``binsparse_kernels.integrations.saelens``: SAELens (PyPI ``sae-lens``): TopK SAE classes on the ops,
  ``patch_saelens()``, a disk loader (converter) for our checkpoints, a registered ``"binsparse"`` class.
* ``binsparse_kernels.integrations.saebench``: a wrapper with SAEBench's custom-SAE interface (no import
  of SAEBench needed).

See docs/INTEGRATIONS.md for what each bridge does and where a library's API makes it awkward.
"""
