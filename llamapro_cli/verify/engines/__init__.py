"""`verify-identity` in the engines users serve with: vLLM, llama.cpp and MLX.

Each engine runs in its own interpreter (`--engine-python`, default: the environment `llamapro engines
install ENGINE` made), driven by an adapter script from `adapters/` that imports nothing of llamapro; the
two sides exchange token ids and arrays as files in a temporary folder (`protocol`). Modules: `spec` (the
engines, their pinned installs and their known ways to differ), `install` (the environments), `protocol`
(the exchange), `runner` (launching an adapter), `gguf` (conversion and the sliding-pattern metadata for
llama.cpp), `compare` (the verdict in one engine, and the informational comparison with transformers).

Must not: import an engine (vllm, llama_cpp, mlx) into llamapro's own interpreter.
"""
