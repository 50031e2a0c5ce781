"""Model tiers: layers -> blocks -> the hybrid LM."""
