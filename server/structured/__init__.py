"""Structured outputs and tool calling, torch-free: grammar constraints compiled with llguidance (a bounded
cache keyed by the grammar's hash, compiled off the engine thread), and the parsers that turn a model's
tool-call text into OpenAI ``tool_calls``."""
