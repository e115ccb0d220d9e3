"""anndist's tests, by kind: unit/ (one process), multiprocess/ (ranks spawned in one gloo group), e2e/ (real
launches), gpu/ (CUDA); support/ is what they share. tests/README.md says where a new test goes."""
