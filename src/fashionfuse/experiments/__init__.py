"""What runs the stages together: `run` (pipeline), the ablation and its mix search, fusion
rounds, and the report."""
