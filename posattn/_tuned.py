"""Launch configurations measured fastest on a GPU, by architecture: written by
bench/tune.py (``python bench/tune.py --write``), read by posattn/_triton.py's _config.

Keys: "sm_XY" -> kind -> (BLOCK_M, BLOCK_N, num_warps, num_stages), kind being
"fwd" or "bwd", "-rel" with relative embeddings, and "/w<bytes>" the tile width
(head dim rounded up to a power of two, doubled for float32). Empty until a GPU run:
the defaults in _triton._default_config apply.
"""
TUNED: dict = {}
