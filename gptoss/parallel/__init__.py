"""Running one getp over several engines: data parallel replicas (data.py)."""
