"""Benchmarks of a running service: `chatscale bench serve` drives any OpenAI-compatible server
(ours, llama.cpp, vLLM) with one workload, so numbers from different servers compare directly."""
