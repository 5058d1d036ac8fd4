"""gptoss: gpt-oss-20b / gpt-oss-120b from scratch. The NumPy reference (reference.py) is the oracle;
the GPU engine (model.py, engine.py) runs our own kernels (kernels/*.hip) through CuPy."""
