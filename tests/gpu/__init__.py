"""The CUDA tests (test_cuda.py, marked ``cuda``) and the GPU benchmark; ``bash tests/gpu/run.sh`` runs both."""
