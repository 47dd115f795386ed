"""The Ray-free training core (data, backbones, objectives, strategies, engine) and the thin Ray adapters.

Only modules named ``trainables/tune_*.py`` may import Ray or MLflow; everything else is pure
PyTorch / MONAI / peft so it runs in tests, benchmarks and on a GPU machine without a cluster.
"""
