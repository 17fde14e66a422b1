"""qwen25vl: reference (spec), fast path (impl) and conformance harness for Qwen2.5-VL."""
