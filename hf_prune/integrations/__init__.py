"""Where hf_prune meets the rest of the ecosystem.

* `transformers`: ``model.prune``, the ``save_pretrained`` wrapper, and installing the load hook of structurally
  pruned checkpoints (`hf_prune.structure.loading`); the compressed-checkpoint quantizer registers itself through
  transformers' quantizer registry in `hf_prune.formats`.
* `hub`: uploads of finished checkpoint folders.
"""
