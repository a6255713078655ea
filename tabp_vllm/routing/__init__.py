"""Input-guided block pruning (IG-Pruning): masks learned per input cluster, and the router file.

    encoder.py      the sentence encoder (all-MiniLM-L6-v2, or the model itself), fetched and cached
    hardconcrete.py Hard-Concrete gates, expected L0, the Lagrangian, the deterministic top-k mask
    fit.py          embed, k-means, one mask per cluster (L0 gates or a registered scorer), merging
    router.py       the router file (versioned JSON, validated, written atomically) and routing
    options.py      `RouteFitOptions`: every hyperparameter's one default
    commands.py     `tabp-vllm route fit`

Nothing here imports the server; the server (later) imports `router.py`.
"""
