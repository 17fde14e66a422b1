"""The conformance harness: judge a Qwen2.5-VL implementation stage by stage against the spec.

stages.py (names, order, tolerance classes), fixtures.py (case folders, sha256), compare.py
(metrics and verdicts), adapters/ (the protocol; spec, impl, transformers, files), runner.py,
report.py, cli.py (`qwen25vl conform`), plugin.py (pytest). The port author's guide: docs/conformance.md.
"""
