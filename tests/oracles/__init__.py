"""The official ImageReward package as a parity oracle, in its own cached virtual environment."""
