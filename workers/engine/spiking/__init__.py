"""Spiking networks: LIF layers on the fused kernel, a converter for ReLU classifiers, a small
SpikeGPT-style language model with its RWKV twin, and the operation / energy accounting."""
