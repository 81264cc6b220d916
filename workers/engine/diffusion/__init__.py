"""Few-step diffusion: a small class-conditional digits teacher, SLAM and consistency
distillation into 1-4 step students (full or LoRA), and the sample-quality metrics."""
