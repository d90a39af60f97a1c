"""Interfaces to simulation packages.

* :mod:`e2former_jax.interop.predictor`: :class:`Predictor` (network, weights, reference energies),
  what the interfaces below consume.
* :mod:`e2former_jax.interop.jax_md`: energy function and neighbour list in JAX MD's conventions
  (needs the ``md`` extra, ``jax-md``).
* :mod:`e2former_jax.interop.ase`: an ASE calculator.

The submodules are not imported here, so that importing one does not pull in the other package.
Checkpoints are read by ``train.checkpoint.load_predictor`` (the checkpoint format belongs to ``train/``).
"""
