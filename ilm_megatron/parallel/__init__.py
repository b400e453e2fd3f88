"""Model parallelism: tensor-parallel layers, process-group helpers and resharding checkpoints.

See ``docs/parallelism.md`` for the layout. Importing this package does not initialise anything.
"""
