"""The fedlora ServerApp package (Flower glue + the round loop)."""
