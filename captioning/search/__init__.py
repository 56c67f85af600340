"""Caption search: beams, sampling, constraints and consensus re-ranking, with torch and numpy steps."""
