"""Mixed-precision post-training quantization: formats, simulated quantization, sensitivity,
search and the Pareto frontier. Backends that realize a config on real kernels live in
``workers.engine.backends``."""
