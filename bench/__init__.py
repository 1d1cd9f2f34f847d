"""The harness: composes encoders, connectors and LLM backends, trains, evaluates and benchmarks them."""
