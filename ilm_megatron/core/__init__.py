"""The leaf of the package: process-group state and the tensor-parallel layers and ops.

:mod:`ilm_megatron.core.parallel_state` (Megatron-Core's groups, spawning gloo workers) and
:mod:`ilm_megatron.core.tensor_parallel` (column/row-parallel linears, the vocab-parallel
embedding, logits and loss, sharding layouts). Both the models and :mod:`ilm_megatron.parallel`
(pipeline, checkpoints, comparisons) import them; they import neither.
"""
