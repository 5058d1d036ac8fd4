"""Running one model over several engines: data parallel replicas in one node (data.py); MPI ranks
across nodes (mpi.py); the expert and attention tensor parallel split checked on the reference (tensor.py)."""
