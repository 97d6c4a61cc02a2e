"""One module per `qkv` verb (see qkv/cli.py)."""
