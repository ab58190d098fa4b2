"""The teacher wing: saliency maps from a frozen classifier, added to a store (``satdata saliency``).

- ``methods.py``: the algorithms (Grad-CAM, Grad-CAM++, guided backprop, SmoothGrad, ...)
  and their registry ``ALGORITHMS`` (named as ``--method`` names them);
- ``teacher.py``: loading the teacher (a sattrain run or checkpoint, or torchvision
  weights);
- ``generate.py``: ``generate_maps(SaliencyConfig)``: the teacher check, batching, noise
  seeds, quantisation (``satdata.store.encode_map``) and the atomic write (``addmap``);
- ``dask.py``: ``--dask``, the same batches on Dask workers.

This package is the only part of satdata that imports sattrain (the teacher's checkpoint
and device). ``import satdata.saliency`` imports nothing else (no torch): import the
module you need, e.g. ``from satdata.saliency.generate import SaliencyConfig, generate_maps``.
"""
