"""Research tools on top of the pipeline: sweeps (the engine), their plan, metrics, figures."""
