"""Kernels: the implementations the model's operations run on, chosen per backend in one place."""
