"""CUDA driver API: module loading, tensor maps, prepared launches, split-K workspace."""
