"""Running one model over several engines: data parallel replicas (data.py); the expert and attention
tensor parallel split checked on the reference (tensor.py)."""
