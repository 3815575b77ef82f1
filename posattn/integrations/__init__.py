"""Integrations of posattn with other libraries (optional dependencies, imported on demand).

- :mod:`posattn.integrations.hf`: Hugging Face transformers' ``AttentionInterface``
  (``pip install posattn[hf]``).
"""
