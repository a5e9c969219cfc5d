"""The mini-world: tiny trained models that make ICD's effect measurable offline.

The three models of :mod:`icd.models.fixtures` (an Idefics3/SmolVLM student, a LLaVA
teacher with a Qwen2 language model, a CLIP embedder) trained on the coloured-shapes world
of :mod:`icd.data.shapes`, split the way ICD's setting is:

- the **embedder** knows every class: images of one class embed together and next to the
  class name's text embedding;
- the **teacher** names every class (greedy and sampled);
- the **student** names only the **base** classes; on **novel** ones it answers a base
  class name, wrongly and with high uncertainty — and it has learned to read a class name
  off an in-context demonstration whose image matches the query.

:mod:`icd.miniworld.train` holds the recipes (``icd fixtures train``),
:mod:`icd.miniworld.evaluate` measures the targets through the project's own backends
(``icd fixtures eval``). The trained weights ship in ``weights/``.
"""
