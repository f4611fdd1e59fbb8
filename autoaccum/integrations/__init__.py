"""Adapters from training frameworks to ``AutoAccumOptimizer.step(loss_fn, batch)``.

One module per framework, each importing its framework only when it is itself imported, so
``import autoaccum`` never pulls in transformers or lightning:

* :mod:`autoaccum.integrations.transformers`: ``AutoAccumTrainer``, a Hugging Face ``Trainer``
  (``pip install "autoaccum[hf]"``);
* :mod:`autoaccum.integrations.lightning`: autoaccum inside a ``LightningModule``
  (``pip install "autoaccum[lightning]"``);
* :mod:`autoaccum.integrations.accelerate`: helpers for a loop prepared by 🤗 Accelerate
  (``pip install "autoaccum[accelerate]"``).

The adapters hold no accumulation logic of their own: planning, OOM recovery, exactness and the
distributed agreement are the optimizer's.
"""
