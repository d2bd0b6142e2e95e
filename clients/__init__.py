"""The fedlora ClientApp package (Flower glue + one client round)."""
