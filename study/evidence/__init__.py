"""The evidence: statistics from per-case results (``stats``), the race after the search (``racing``), the
verdict (``verdict``) and the figures (``plots``). Pure computation: no Ray, no MLflow; imports the plan and
the core only."""
